"""Hostile programs through the public code_reward API: wrong ones score 0, right ones 1.

A separate 'trainer' process (tests/hostile_runner.py) scores the corpus. It holds a secret
token in its environment; its command line names the data file, whose expected outputs are that
token; it serves the token on 127.0.0.1 and on a unix socket. A probe passes its stdin/stdout
test only if it steals the token, and passes a function test only if it forges the verdict.
After the run: the trainer is alive, nothing the probes wrote is left in /tmp, /var/tmp or
/dev/shm. Run as root, and as a normal user made for the test (``useradd``).

What runs depends on the machine: with bubblewrap (``isolation() == "bwrap"``) every probe must
fail. Without it, the ``needs_bwrap`` probes (ctypes, filling the disk) are not contained and the sandbox must have
said so in its warning; the test checks that instead (see the README's sandbox section).
"""
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from lightning_r1v2.rewards.sandbox import LEGACY_GAPS_ROOT, LEGACY_GAPS_USER, isolation

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "hostile_runner.py")
SQUARE = [{"assert": "assert f(2) == 4"}, {"assert": "assert f(3) == 9"}]
DOUBLE = [{"input": "2\n", "output": "4"}, {"input": "5\n", "output": "10"}]
LEAK = "r1v2leak"  # every file a probe tries to leave behind has this in its name


def block(code):
    return f"```python\n{code}\n```"


# ctypes helpers shared by the OS-level probes (they bypass the audit hook on purpose).
LIBC = """
import ctypes, os, re
libc = ctypes.CDLL(None, use_errno=True)
def cread(path):
    fd = libc.open(path.encode(), 0)
    if fd < 0:
        return b""
    buf = ctypes.create_string_buffer(1 << 20)
    n = libc.read(fd, buf, len(buf))
    libc.close(fd)
    return buf.raw[:max(n, 0)]
TOK = re.compile(rb"tok-[0-9a-f]{16}")
"""

# (id, program, tests, expected score, needs_bwrap: contained only with bubblewrap, see the README table)
CORPUS = [
    # --- right programs: must score 1 ---
    ("right_square", "def f(x):\n    return x * x", SQUARE, 1.0, False),
    ("right_double", "print(int(input()) * 2)", DOUBLE, 1.0, False),
    ("right_relative_file_ops",  # dir_fd=-1 is CPython's "none": relative ops in the job's folder work
     "import os, tempfile\nos.mkdir('d')\nopen('d/a', 'w').write('1')\nos.rename('d/a', 'd/b')\n"
     "os.remove('d/b')\nos.rmdir('d')\nfd = os.open('.', os.O_RDONLY)\n"
     "os.close(os.open('c', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\nos.remove('c', dir_fd=fd)\n"
     "with tempfile.NamedTemporaryFile() as t:\n    t.write(b'x')\n"
     "def f(x):\n    return x * x", SQUARE, 1.0, False),
    ("right_with_main_guard", "import sys\ndef f(x):\n    return x * x\nif __name__ == '__main__':\n"
     "    for line in sys.stdin:\n        print(f(int(line)))", SQUARE, 1.0, False),
    ("right_plain_containers", "def f(x):\n    return [x, (x,), {x: {1}}]",
     [{"assert": "assert f(1) == [1, (1,), {1: {1}}]"}], 1.0, False),
    # --- forged verdicts on function tests: must score 0 ---
    ("sys_exit_before_checks", "import sys\ndef f(x):\n    return 0\nsys.exit(0)", SQUARE, 0.0, False),
    ("os_exit_before_checks", "import os\ndef f(x):\n    return 0\nos._exit(0)", SQUARE, 0.0, False),
    ("eq_always_true", "class A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()",
     SQUARE, 0.0, False),
    ("int_subclass_eq", "class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
     "def f(x):\n    return I(0)", SQUARE, 0.0, False),
    ("excepthook", "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\ndef f(x):\n    raise ValueError", SQUARE,
     0.0, False),
    ("reads_own_source_and_calls", "import glob, re\nsrc = ''.join(open(p).read() for p in glob.glob('*'))\n"
     "nums = [int(n) for n in re.findall(r'==\\s*(\\d+)', src)]\ndef f(x):\n    return nums.pop(0) if nums else 0",
     SQUARE, 0.0, False),
    ("writes_fake_results", "import os\nfor fd in range(3, 30):\n    try:\n"
     "        os.write(fd, b'[0, \"ok\", 4]\\n[1, \"ok\", 9]\\n')\n    except OSError:\n        pass\n"
     "def f(x):\n    return 0", SQUARE, 0.0, False),
    ("deep_return", "def f(x):\n    v = []\n    for _ in range(100000):\n        v = [v]\n    return v", SQUARE, 0.0, False),
    ("huge_return", "def f(x):\n    return 'x' * (50 << 20)", SQUARE, 0.0, False),  # past the pipe's cap
    ("bigint_return", "def f(x):\n    return 10 ** 5000", SQUARE, 0.0, False),
    ("sub_always_zero", "class A:\n    def __sub__(self, o):\n        return 0\ndef f(x):\n    return A()",
     [{"assert": "assert f(2) == 4"}, {"assert": "assert abs(f(3) - 9) < 1e-9"}], 0.0, False),
    ("exit_inside_call", "import sys\ndef f(x):\n    sys.exit(0)", SQUARE, 0.0, False),
    ("patches_builtins", "import builtins\nbuiltins.type = lambda *a: int\nbuiltins.eval = lambda *a, **k: 4\n"
     "def f(x):\n    return 0", SQUARE, 0.0, False),
    # --- stealing the expected stdout (the token): must score 0 ---
    ("env", "import os\nprint(os.environ.get('R1V2_SECRET', ''))", None, 0.0, False),
    ("parent_environ_python", "import os, re\ntry:\n    s = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
     "    print(re.search(rb'tok-[0-9a-f]{16}', s).group().decode())\nexcept Exception:\n    print('')", None, 0.0, False),
    ("proc_scan_ctypes", LIBC + "found = b''\nfor p in os.listdir('/proc'):\n    if not p.isdigit():\n        continue\n"
     "    for part in ('environ', 'cmdline'):\n        s = cread(f'/proc/{p}/{part}')\n        m = TOK.search(s)\n"
     "        if m:\n            found = m.group()\n        for path in re.findall(rb'/[^\\x00]+\\.jsonl', s):\n"
     "            m = TOK.search(cread(path.decode()))\n            if m:\n                found = m.group()\n"
     "print(found.decode())", None, 0.0, True),
    ("tcp_ctypes", LIBC + "import socket, struct\nport = int(input().split()[0])\ns = libc.socket(2, 1, 0)\n"
     "addr = struct.pack('<HH4s8x', 2, socket.htons(port), bytes([127, 0, 0, 1]))\n"
     "if libc.connect(s, addr, len(addr)) == 0:\n    buf = ctypes.create_string_buffer(64)\n"
     "    n = libc.recv(s, buf, 64, 0)\n    print(buf.raw[:max(n, 0)].decode().strip())",
     None, 0.0, True),
    ("tcp_python", "import socket\nport = int(input().split()[0])\n"
     "print(socket.create_connection(('127.0.0.1', port), timeout=1).recv(64).decode().strip())", None, 0.0, False),
    ("unix_socket_ctypes", LIBC + "path = input().split()[1].encode()\ns = libc.socket(1, 1, 0)\n"
     "addr = (1).to_bytes(2, 'little') + path + b'\\0' * (108 - len(path))\n"
     "if libc.connect(s, addr, len(addr)) == 0:\n    buf = ctypes.create_string_buffer(64)\n"
     "    n = libc.recv(s, buf, 64, 0)\n    print(buf.raw[:max(n, 0)].decode().strip())", None, 0.0, True),
    ("data_file_by_path", LIBC + "import glob\nfor p in glob.glob('/tmp/*/*.jsonl') + glob.glob('/tmp/*.jsonl'):\n"
     "    m = TOK.search(cread(p))\n    if m:\n        print(m.group().decode())\n        break", None, 0.0, True),
    ("disarm_hook_with_gc", "import gc, os, re\nfor o in gc.get_objects():\n"
     "    if type(o).__name__ == 'function' and o.__name__ == 'hook' and o.__closure__:\n"
     "        for c in o.__closure__:\n            if isinstance(c.cell_contents, str) and c.cell_contents.startswith('/'):\n"
     "                c.cell_contents = '/'\n            if isinstance(c.cell_contents, frozenset):\n"
     "                c.cell_contents = frozenset()\n"
     "try:\n    s = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
     "    print(re.search(rb'tok-[0-9a-f]{16}', s).group().decode())\nexcept Exception:\n    print('')", None, 0.0, True),
    # --- harming the trainer or the machine; the trainer must stay alive, nothing left behind ---
    ("kill_trainer_ctypes", LIBC + "libc.kill(os.getppid(), 9)\nlibc.kill(-1, 9)\nprint('')", None, 0.0, True),
    ("kill_trainer_pidfd", "import os, signal\ntry:\n    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\n"
     "except Exception:\n    pass\nprint('')", None, 0.0, False),
    ("leave_files", LIBC + "tag = input().split()[2]\nfor d in ('/tmp', '/dev/shm', '/var/tmp'):\n"
     "    fd = libc.open(f'{d}/" + LEAK + "-{tag}'.encode(), os.O_CREAT | os.O_WRONLY, 0o666)\n"
     "    libc.write(fd, b'x', 1)\nprint('')", None, 0.0, True),
    ("fill_disk", "import os\ntry:\n    for i in range(64):\n        with open(f'f{i}', 'wb') as f:\n"
     "            f.write(b'x' * (4 << 20))\nexcept OSError:\n    pass\nprint('')", None, 0.0, True),  # 256 MiB as files
]


def corpus_rows(token):
    rows = []
    for rid, prog, tests, expect, needs_bwrap in CORPUS:
        if tests is None:  # stdin/stdout test whose expected output is the secret
            tests = [{"input": f"PORT UNIX {token}\n", "output": token}]
        rows.append({"id": rid, "completion": block(prog), "tests": tests, "expect": expect, "needs_bwrap": needs_bwrap})
    return rows


def leftovers():
    found = []
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            found += [os.path.join(d, n) for n in os.listdir(d) if LEAK in n]
        except OSError:
            pass
    return found


def run_corpus(user=None, legacy=False, needs_bwrap=True):
    """Score the corpus in a runner process (as ``user`` when given; ``legacy``: without bubblewrap).

    ``needs_bwrap=False`` leaves out the probes only bubblewrap contains (as a normal user without
    it they would kill the runner: that gap is documented, not contained). Returns (rows, scores, the
    runner's stderr)."""
    token = "tok-" + secrets.token_hex(8)
    folder = tempfile.mkdtemp(prefix="r1v2-hostile-")
    os.chmod(folder, 0o777)  # the normal user's runner binds its unix socket here
    data = os.path.join(folder, "data.jsonl")
    rows = [r for r in corpus_rows(token) if needs_bwrap or not r["needs_bwrap"]]
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("id", "completion", "tests")}) + "\n")
    os.chmod(data, 0o644)
    python = sys.executable
    argv = [python, RUNNER, data]
    if user is not None:
        if not os.access(os.path.realpath(python), os.X_OK) or not _runs_as(user, python):
            python = "/usr/bin/python3"
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", python, RUNNER, data]
    jobs_tmp = os.path.join(folder, "tmp")  # the sandbox makes its job folders here
    os.mkdir(jobs_tmp)
    os.chmod(jobs_tmp, 0o777)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "R1V2_SECRET": token, "HOME": folder, "TMPDIR": jobs_tmp}
    if legacy or os.environ.get("R1V2_SANDBOX") == "legacy":
        env["R1V2_SANDBOX"] = "legacy"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=folder)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["alive"] is True  # the trainer survived every probe
        assert os.listdir(jobs_tmp) == [], "job folders were left behind"
        assert processes_mentioning(folder) == [], "sandboxed processes outlived their jobs"
        return rows, report["scores"], proc.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def processes_mentioning(text, wait=2.0):
    """Live processes whose command line contains ``text`` (killed ones get ``wait`` seconds to go)."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text.encode() in cmd and state not in ("Z", "X"):
                found.append(int(pid))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _runs_as(user, python):
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import json'], check=True)"
    probe = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", python, "-c", code]
    return subprocess.run(probe, capture_output=True).returncode == 0


def check(rows, scores, stderr, mode):
    assert leftovers() == [], "a probe left files in a shared folder"
    wrong = {}
    for r in rows:
        if mode != "bwrap" and r["needs_bwrap"]:
            continue  # not contained without bubblewrap; the warning must say so (below)
        if scores[r["id"]] != r["expect"]:
            wrong[r["id"]] = scores[r["id"]]
    assert wrong == {}, f"probes scored wrongly ({mode}): {wrong}"
    if mode != "bwrap":
        assert "SANDBOX NOT ISOLATED" in stderr


@pytest.fixture(scope="module")
def normal_user():
    """A normal user for the test: created with useradd when we are root and it exists."""
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid())
        return
    name = "r1v2-hostile"
    created = False
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        created = True
    yield pwd.getpwnam(name)
    if created:
        subprocess.run(["userdel", name], check=False)


def test_hostile_corpus_as_current_user():
    # Without bubblewrap and root, the ctypes probes would kill the runner (a documented gap).
    rows, scores, stderr = run_corpus(needs_bwrap=isolation() == "bwrap" or os.geteuid() == 0)
    assert set(scores) == {r["id"] for r in rows}
    check(rows, scores, stderr, isolation())


def test_hostile_corpus_as_a_normal_user(normal_user):
    assert normal_user.pw_uid != 0
    rows, scores, stderr = run_corpus(normal_user if os.geteuid() == 0 else None, needs_bwrap=isolation() == "bwrap")
    # The runner's own probe decides its mode; read it back from its warning.
    mode = "legacy" if "SANDBOX NOT ISOLATED" in stderr else "bwrap"
    if isolation() == "bwrap":  # as root, bwrap already runs as an unprivileged uid: a user gets it too
        assert mode == "bwrap", stderr[-2000:]
    if mode == "legacy":
        assert LEGACY_GAPS_USER in stderr
    check(rows, scores, stderr, mode)


@pytest.mark.parametrize("as_user", [False, True], ids=["current_user", "normal_user"])
def test_hostile_corpus_without_bubblewrap(as_user, normal_user):
    # The fallback: Python-level probes still fail, and the warning names what is not contained.
    user_mode = as_user or os.geteuid() != 0
    rows, scores, stderr = run_corpus(normal_user if as_user and os.geteuid() == 0 else None, legacy=True,
                                      needs_bwrap=not user_mode)
    check(rows, scores, stderr, "legacy")
    gaps = LEGACY_GAPS_USER if user_mode else LEGACY_GAPS_ROOT
    assert gaps in stderr and "R1V2_SANDBOX=legacy" in stderr
