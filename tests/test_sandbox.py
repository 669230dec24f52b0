"""The sandbox contains hostile programs within their time limit; code_reward runs tests in it."""
import os
import socket
import sys
import tempfile
import time

import pytest

from lightning_r1v2.rewards import SandboxPool, code_reward, run_program
from lightning_r1v2.rewards import sandbox
from lightning_r1v2.rewards.sandbox import _runtime

ROOT = os.geteuid() == 0
LIMIT = 1.0  # wall-clock seconds given to each hostile program
SLACK = 2.0  # seconds allowed on top of it (process start, kill, cleanup)


def uid_processes(uid, wait=1.0):
    """Live (not zombie) processes of ``uid``; killed ones get ``wait`` seconds to die."""
    deadline = time.monotonic() + wait
    while True:
        pids = []
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if int(status["Uid"].split()[1]) == uid and status["State"].split()[0] not in ("Z", "X"):
                pids.append(int(p))
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.02)


def run(code, **kw):
    t0 = time.monotonic()
    limit = kw.pop("timeout", LIMIT)
    res = run_program(code, timeout=limit, **kw)
    assert time.monotonic() - t0 < limit + SLACK
    if res.uid is not None:
        assert uid_processes(res.uid) == [], "processes of the sandbox uid outlived the job"
    return res


def test_normal_program_stdout_and_stdin():
    res = run("import sys\nn = int(input())\nprint(n * 2)\nprint('err', file=sys.stderr)", stdin="21\n")
    assert res.ok and res.returncode == 0 and not res.timed_out
    assert res.stdout == "42\n" and res.stderr == "err\n"


def test_exception_exit_code():
    res = run("raise ValueError('boom')")
    assert not res.ok and res.returncode == 1 and "ValueError: boom" in res.stderr


def test_infinite_loop_is_killed_at_the_deadline():
    res = run("while True:\n    pass")
    assert res.timed_out and res.killed_reason == "timeout" and not res.ok


def test_cpu_limit():
    res = run("while True:\n    pass", timeout=LIMIT + 5, cpu_seconds=1)  # wall slack for a loaded machine
    assert res.killed_reason == "cpu_limit" and not res.timed_out and not res.ok


def test_memory_bomb_fails_inside_its_limit():
    res = run("x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_mb=128)
    assert not res.ok and not res.timed_out
    assert "MemoryError" in res.stderr


def test_fork_bomb_python_level():
    res = run("import os\nwhile True:\n    os.fork()")
    assert not res.ok and "PermissionError" in res.stderr


def test_fork_bomb_subprocess_and_system():
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"):
        res = run(code)
        assert not res.ok and ("PermissionError" in res.stderr or "ImportError" in res.stderr)


@pytest.mark.skipif(not ROOT, reason="the OS-level process cap (own uid + RLIMIT_NPROC) applies when run as root")
def test_fork_bomb_through_ctypes_is_capped_and_reaped():
    # Bypasses the audit hook: RLIMIT_NPROC on the job's own uid caps it; kill -1 as that uid reaps it.
    code = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()"
    res = run(code, max_processes=8)
    assert not res.ok and res.timed_out


@pytest.mark.skipif(not ROOT, reason="reaping by uid needs root")
def test_setsid_escapee_is_reaped():
    # A child that leaves the process group (setsid) and outlives the program.
    code = (
        "import ctypes, time\nlibc = ctypes.CDLL(None)\n"
        "if libc.fork() == 0:\n    libc.setsid()\n    time.sleep(30)\nelse:\n    print('parent done')"
    )
    res = run(code)
    assert res.ok and res.stdout == "parent done\n"  # run() asserts no process of the uid is left


def test_writes_outside_the_working_directory(tmp_path):
    target = tmp_path / "owned" / "escape.txt"
    target.parent.mkdir()
    code = f"""
import os
print(os.getcwd())
for path in ("../escape.txt", "../../escape.txt", {str(target)!r}):
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as e:
        print("blocked", path, type(e).__name__)
for fn, args in ((os.mkdir, ("../d",)), (os.rename, ("x", "../y")), (os.remove, ({str(target)!r},))):
    try:
        fn(*args)
        print("DID", fn.__name__)
    except OSError as e:
        print("blocked", fn.__name__)
open("inside.txt", "w").write("fine")
print(open("inside.txt").read())
"""
    before = set(os.listdir(tempfile.gettempdir()))
    res = run(code)
    assert res.ok, res.stderr
    assert "WROTE" not in res.stdout and "DID" not in res.stdout
    assert res.stdout.rstrip().endswith("fine")
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("r1v2-sandbox-")]
    assert not target.exists() and sorted(os.listdir(tmp_path)) == ["owned"]


@pytest.mark.skipif(not ROOT, reason="file permissions bind the child only after it drops root")
def test_writes_outside_through_ctypes(tmp_path):
    target = tmp_path / "escape.txt"
    code = f"""
import ctypes, os
libc = ctypes.CDLL(None)
print(libc.open(b"../escape.txt", os.O_WRONLY | os.O_CREAT, 0o644))
print(libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644))
"""
    res = run(code)
    assert res.ok and res.stdout.split() == ["-1", "-1"]
    assert not target.exists()


def test_network_is_blocked():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.socket()\ns.settimeout(0.5)\ns.connect(('127.0.0.1', {port}))\nprint('CONNECTED')"
        res = run(code)
        assert not res.ok and "CONNECTED" not in res.stdout
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "s3cr3t-value")
    code = """
import os
print(sorted(os.environ))
print(os.environ.get("SECRET_TOKEN"))
try:
    print(open(f"/proc/{os.getppid()}/environ", "rb").read())
except OSError as e:
    print("blocked", type(e).__name__)
"""
    res = run(code)
    assert res.ok, res.stderr
    assert "s3cr3t-value" not in res.stdout
    assert res.stdout.splitlines()[0] == str(sorted(["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]))
    if ROOT or sandbox.isolation() == "bwrap":  # the OS refuses too, not only the audit hook
        # As root without bubblewrap: another uid's environ is unreadable. Under bubblewrap the
        # parent is the sandbox's own init (the trainer is in no /proc the job can see).
        code = (
            "import ctypes, os\nlibc = ctypes.CDLL(None)\nfd = libc.open(f'/proc/{os.getppid()}/environ'.encode(), 0)\n"
            "buf = ctypes.create_string_buffer(1 << 16)\nprint(fd, buf.raw[:max(libc.read(fd, buf, 1 << 16), 0)])"
        )
        res = run(code)
        assert res.ok and "s3cr3t" not in res.stdout
        assert res.stdout.startswith("-1 ") or sandbox.isolation() == "bwrap"


def test_huge_output_is_capped():
    code = "import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n    sys.stdout.write(chunk)"
    res = run(code, max_output_bytes=100_000)
    assert res.killed_reason == "output_limit" and res.truncated and not res.ok
    assert len(res.stdout) == 100_000


def test_os_exit_code():
    res = run("import os\nos._exit(3)")
    assert res.returncode == 3 and not res.ok and res.killed_reason is None


def test_segfault_is_contained():
    res = run("import ctypes\nctypes.string_at(0)")
    assert not res.ok and res.returncode == -11 and res.killed_reason == "signal:SIGSEGV"


def test_pool_runs_in_parallel_and_keeps_order():
    programs = [(f"import time\ntime.sleep(0.4)\nprint(int(input()) + {i})", "1\n") for i in range(8)]
    _runtime()  # one-off probe outside the timing
    with SandboxPool(workers=8) as pool:
        t0 = time.monotonic()
        results = pool.map(programs, timeout=5)
        elapsed = time.monotonic() - t0
    assert [r.stdout for r in results] == [f"{1 + i}\n" for i in range(8)]
    assert elapsed < 8 * 0.4 * 0.75, f"not parallel: {elapsed:.2f}s"
    assert len({r.uid for r in results}) == len(results) or not ROOT  # own uid per concurrent job


# ---------------------------------------------------------------------------------------------
# code_reward

STDIO = [{"input": "2\n", "output": "4"}, {"input": "5\n", "output": "10\n"}, {"input": "0", "output": "1"}]
ASSERTS = [{"assert": "assert f(2) == 4"}, {"assert": "assert f(3) == 9"}, {"assert": "assert f(0) == 1"}]


def test_code_reward_fractions_and_modes():
    doubling = "Here:\n```python\nprint(int(input()) * 2)\n```"
    square = "```py\ndef f(x):\n    return x * x\n```"
    first_wrong_then_right = "```python\nprint(0)\n```\nbetter:\n```\nprint(int(input()) * 2)\n```"
    comps = [doubling, square, first_wrong_then_right, "no code here", "```python\nwhile True: pass\n```", doubling]
    tests = [STDIO, ASSERTS, STDIO, STDIO, STDIO, None]
    out = code_reward(comps, tests=tests, timeout=1.0, id=list("abcdef"))
    # 2 of 3 stdio tests pass (0*2 != 1); 2 of 3 asserts (f(0) == 0 != 1); the last block is used;
    # no code block -> 0; an infinite loop times out on every test -> 0; tests None -> not applicable.
    assert out[:5] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0.0, 0.0], abs=1e-9)
    assert out[5] is None
    strict = code_reward(comps[:3], tests=tests[:3], all_or_nothing=True, timeout=1.0)
    assert strict == [0.0, 0.0, 0.0]
    assert code_reward([doubling], tests=[STDIO[:2]], all_or_nothing=True) == [1.0]
    as_json = '[{"stdin": "4", "stdout": "8"}]'  # JSON text and stdin/stdout keys
    assert code_reward([doubling], tests=[as_json]) == [1.0]


def test_audit_hook_layer_alone(monkeypatch, tmp_path):
    # The path taken when not running as root without bubblewrap: no uid drop, no namespaces; the
    # prelude's audit hook is then what refuses process creation, sockets and writes outside.
    monkeypatch.setattr(sandbox, "_RUNTIME", sandbox._Runtime(sys.executable, drop_privileges=False))
    target = tmp_path / "escape.txt"
    code = f"""
import os, socket
def attempt(label, fn):
    try:
        fn()
        print("DID", label)
    except (OSError, ImportError) as e:
        print("blocked", label)
attempt("write", lambda: open({str(target)!r}, "w"))
attempt("os.open", lambda: os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))
attempt("fork", os.fork)
attempt("posix_spawn", lambda: os.posix_spawn("/bin/true", ["true"], {{}}))
attempt("_posixsubprocess", lambda: __import__("_posixsubprocess"))
attempt("kill", lambda: os.kill(os.getppid(), 0))
attempt("connect", lambda: socket.create_connection(("127.0.0.1", 9), timeout=0.2))
attempt("environ", lambda: open(f"/proc/{{os.getppid()}}/environ").read())
open("ok.txt", "w").write("fine")
print(open("ok.txt").read())
"""
    res = run_program(code, timeout=2.0)
    assert res.ok, res.stderr
    assert "DID" not in res.stdout and res.stdout.count("blocked") == 8 and res.stdout.endswith("fine\n")
    assert not target.exists()


def test_audit_hook_dir_fd_both_ways(monkeypatch, tmp_path):
    # dir_fd=-1 is CPython's "none": relative remove/rename/mkdir inside the folder must work; a
    # dir_fd of an outside folder must not let a write through (it cannot even be opened).
    monkeypatch.setattr(sandbox, "_RUNTIME", sandbox._Runtime(sys.executable, drop_privileges=False))
    code = f"""
import os
os.mkdir("d"); open("d/a", "w").write("1"); os.rename("d/a", "d/b"); os.remove("d/b"); os.rmdir("d")
here = os.open(".", os.O_RDONLY)
os.close(os.open("c", os.O_CREAT | os.O_WRONLY, dir_fd=here))
os.rename("c", "e", src_dir_fd=here, dst_dir_fd=here); os.remove("e", dir_fd=here)
print("inside ok")
for label, fn in (("open outside dir", lambda: os.open({str(tmp_path)!r}, os.O_RDONLY)),
                  ("mkdir via dir_fd", lambda: os.mkdir("x", dir_fd=os.open("..", os.O_RDONLY))),
                  ("open ..", lambda: os.open("..", os.O_RDONLY)),
                  ("rename out via cwd", lambda: (open("s", "w").close(), os.chdir({str(tmp_path)!r}),
                                                  os.rename("s", "escaped", src_dir_fd=here)))):
    try:
        fn()
        print("DID", label)
    except OSError:
        print("blocked", label)
"""
    res = run_program(code, timeout=2.0)
    assert res.ok, res.stderr
    assert res.stdout.splitlines() == [
        "inside ok", "blocked open outside dir", "blocked mkdir via dir_fd", "blocked open ..", "blocked rename out via cwd"
    ]
    assert os.listdir(tmp_path) == []


def test_calls_return_plain_data_decided_outside():
    code = "def f(x):\n    return [x, (x,), {x: {1}}, 0.5, None, True]\nclass A:\n    pass\ndef g():\n    return A()"
    res = run("import sys\n" + code, calls=["f(2)", "g()", "1 // 0", "undefined"])
    assert res.values == [
        ("ok", [2, (2,), {2: {1}}, 0.5, None, True]),
        ("error", "TypeError"),  # an instance of a program class is not plain data
        ("error", "ZeroDivisionError"),
        ("error", "NameError"),
    ]
    # A program that exits before the calls leaves them missing; a call that hangs keeps the earlier values.
    assert run("import os\nos._exit(0)", calls=["1"]).values == [("missing", None)]
    res = run("import time\ndef f(x):\n    time.sleep(30)", calls=["1 + 1", "f(0)"])
    assert res.timed_out and res.values == [("ok", 2), ("missing", None)]


def test_decode_values_voids_anything_out_of_protocol():
    good = b'[0, "ok", {"t": [1, {"f": "nan"}]}]\n[1, "error", "KeyError"]\n'
    out = sandbox.decode_values(good, 2)
    assert out[0][1][0] == 1 and out[0][1][1] != out[0][1][1] and out[1] == ("error", "KeyError")
    missing = [("missing", None)] * 2
    assert sandbox.decode_values(b'[1, "ok", 1]\n[0, "ok", 2]\n', 2) == missing  # out of order
    assert sandbox.decode_values(good + b'[0, "ok", 4]\n', 2) == missing  # extra line
    assert sandbox.decode_values(b'[0, "ok", {"x": 1}]\n', 1) == [("missing", None)]  # unknown tag
    assert sandbox.decode_values(b'[0, "ok", ' + b"[" * 100 + b"]" * 100 + b"]\n", 1) == [("missing", None)]
    assert sandbox.decode_values(b'[0, "ok", 5]\n[1, "ok"', 2) == [("ok", 5), ("missing", None)]  # cut by a kill


def test_bwrap_hides_the_trainer_and_keeps_tmp_private():
    if sandbox.isolation() != "bwrap":
        # Without bubblewrap the warning must have named the gaps (tests/test_code_reward_hostile.py).
        assert sandbox._runtime().bwrap is None
        return
    code = (
        "import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
        "print(sorted(os.listdir('/')))\nopen('/tmp/x', 'w').write('1')\nimport ctypes\n"
        "print(ctypes.CDLL(None).open(b'/dev/shm/y', os.O_CREAT | os.O_WRONLY, 0o644) >= 0)\n"
        "print(ctypes.CDLL(None).open(b'/y', os.O_CREAT | os.O_WRONLY, 0o644))"
    )
    res = run(code)
    assert res.ok, res.stderr
    pids = eval(res.stdout.splitlines()[0])
    assert str(os.getpid()) not in pids and len(pids) <= 3  # bwrap's init, the program (and a reaper)
    assert "work" not in res.stdout and "root" not in eval(res.stdout.splitlines()[1])
    assert res.stdout.splitlines()[2:] == ["True", "-1"]  # its own /dev/shm; the sandbox's / is read-only
    assert not os.path.exists("/dev/shm/y") and not os.path.exists(os.path.join(tempfile.gettempdir(), "x"))
    big = run("try:\n    open('big', 'wb').write(b'x' * (8 << 20))\nexcept OSError as e:\n    print(e.errno)", disk_mb=4)
    assert big.stdout.strip() == "28"  # ENOSPC: the job's /tmp is capped at disk_mb
