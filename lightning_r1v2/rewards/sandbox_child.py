"""The child side of the sandbox (:mod:`lightning_r1v2.rewards.sandbox`), run as ``python -I -S -c <this file>``.

Never imported: the parent reads this file and passes its text. argv: work mem cpu fsize nproc
nofile uid gid preimports result_fd calls_path. Before the user's program: resource limits, the
uid drop (legacy mode as root), the audit hook. After it: each call evaluated and its value
written as plain data, one JSON line per call, to ``result_fd`` (the trainer decodes and
compares; see ``decode_values``). Everything here is reachable by the program once it runs, so
nothing here decides a verdict.
"""
import json
import os
import resource
import sys


def _setup():
    a = sys.argv
    work = a[1]
    mem, cpu, fsize, nproc, nofile, uid, gid = (int(x) for x in a[2:9])
    R = resource
    def lim(kind, soft, hard=None):
        hard = soft if hard is None else hard
        _, cur = R.getrlimit(kind)
        if cur != R.RLIM_INFINITY and os.geteuid() != 0:
            hard = min(hard, cur)
            soft = min(soft, hard)
        R.setrlimit(kind, (soft, hard))
    if mem > 0:
        lim(R.RLIMIT_AS, mem)
    lim(R.RLIMIT_CPU, cpu, cpu + 1)
    lim(R.RLIMIT_FSIZE, fsize)
    lim(R.RLIMIT_CORE, 0)
    lim(R.RLIMIT_NPROC, nproc)
    lim(R.RLIMIT_NOFILE, nofile)
    if uid >= 0:
        for m in a[9].split(","):
            if m:
                try:
                    __import__(m)
                except Exception:
                    pass
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
            os._exit(70)
    os.umask(0o077)
    os.environ.pop("PWD", None)
    import re, stat, signal
    proc_re = re.compile(r"^/proc/(\d+)(/|$)")
    me = str(os.getpid())
    W = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, fsdecode, readlink, sep, os_stat = os.path.realpath, os.fsdecode, os.readlink, os.sep, os.stat
    blocked = frozenset((
        "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
        "subprocess.Popen", "os.killpg", "os.link", "socket.connect", "socket.bind",
        "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname", "os.pidfd_open",
    ))
    # event -> ((index of a path argument, index of its dir_fd argument or None), ...), as CPython 3.11 audits them
    paths = {
        "os.remove": ((0, 1),), "os.rename": ((0, 2), (1, 3)), "os.mkdir": ((0, 2),),
        "os.rmdir": ((0, 1),), "os.symlink": ((1, 2),), "os.truncate": ((0, None),),
        "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
        "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),), "shutil.move": ((1, None),),
    }
    def resolve(p, dir_fd=None):
        p = fsdecode(p)
        if dir_fd is not None and not p.startswith(sep):
            p = readlink("/proc/self/fd/%d" % dir_fd) + sep + p
        return realpath(p)
    def within(r):
        return r == work or r.startswith(work + sep)
    def inside(p, dir_fd=None):
        if isinstance(p, int):
            return True
        try:
            r = resolve(p, dir_fd)
        except Exception:
            return False
        return within(r) or r == "/dev/null"
    def deny(event):
        raise PermissionError("sandbox: %s is not allowed" % event)
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & W)
            if writing and not inside(path):
                deny("writing outside the working directory")
            try:
                r = resolve(path)
            except Exception:
                return
            m = proc_re.match(r)
            if m and m.group(1) != me:
                deny("reading another process's /proc entry")
            if not writing and not within(r):
                try:
                    is_dir = stat.S_ISDIR(os_stat(r).st_mode)
                except OSError:
                    is_dir = False
                if is_dir:
                    deny("opening a directory outside the working directory")
        elif event in blocked:
            deny(event)
        elif event == "import" and args[0] == "_posixsubprocess":
            deny("process creation (_posixsubprocess)")
        elif event == "os.kill":
            if args[0] != int(me):
                deny("signalling another process")
        elif event in paths:
            for i, fd_at in paths[event]:
                dir_fd = args[fd_at] if fd_at is not None and fd_at < len(args) else None
                if not isinstance(dir_fd, int) or isinstance(dir_fd, bool) or dir_fd < 0:
                    dir_fd = None  # CPython passes -1 for "no dir_fd"
                if i < len(args) and not inside(args[i], dir_fd):
                    deny(event + " outside the working directory")
    sys.addaudithook(hook)
    def no_pidfd_signal(*_a, **_k):
        deny("signal.pidfd_send_signal")
    signal.pidfd_send_signal = no_pidfd_signal
    calls = []
    if a[11]:
        with open(a[11], encoding="utf-8") as f:
            calls = [compile(c, "<test %d>" % i, "eval") for i, c in enumerate(json.load(f))]
    return int(a[10]), calls


def _harness(fd, calls, dumps=json.dumps, write=os.write, T=type, ev=eval, isfinite=__import__("math").isfinite):
    def enc(x, depth):
        t = T(x)
        if depth > 64:
            raise ValueError("nested deeper than 64")
        if x is None or t is bool or t is int or t is str:
            return x
        if t is float:
            return x if isfinite(x) else {"f": repr(x)}
        if t is list:
            return [enc(v, depth + 1) for v in x]
        if t is tuple:
            return {"t": [enc(v, depth + 1) for v in x]}
        if t is dict:
            return {"d": [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in x.items()]}
        if t is set or t is frozenset:
            return {"s": [enc(v, depth + 1) for v in x]}
        raise TypeError("not plain data: " + t.__name__)
    def emit(line):
        b = (line + "\n").encode()
        while b:
            b = b[write(fd, b):]
    def run(g):
        for i, c in enumerate(calls):
            try:
                line = dumps([i, "ok", enc(ev(c, g), 0)])
            except BaseException as e:
                try:
                    line = dumps([i, "error", T(e).__name__])
                except BaseException:
                    line = dumps([i, "error", "?"])
            emit(line)
    return run


if __name__ == "__main__":
    _fd, _calls = _setup()
    del _setup
    sys.argv = ["main.py"]
    with open("main.py", "rb") as _f:
        _code = compile(_f.read(), "main.py", "exec")
    del _f
    _run_calls = _harness(_fd, _calls)
    del _harness, _fd, _calls
    _g = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "main.py"}
    exec(_code, _g)
    _run_calls(_g)
