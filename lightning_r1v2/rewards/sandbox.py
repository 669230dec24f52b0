"""Run untrusted Python programs (model-written code) in contained child processes.

``run_program(code, stdin, calls=...)`` runs one program in a fresh ``python -I -S`` process and
returns a :class:`SandboxResult`; :class:`SandboxPool` runs many at once (threads, each waiting on
its own process). Linux only.

**Verdicts are not decided in the child.** With ``calls`` (expressions such as ``"f(2)"``), the
child runs the program, then evaluates each call and writes its value as plain data (``None``,
bool, int, float, str and lists, tuples, dicts, sets of those; exact types, no subclasses) as one
JSON line per call to a pipe the trainer reads. The trainer decodes and compares; the expected
values never enter the child, so ``sys.exit(0)``, an ``__eq__`` that is always True or a replaced
``sys.excepthook`` cannot pass a test. Anything else on that pipe (a line out of order, a
duplicate, bad JSON) voids every value of the job.

Two modes, picked once per process by a probe at first use (:func:`isolation`):

**``bwrap``** (bubblewrap on ``PATH`` and user namespaces allowed): the child runs in new user,
PID, network, mount, IPC, UTS and cgroup namespaces. It sees a read-only ``/usr`` (and the
interpreter's own prefix), a private ``/proc`` in which the trainer does not exist (it cannot be
read or signalled), a minimal ``/dev``, and two size-capped tmpfs: ``/tmp`` (its working
directory, ``disk_mb``) and ``/dev/shm`` (1 MiB); they vanish with the job. No network at all (a
loopback of its own). Nothing of the trainer's files is mounted (data, checkpoints, home). As
root, bubblewrap itself starts as an unprivileged uid of the job's own (``setpriv``), so
``RLIMIT_NPROC`` binds and ``kill -9 -1`` as that uid reaps strays; as a normal user the job runs
under our uid inside its namespaces (``RLIMIT_NPROC`` then counts all our processes).

**``legacy``** (no bubblewrap, or it cannot start): a loud one-time warning names what is not
contained. As root: an unprivileged uid per job (file permissions, ``RLIMIT_NPROC``, reaping by
uid), a network namespace (``unshare --net``); files the job writes to ``/tmp``, ``/dev/shm`` and
``/var/tmp`` are removed after it. Not contained as root: reading world-readable files
(including the data if world-readable), seeing other processes in ``/proc``, filesystem unix
sockets, the total size written (only ``RLIMIT_FSIZE`` per file). As a normal user only the audit hook below stands: a program using ``ctypes`` or
disarming the hook from pure Python (its closure is reachable through ``gc``) can read and write
whatever our user can, signal the trainer, and use the network.

In both modes: its own session and process group (killed with ``SIGKILL`` at the end), resource
limits set before user code (soft = hard: ``RLIMIT_AS``, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``,
``RLIMIT_CORE`` = 0, ``RLIMIT_NPROC``, ``RLIMIT_NOFILE``), an environment scrubbed to ``PATH``,
``LANG``, ``LC_ALL``, ``HOME``, ``TMPDIR``, and an audit hook (``sys.addaudithook``) that refuses
process creation, signals to other processes, sockets, writes outside the working directory
(``dir_fd`` resolved; ``-1`` is CPython's "none"), opening directories outside it (so no
``dir_fd`` can point outside), and reading other processes' ``/proc`` entries. The audit hook is a
tripwire for accidents, **not a security boundary**: Python code can bypass it.

Programs get the standard library only (``-S``: no site-packages). Cost: see
``benchmarks/rewards.py``.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger("lightning_r1v2.rewards")

# The child's side (limits, audit hook, calls), passed as ``python -c`` text; see that file.
_PRELUDE = (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")

# Imported before dropping privileges when the interpreter's own library is out of the new uid's reach.
_PREIMPORT = (
    "math", "cmath", "collections", "collections.abc", "itertools", "functools", "heapq", "bisect",
    "re", "string", "json", "random", "fractions", "decimal", "typing", "dataclasses", "array",
    "copy", "operator", "statistics", "io", "time", "datetime", "struct", "queue", "threading",
)


@dataclass
class SandboxResult:
    """What one program did. ``ok`` is a clean exit 0 within every limit."""

    ok: bool
    returncode: int | None
    """Exit status; negative ``-N`` when killed by signal ``N`` (``subprocess`` convention; under
    bubblewrap a status ``128 + N`` of the job is reported the same way)."""
    stdout: str
    stderr: str
    timed_out: bool
    """Killed at the wall-clock limit."""
    killed_reason: str | None = None
    """``timeout``, ``output_limit``, ``cpu_limit``, ``file_size_limit``, ``signal:SIGSEGV``... or None
    for a normal exit (whatever its status)."""
    truncated: bool = False
    """stdout or stderr hit ``max_output_bytes`` (the program was killed then)."""
    wall_s: float = 0.0
    uid: int | None = None
    """The unprivileged uid the program ran as (None when not running as root)."""
    values: list | None = None
    """With ``calls``: one ``("ok", value)``, ``("error", exception type name)`` or ``("missing", None)``
    per call, decoded by the trainer from the result pipe; None without ``calls``."""
    isolation: str = ""
    """``bwrap`` or ``legacy`` (see the module doc)."""


@dataclass(frozen=True)
class _Runtime:
    python: str
    drop_privileges: bool
    """Run the job as an unprivileged uid of its own (we are root)."""
    preimport: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    kill_bin: str | None = None
    setpriv: str | None = None
    bwrap: str | None = None
    """bubblewrap's path in ``bwrap`` mode, None in ``legacy`` mode."""
    binds: tuple[str, ...] = ()
    """Host paths mounted read-only into the bwrap sandbox (same path inside)."""
    symlinks: tuple[tuple[str, str], ...] = ()
    """``(target, link)`` pairs recreated inside (``/lib -> usr/lib`` on merged-/usr systems)."""

    @property
    def mode(self) -> str:
        return "bwrap" if self.bwrap else "legacy"


class _UidSlots:
    """Hands out one uid per concurrent job: ``base + slot``, base spread by our pid."""

    SLOTS = 64

    def __init__(self):
        self._cond = threading.Condition()
        self._busy: set[int] = set()

    @staticmethod
    def base() -> int:
        big = _uid_mapped(1_000_000_000, 1_010_000_000)
        if big:
            return 1_000_000_000 + (os.getpid() % 150_000) * _UidSlots.SLOTS
        return 40_000 + (os.getpid() % 300) * _UidSlots.SLOTS

    def acquire(self) -> int:
        with self._cond:
            while len(self._busy) >= self.SLOTS:
                self._cond.wait()
            slot = min(set(range(self.SLOTS)) - self._busy)
            self._busy.add(slot)
        return self.base() + slot

    def release(self, uid: int) -> None:
        with self._cond:
            self._busy.discard(uid - self.base())
            self._cond.notify()


def _uid_mapped(lo: int, hi: int) -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inner, _, count = (int(x) for x in line.split())
                if inner <= lo and hi <= inner + count:
                    return True
    except OSError:
        return False
    return False


_UIDS = _UidSlots()
_RUNTIME: _Runtime | None = None
_RUNTIME_LOCK = threading.Lock()
_ENV_BASE = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
_SBIN = "/usr/bin:/bin:/usr/sbin:/sbin"
_SHM_BYTES = 1 << 20
_PROBE = "import fractions, json, collections\nprint('ok')"
# What the legacy mode leaves uncontained, per case; the one-time warning quotes it.
LEGACY_GAPS_ROOT = (
    "no bubblewrap: as root the job runs as its own uid with no network, but it can read every "
    "world-readable file (the data too, if world-readable), see other processes in /proc, reach "
    "filesystem unix sockets, and fill the disk (only each file's size is capped)"
)
LEGACY_GAPS_USER = (
    "no bubblewrap and not root: only the Python audit hook stands between the program and our user; "
    "through ctypes or by disarming the hook a program can read and write our files (the data and "
    "expected outputs included), read the trainer's /proc entries, signal or kill the trainer, use the network, "
    "and fill the disk"
)


def _runtime() -> _Runtime:
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = _detect_runtime()
            log.debug("sandbox runtime: %s", _RUNTIME)
        return _RUNTIME


def isolation() -> str:
    """``bwrap`` or ``legacy``: the mode this process's sandbox runs in (probed on first use).

    Set ``R1V2_SANDBOX=legacy`` before first use to skip bubblewrap.
    """
    return _runtime().mode


def _detect_runtime() -> _Runtime:
    if os.name != "posix" or not sys.platform.startswith("linux"):
        raise RuntimeError("the sandbox needs Linux")
    root = os.geteuid() == 0
    kill_bin = shutil.which("kill", path=_SBIN)
    setpriv = shutil.which("setpriv", path=_SBIN)
    bwrap = shutil.which("bwrap", path=os.environ.get("PATH", "") + ":" + _SBIN)
    why = "bubblewrap (bwrap) is not installed"
    if os.environ.get("R1V2_SANDBOX", "") == "legacy":
        bwrap, why = None, "R1V2_SANDBOX=legacy"
    elif bwrap and root and not setpriv:
        bwrap, why = None, "setpriv (util-linux) is missing, needed to start bwrap as an unprivileged uid"
    if bwrap:
        links = tuple((os.readlink(p), p) for p in ("/lib", "/lib64", "/bin", "/sbin", "/lib32") if os.path.islink(p))
        for _, real in _python_candidates():
            binds = ["/usr"] + [p for p in ("/lib", "/lib64", "/bin", "/sbin") if os.path.isdir(p) and not os.path.islink(p)]
            base = _base_prefix(real)
            for extra in (base, os.path.dirname(real)):
                if extra and not any(extra == b or extra.startswith(b + "/") for b in binds):
                    binds.append(extra)
            rt = _Runtime(real, root, (), (), kill_bin, setpriv, bwrap, tuple(binds), links)
            res = _execute(rt, _PROBE, "", 10.0, 256, 5, 10_000, 1, 16, 64, None, 4)
            if res.ok and res.stdout.strip() == "ok":
                return rt
            why = f"bwrap is installed but could not start a job ({res.stderr.strip()[-300:] or res.returncode})"
    rt = _legacy_runtime(root, kill_bin, setpriv)
    log.warning(
        "SANDBOX NOT ISOLATED (%s). %s. Install bubblewrap (apt-get install bubblewrap) and allow user "
        "namespaces to contain model-written code.", why, LEGACY_GAPS_ROOT if rt.drop_privileges else LEGACY_GAPS_USER
    )
    return rt


def _python_candidates():
    """``(path, real path)`` of each distinct executable interpreter a job may run, best first."""
    seen: set[str] = set()
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(cand)
        if real not in seen and os.access(real, os.X_OK):
            seen.add(real)
            yield cand, real


def _base_prefix(python: str) -> str | None:
    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"], capture_output=True, timeout=10, text=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    p = out.stdout.strip()
    return os.path.realpath(p) if out.returncode == 0 and p.startswith("/") and p != "/" else None


def _legacy_runtime(root: bool, kill_bin: str | None, setpriv: str | None) -> _Runtime:
    if not root:
        return _Runtime(sys.executable, drop_privileges=False)
    prefix: tuple[str, ...] = ()
    unshare = shutil.which("unshare", path=_SBIN)
    if unshare:
        try:
            probe = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=10)
            if probe.returncode == 0:
                prefix = (unshare, "--net", "--")
        except (OSError, subprocess.SubprocessError):
            pass
    for cand, _ in _python_candidates():
        rt = _Runtime(cand, True, (), prefix, kill_bin, setpriv)
        res = _execute(rt, _PROBE, "", 10.0, 256, 5, 10_000, 1, 16, 64, None, 4)
        if res.ok and res.stdout.strip() == "ok":
            return rt
    rt = _Runtime(sys.executable, True, _PREIMPORT, prefix, kill_bin, setpriv)
    res = _execute(rt, "print('ok')", "", 10.0, 256, 5, 10_000, 1, 16, 64, None, 4)
    if res.ok and res.stdout.strip() == "ok":
        return rt
    log.warning("sandbox: cannot drop privileges here (%s); running programs as root", res.stderr[-300:])
    return _Runtime(sys.executable, False, (), prefix, None)


def run_program(
    code: str,
    stdin: str = "",
    timeout: float = 5.0,
    memory_mb: int = 256,
    cpu_seconds: int | None = None,
    max_output_bytes: int = 1_000_000,
    file_size_mb: int = 16,
    max_processes: int = 16,
    max_open_files: int = 64,
    calls: list[str] | None = None,
    disk_mb: int = 32,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` with ``stdin`` in a contained child process (see module doc).

    Args:
        timeout: wall-clock seconds before the process group is killed.
        memory_mb: address-space limit (``RLIMIT_AS``); 0 for none.
        cpu_seconds: CPU-time limit; default ``ceil(timeout) + 1``.
        max_output_bytes: cap on stdout, on stderr and on the result pipe each; past it the program is killed.
        file_size_mb: largest file the program may write.
        max_processes: ``RLIMIT_NPROC`` (threads count too).
        max_open_files: ``RLIMIT_NOFILE``.
        calls: expressions evaluated after the program, in its globals; their values come back
            as plain data in ``SandboxResult.values`` (see the module doc).
        disk_mb: size of the job's ``/tmp`` (working directory) in ``bwrap`` mode; the total it
            can write is ``disk_mb`` plus 1 MiB of ``/dev/shm``.

    Example:
        >>> run_program("print(int(input()) * 2)", stdin="21\\n").stdout
        '42\\n'
        >>> run_program("def f(x):\\n    return [x, (x,)]", calls=["f(2)"]).values
        [('ok', [2, (2,)])]
    """
    cpu = int(cpu_seconds if cpu_seconds is not None else int(timeout + 0.999) + 1)
    return _execute(
        _runtime(), code, stdin, timeout, memory_mb, cpu, max_output_bytes, file_size_mb, max_processes,
        max_open_files, calls, disk_mb,
    )  # fmt: skip


def _execute(rt, code, stdin, timeout, memory_mb, cpu, cap, file_size_mb, nproc, nofile, calls, disk_mb) -> SandboxResult:
    t0 = time.monotonic()
    uid = _UIDS.acquire() if rt.drop_privileges else -1
    outer = tempfile.mkdtemp(prefix="r1v2-sandbox-")
    work = os.path.join(outer, "work")
    proc = None
    res_r = res_w = -1
    try:
        os.mkdir(work, 0o700)
        main = os.path.join(work, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(code)
        calls_path = ""
        if calls is not None:
            calls_path = os.path.join(work, "calls.json")
            with open(calls_path, "w", encoding="utf-8") as f:
                json.dump(list(calls), f)
        res_r, res_w = os.pipe()
        limits = [str(memory_mb * 2**20), str(cpu), str(file_size_mb * 2**20), str(nproc), str(nofile)]
        if rt.bwrap:
            # The job's uid (as root) must read main.py: 0o755 / 0o644, the outer folder stays ours.
            os.chmod(outer, 0o711)
            os.chmod(work, 0o755)
            for p in (main, calls_path):
                if p:
                    os.chmod(p, 0o644)
            inner = "/tmp"
            argv = []
            if uid >= 0:
                argv = [rt.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            argv += [rt.bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
            for b in rt.binds:
                argv += ["--ro-bind", b, b]
            for target, link in rt.symlinks:
                argv += ["--symlink", target, link]
            argv += [
                "--proc", "/proc", "--dev", "/dev", "--size", str(_SHM_BYTES), "--tmpfs", "/dev/shm",
                "--size", str(disk_mb * 2**20), "--tmpfs", inner, "--ro-bind", main, inner + "/main.py",
            ]  # fmt: skip
            if calls_path:
                argv += ["--ro-bind", calls_path, inner + "/calls.json"]
            argv += ["--remount-ro", "/", "--chdir", inner, "--clearenv"]
            for k, v in {**_ENV_BASE, "HOME": inner, "TMPDIR": inner}.items():
                argv += ["--setenv", k, v]
            argv += ["--", rt.python, "-I", "-S", "-c", _PRELUDE, inner, *limits, "-1", "-1", ""]
            argv += [str(res_w), inner + "/calls.json" if calls_path else ""]
            cwd, env = outer, {}
        else:
            if uid >= 0:
                os.chown(work, uid, uid)
                os.chown(main, uid, uid)
                os.chmod(outer, 0o711)  # traversable, not writable nor listable by the child
            else:
                os.chmod(outer, 0o555)
            argv = [
                *rt.prefix, rt.python, "-I", "-S", "-c", _PRELUDE, work, *limits, str(uid), str(uid),
                ",".join(rt.preimport), str(res_w), calls_path,
            ]  # fmt: skip
            cwd, env = work, {**_ENV_BASE, "HOME": work, "TMPDIR": work}
        with tempfile.TemporaryFile() as stdin_f:
            stdin_f.write(stdin.encode("utf-8"))
            stdin_f.seek(0)
            proc = subprocess.Popen(
                argv, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                start_new_session=True, close_fds=True, pass_fds=(res_w,),
            )  # fmt: skip
        os.close(res_w)
        res_w = -1
        out, err, raw, reason, truncated = _supervise(proc, res_r, t0 + timeout, cap, rt, uid)
        rc = proc.wait()
        if rt.bwrap and rc is not None and rc > 128 and reason is None:
            rc = -(rc - 128)  # bwrap exits with 128 + N when the job died of signal N
        if reason is None and rc is not None and rc < 0:
            sig = -rc
            reason = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "file_size_limit"}.get(sig, f"signal:{_signame(sig)}")
        return SandboxResult(
            ok=(rc == 0 and reason is None),
            returncode=rc,
            stdout=out.decode("utf-8", errors="replace"),
            stderr=err.decode("utf-8", errors="replace"),
            timed_out=(reason == "timeout"),
            killed_reason=reason,
            truncated=truncated,
            wall_s=time.monotonic() - t0,
            uid=uid if uid >= 0 else None,
            values=None if calls is None else decode_values(raw, len(calls)),
            isolation=rt.mode,
        )
    finally:
        for fd in (res_r, res_w):
            if fd >= 0:
                os.close(fd)
        if proc is not None and proc.returncode is None:
            _kill_all(proc, rt, uid)
            proc.wait()
        if uid >= 0:
            if not rt.bwrap:
                _remove_files_of(uid)
            _UIDS.release(uid)
        _rmtree(outer)


_MAX_DEPTH = 64


def decode_values(raw: bytes, n: int) -> list[tuple[str, object]]:
    """The child's result lines -> ``n`` outcomes; anything but lines ``0..n-1`` in order voids them all.

    Each line is ``[i, "ok", encoded value]`` or ``[i, "error", type name]``; a value is JSON with
    tagged objects for what JSON lacks: ``{"t": [...]}`` tuple, ``{"d": [[k, v], ...]}`` dict,
    ``{"s": [...]}`` set, ``{"f": "nan"}`` non-finite float. A job killed part-way keeps the
    lines written before (the rest are ``missing``).
    """
    missing: list[tuple[str, object]] = [("missing", None)] * n
    out: list[tuple[str, object]] = []
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        lines.pop()  # a line cut by a kill
    if len(lines) > n:
        return missing
    for i, line in enumerate(lines):
        try:
            item = json.loads(line)
            ok = isinstance(item, list) and len(item) == 3 and type(item[0]) is int and item[0] == i
            if not ok or item[1] not in ("ok", "error"):
                return missing
            if item[1] == "error":
                if not isinstance(item[2], str):
                    return missing
                out.append(("error", item[2][:100]))
            else:
                out.append(("ok", _plain(item[2], 0)))
        except (ValueError, TypeError, RecursionError):
            return missing
    return out + missing[len(out):]


def _plain(x, depth: int):
    if depth > _MAX_DEPTH:
        raise ValueError("too deep")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [_plain(v, depth + 1) for v in x]
    if t is dict and len(x) == 1:
        (tag, v), = x.items()
        if tag == "f" and v in ("nan", "inf", "-inf"):
            return float(v)
        if type(v) is list:
            if tag == "t":
                return tuple(_plain(e, depth + 1) for e in v)
            if tag == "s":
                return {_plain(e, depth + 1) for e in v}
            if tag == "d" and all(type(p) is list and len(p) == 2 for p in v):
                return {_plain(k, depth + 1): _plain(e, depth + 1) for k, e in v}
    raise ValueError(f"not an encoded value: {t.__name__}")


def _supervise(proc, res_fd, deadline, cap, rt, uid) -> tuple[bytes, bytes, bytes, str | None, bool]:
    """Read the pipes (bounded) until the leader exits, the deadline passes or output overflows."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), res_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    try:
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = None
    reason, truncated, exited = None, False, False

    def take(fd) -> bool:
        """Read once from ``fd``; False at end of file. Sets ``truncated`` past the cap."""
        nonlocal truncated
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        buf = bufs[fd]
        room = cap - len(buf)
        buf += data[:room]
        if len(data) > room:
            truncated = True
        return True

    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                reason = "timeout"
                break
            wait = deadline - now if pidfd is not None else min(deadline - now, 0.02)
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd == pidfd:
                    exited = True
                    sel.unregister(fd)
                    continue
                if not take(fd):
                    sel.unregister(fd)
                if truncated:
                    reason = "output_limit"
            if reason is not None:
                break
            if pidfd is None and not exited:
                exited = _exited_unreaped(proc.pid)
            if exited:
                break
        # The leader is gone or must go: kill its group (and stray processes of its uid), then drain.
        _kill_all(proc, rt, uid)
        if reason is None:
            end = time.monotonic() + 0.2
            pipes = [k.fd for k in sel.get_map().values() if k.fd in bufs]
            while pipes and time.monotonic() < end:
                for key, _ in sel.select(end - time.monotonic()):
                    if key.fd in bufs and not take(key.fd):
                        sel.unregister(key.fd)
                        pipes.remove(key.fd)
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[res_fd]), reason, truncated


def _exited_unreaped(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    except ChildProcessError:
        return True


def _kill_all(proc, rt: _Runtime, uid: int) -> None:
    """SIGKILL the process group (leader not yet reaped, so the id is still ours) and the job's uid.

    Under bubblewrap, killing bwrap kills the job's PID namespace (``--die-with-parent``), and
    no process can leave that namespace, so there is no uid-wide sweep.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid >= 0 and rt.kill_bin and not rt.bwrap:
        # kill(-1) as the job's uid: every process of that uid, atomically, and nothing else.
        # Through setpriv when there is one: Popen(user=...) cannot use vfork, and forking a
        # large trainer process costs several milliseconds.
        io = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if rt.setpriv:
            argv = [rt.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", rt.kill_bin, "-9", "-1"]
            subprocess.run(argv, env={}, cwd="/", timeout=10, **io)
        else:
            argv = [rt.kill_bin, "-9", "-1"]
            subprocess.run(argv, user=uid, group=uid, extra_groups=[], env={}, cwd="/", timeout=10, **io)


_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def _remove_files_of(uid: int) -> None:
    """Legacy mode as root: delete what the job's uid left in the world-writable folders."""
    for top in _SHARED_DIRS:
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    _rmtree(e.path)
                else:
                    os.unlink(e.path)
            except OSError:
                pass


def _rmtree(path: str) -> None:
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        try:
            func(p)
        except OSError:
            pass

    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, onerror=fix)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


class SandboxPool:
    """Runs many programs at once: a thread pool in which each job waits on its own child process.

    ``defaults`` are ``run_program`` keyword arguments applied to every job (per-job ones win).

    Example:
        >>> with SandboxPool(workers=4) as pool:
        ...     [r.stdout for r in pool.map(["print(1)", ("print(input())", "x\\n")])]
        ['1\\n', 'x\\n']
    """

    def __init__(self, workers: int | None = None, **defaults):
        self.workers = int(workers or min(8, os.cpu_count() or 1))
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.defaults = defaults
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
            return self._executor

    def submit(self, code: str, stdin: str = "", **kwargs) -> Future:
        """Schedule one program; the future's result is a :class:`SandboxResult`."""
        return self._pool().submit(run_program, code, stdin, **{**self.defaults, **kwargs})

    def call(self, fn, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on a pool thread (a job that runs programs and checks budgets)."""
        return self._pool().submit(fn, *args, **kwargs)

    def map(self, programs: Iterable[str | tuple[str, str] | dict], **kwargs) -> list[SandboxResult]:
        """Run every program (``code``, ``(code, stdin)`` or a dict of ``run_program`` kwargs), in order."""
        futures = []
        for p in programs:
            if isinstance(p, str):
                job = {"code": p}
            elif isinstance(p, dict):
                job = dict(p)
            else:
                job = {"code": p[0], "stdin": p[1]}
            futures.append(self._pool().submit(run_program, **{**self.defaults, **kwargs, **job}))
        return [f.result() for f in futures]

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"workers": self.workers, "defaults": self.defaults}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["workers"], **state["defaults"])


_DEFAULT_POOL: SandboxPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
    """The process-wide pool ``code_reward`` uses (``min(8, cpu_count)`` workers), made on first use."""
    global _DEFAULT_POOL
    with _DEFAULT_POOL_LOCK:
        if _DEFAULT_POOL is None:
            _DEFAULT_POOL = SandboxPool()
        return _DEFAULT_POOL
