"""What this machine charges a lone request before any of our code runs: waking processes that were idle.

    .venv/bin/python benchmarks/wake.py [--rounds 3] [--requests 400] [--idle-ms 5]

A lone request (`perf.py`'s `tiny` c=1) crosses five processes (client, gate, MOSEC's controller, the score
worker, OpenVINO's threads), each asleep since the request before. On a virtual machine a sleeping vCPU is
halted and its caches are another guest's by the time it wakes, so each wake-up costs more than the same work
done back to back. This measures that cost on three things that contain none of rerankctl's code, each back to
back and after ``--idle-ms`` of idleness (what a lone request's processes see: the model's call takes ~4-20 ms):

* ``tcp``: a 300-byte ping-pong between two processes over loopback TCP (one wake-up each way);
* ``mosec``: the same bytes through MOSEC's controller and one Python worker that returns them (MOSEC's own
  transport: HTTP in, the worker's socket out and back, HTTP out; a worker that does nothing);
* ``python``: a fixed piece of Python work (a dict of 200 strings to JSON) in this process, its first call
  after the idle time against a call right after another (the caches refilled, not a wake-up).

``--mosec-env NAME=VALUE``: a second MOSEC echo with that in its environment, measured in the same rounds
(MOSEC's controller on one tokio thread: ``TOKIO_WORKER_THREADS=1``).

Medians per round, the rounds interleaved (the machine drifts); prints the CPU it ran on. Nothing here is a
target: it is the floor to read `perf.py`'s `tiny` c=1 "added" against (benchmarks/HISTORY.md).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

PAYLOAD = b"x" * 300


def _echo_tcp(port: int) -> None:
    """The far end of the ping-pong: echoes what it reads on one connection until it closes."""
    srv = socket.create_server(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)


def _python_work() -> str:
    return json.dumps({i: str(i) for i in range(200)})


def _timed(fn, n: int, idle_s: float) -> list[float]:
    """``n`` calls of ``fn``, each after ``idle_s`` of sleep (none: back to back); seconds each."""
    out = []
    for _ in range(n):
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--tcp-echo":
        _echo_tcp(int(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400, help="per path, per round, per mode")
    ap.add_argument("--idle-ms", type=float, default=5.0)
    ap.add_argument("--mosec-env", action="append", default=[], metavar="NAME=VALUE",
                    help="also a second MOSEC echo with this in its environment, in the same rounds (repeatable:"
                         " all go to that one server), e.g. TOKIO_WORKER_THREADS=1")
    args = ap.parse_args()
    extra_env = dict(kv.split("=", 1) for kv in args.mosec_env)

    import http.client
    import os

    from conftest import free_port, wait_until
    from perf import _cpu_flags, _cpu_name

    idle = args.idle_ms / 1000
    procs: list[subprocess.Popen] = []

    def connect(port: int) -> socket.socket | None:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=0.5)
        except OSError:
            return None

    def start_mosec(env: dict[str, str]):
        """A MOSEC echo with ``env`` added to its environment, up and answering: its one-request function."""
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(HERE / "wake_echo.py"), "--port", str(port), "--address",
                                 "127.0.0.1", "--timeout", "10000"], env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)

        def up() -> socket.socket | None:
            if proc.poll() is not None:
                raise SystemExit(f"MOSEC's echo exited {proc.returncode}")
            return connect(port)

        wait_until(up, 60, interval=0.1, what="MOSEC's echo").close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def once() -> None:
            conn.request("POST", "/echo", PAYLOAD)
            resp = conn.getresponse()
            if resp.status != 200 or resp.read() != PAYLOAD:
                raise SystemExit(f"MOSEC's echo answered {resp.status}")

        return once

    try:
        tcp_port = free_port()
        procs.append(subprocess.Popen([sys.executable, __file__, "--tcp-echo", str(tcp_port)]))
        tcp = wait_until(lambda: connect(tcp_port), 30, interval=0.05, what="the TCP echo")
        tcp.settimeout(10)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def tcp_once() -> None:
            tcp.sendall(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                chunk = tcp.recv(65536)
                if not chunk:
                    raise SystemExit("the TCP echo closed")
                got += len(chunk)

        paths = {"tcp": tcp_once, "mosec": start_mosec({}), "python": _python_work}
        labels = {"tcp": "TCP ping-pong, two processes", "mosec": "MOSEC echo (controller + one Python worker)",
                  "python": "200-key dict to JSON, first call"}
        if extra_env:
            paths["mosec+env"] = start_mosec(extra_env)
            labels["mosec+env"] = "the same, " + " ".join(args.mosec_env)
        for fn in paths.values():
            _timed(fn, 50, 0)  # warm-up
        rows: dict[str, dict[str, list[float]]] = {p: {"warm": [], "idle": []} for p in paths}
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            for name in order:
                for mode, gap in (("warm", 0.0), ("idle", idle)):
                    rows[name][mode].append(statistics.median(_timed(paths[name], args.requests, gap)))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    print(f"CPU: {_cpu_name()} ({_cpu_flags()}); {args.rounds} rounds of {args.requests}; idle {args.idle_ms:g} ms\n")
    print(f"| path | back to back, us | after {args.idle_ms:g} ms idle, us | added by the idle time, us |")
    print("|---|---|---|---|")
    report = {}
    for name, m in rows.items():
        warm, cold = statistics.median(m["warm"]), statistics.median(m["idle"])
        report[name] = {"warm_us": round(warm * 1e6, 1), "idle_us": round(cold * 1e6, 1),
                        "rounds_warm_us": [round(v * 1e6, 1) for v in m["warm"]],
                        "rounds_idle_us": [round(v * 1e6, 1) for v in m["idle"]]}
        print(f"| {labels[name]} | {warm * 1e6:.0f} | {cold * 1e6:.0f} | {(cold - warm) * 1e6:+.0f} |")
    print("\n" + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
