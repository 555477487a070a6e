"""What one hostile request costs the supervisor: memory held and the longest stall of its event loop.

    .venv/bin/python benchmarks/hostile.py [--rounds 3]

Starts `rerankctl serve --daemon` with the tests' tiny model and, per round, sends the split-amplification
request of issue 31: a ~200 KiB body with a 49 000-emoji query and 1 000 one-letter documents (the query
limit is raised so the request is scored, not refused: the point is what splitting it costs). Meanwhile a
thread asks the health port's ``/live`` every 5 ms: the slowest answer is the longest time the supervisor's
loop (health included) was blocked. Prints, per round, the supervisor's RSS before, at its peak while the
request is served (sampled every 5 ms) and after, the request's status and time, and the slowest /live.
Memory and stalls depend on the gate's code, not on the model: run it on any CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def amplifier() -> bytes:
    return json.dumps({"query": "😀" * 49_000, "documents": ["a"] * 1000}, ensure_ascii=False).encode()


class Sampler:
    """Samples the supervisor's RSS and the latency of /live every 5 ms until stopped."""

    def __init__(self, pid: int, health: str) -> None:
        self.proc = psutil.Process(pid)
        self.url = health + "/live"
        self.rss: list[int] = []
        self.live: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss, daemon=True),
                         threading.Thread(target=self._live, daemon=True)]

    def _rss(self) -> None:
        while not self._stop.wait(0.005):
            self.rss.append(self.proc.memory_info().rss)

    def _live(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.wait(0.005):
                t0 = time.perf_counter()
                c.get(self.url)
                self.live.append(time.perf_counter() - t0)

    def __enter__(self) -> "Sampler":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from chaos import build_model
    from conftest import ServerHandle

    model = build_model(Path(tempfile.gettempdir()) / "rerankctl-chaos-model")
    server = ServerHandle(model, Path(tempfile.mkdtemp(prefix="hostile-")), max_query_chars=60_000,
                          request_timeout_s=120)
    server.start()
    body = amplifier()
    print(f"request: {len(body) / 1024:.0f} KiB, query 49 000 emoji, 1 000 documents")
    try:
        pid = server.pidfile()["pid"]
        proc = psutil.Process(pid)
        stalls = []
        for i in range(args.rounds):
            before = proc.memory_info().rss
            with Sampler(pid, server.health) as sampler, httpx.Client(timeout=300) as c:
                t0 = time.perf_counter()
                r = c.post(server.base + "/rerank", content=body, headers={"Content-Type": "application/json"})
                took = time.perf_counter() - t0
            after = proc.memory_info().rss
            peak = max(sampler.rss or [after])
            worst = max(sampler.live or [0.0])
            stalls.append(worst)
            print(f"round {i + 1}: {r.status_code} in {took:.1f}s; supervisor RSS {before / 2**20:.0f} -> peak"
                  f" {peak / 2**20:.0f} (+{(peak - before) / 2**20:.0f}) -> {after / 2**20:.0f} MiB;"
                  f" /live: median {statistics.median(sampler.live) * 1e3:.1f} ms, slowest {worst * 1e3:.0f} ms"
                  f" of {len(sampler.live)}")
        print(f"slowest /live over the rounds: median {statistics.median(stalls) * 1e3:.0f} ms")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
