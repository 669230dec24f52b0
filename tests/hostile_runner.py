"""The 'trainer' of tests/test_code_reward_hostile.py: scores a JSONL of completions with code_reward.

Run: ``python tests/hostile_runner.py DATA.jsonl`` with ``R1V2_SECRET`` in the environment. It
holds the secret token in its environment, its command line names the data file (which holds the
token as expected outputs), and it serves the token on a TCP port and a unix socket; prints one
JSON object ``{"scores": {id: score}, "port": ..., "alive": true}``. Imports only the reward code
(no torch), so a normal user can run it with the system Python.
"""
import json
import os
import socket
import sys
import threading
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_code_reward():
    for name, sub in (("lightning_r1v2", ""), ("lightning_r1v2.rewards", "rewards"), ("lightning_r1v2.data", "data")):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(ROOT, "lightning_r1v2", sub)]
        sys.modules[name] = mod
    from lightning_r1v2.rewards.code import code_reward

    return code_reward


def serve(sock, token):
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.sendall(token.encode() + b"\n")


def main():
    data = sys.argv[1]
    token = os.environ["R1V2_SECRET"]
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    port = tcp.getsockname()[1]
    unix_path = os.path.join(os.path.dirname(data), "token.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen(16)
    for s in (tcp, unix):
        threading.Thread(target=serve, args=(s, token), daemon=True).start()
    with open(data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:  # the probes read where to knock from their input
        for t in r["tests"]:
            if "input" in t:
                t["input"] = t["input"].replace("PORT", str(port)).replace("UNIX", unix_path)
    code_reward = import_code_reward()
    scores = code_reward([r["completion"] for r in rows], tests=[r["tests"] for r in rows], timeout=3.0)
    print(json.dumps({"scores": {r["id"]: s for r, s in zip(rows, scores)}, "port": port, "alive": True}))


if __name__ == "__main__":
    main()
