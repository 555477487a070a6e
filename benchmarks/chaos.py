"""Chaos under load: faults injected into a served model while clients keep sending requests.

    .venv/bin/python benchmarks/chaos.py [--minutes 5] [--every 20] [--concurrency 8] [--workers 2]
    .venv/bin/python benchmarks/chaos.py --soak --minutes 30 --concurrency 1   # the leak soak

Starts `rerankctl serve --daemon` with the tests' tiny model (built and converted here; faults are about
supervision, not speed), sends steady load, and every ~``--every`` seconds injects one random fault:
SIGSTOP or SIGKILL of a score worker, SIGKILL of MOSEC's main process, or
a native hang inside forward (SIGALRM blocked, via tests/faults); every kind once per round, in random order. Per fault it prints: detection time
(until the supervisor counted a remediation), time to full capacity (every worker back and healthy),
requests failed, the longest request. At the end: processes leaked after stop (must be 0) and the
supervisor's RSS growth. ``--soak`` injects nothing and reports RSS growth only.

Targets (checked; exit 1 when one is missed): detection <= 10 s (+ worker_hang_s for a hang), full
capacity <= 30 s, no request longer than its deadline (+2.5 s), leaked processes 0; soak: RSS growth
<= 2 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

SETTINGS = dict(probe_interval_s=1, probe_timeout_s=2, request_timeout_s=8, worker_hang_s=3, stop_timeout_s=10,
                restart_budget=1000, restart_window_s=60)
FAULTS = ("sigstop_score", "sigkill_score", "sigkill_mosec", "native_hang")


def build_model(cache: Path) -> Path:
    from reranker_ops.settings import Settings
    from reranker_ops.models.convert import convert
    from modelkit.synthetic import build_model as build

    model = cache / "tiny-model"
    if not (model / "openvino-fp32" / "manifest.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        build(model, shape="tiny", seed=0)
        convert(Settings(models_dir=cache, model=str(model)), str(model), formats=["openvino"], precision="fp32",
                bench_seconds=0.2)
    return model


class Load:
    def __init__(self, base: str, n: int, deadline: float) -> None:
        self.base, self.deadline = base, deadline
        self.records: list[tuple[float, float, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        body = {"query": "Как приготовить борщ?", "documents": ["Борщ — суп из свёклы.", "Завтра дождь."]}
        with httpx.Client(timeout=self.deadline + 10) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post(self.base + "/rerank", json=body)
                    out: object = r.status_code
                except httpx.HTTPError as exc:
                    out = type(exc).__name__
                self.records.append((t0, time.monotonic() - t0, out))
                if out != 200:
                    time.sleep(0.1)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--every", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--soak", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "rerankctl-chaos-model")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    from conftest import ServerHandle
    from reranker_ops.supervise.procs import instance_processes
    from reranker_ops.protocol.heartbeat import read_worker_dir

    model = build_model(args.cache)
    run_dir = Path(tempfile.mkdtemp(prefix="chaos-run-"))
    hang = run_dir.parent / f"{run_dir.name}-hang"
    server = ServerHandle(model, run_dir, workers=args.workers, **SETTINGS)
    server.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests" / "faults"),
                                                           os.environ.get("PYTHONPATH", "")) if p)
    server.env["RERANKER_TEST_HANG_FILE"] = str(hang)
    server.start()
    instance = server.pidfile()["instance"]
    sup = psutil.Process(server.pidfile()["pid"])
    load = Load(server.base, args.concurrency, SETTINGS["request_timeout_s"])
    load.start()
    rss0 = None
    rows = []
    pending: list[str] = []
    t_end = time.monotonic() + args.minutes * 60
    warm_until = time.monotonic() + (60 if args.soak else 10)

    def ready(stage: str) -> int:
        procs = server.processes()
        beats = read_worker_dir(run_dir / "workers")
        return sum(1 for pid in procs.get(stage, []) if beats.get(pid, {}).get("ready"))

    def full() -> bool:
        st = server.status()
        return bool(st.get("healthy")) and ready("score") == args.workers

    try:
        while time.monotonic() < t_end:
            if rss0 is None and time.monotonic() > warm_until:
                rss0 = sup.memory_info().rss
            if args.soak:
                time.sleep(min(10.0, max(0.0, t_end - time.monotonic())))
                continue
            time.sleep(max(0.0, args.every * rng.uniform(0.75, 1.25) - 0.0))
            if time.monotonic() > t_end:
                break
            deadline_full = time.monotonic() + 60
            while not full() and time.monotonic() < deadline_full:
                time.sleep(0.2)
            if not pending:  # every kind once per round, in a random order
                pending = rng.sample(FAULTS, len(FAULTS))
            kind = pending.pop()
            procs = server.processes()
            before = server.status()["restarts"]
            t0 = time.monotonic()
            if kind == "sigstop_score":
                victim = rng.choice(procs["score"])
                os.kill(victim, signal.SIGSTOP)
            elif kind == "sigkill_score":
                victim = rng.choice(procs["score"])
                os.kill(victim, signal.SIGKILL)
            elif kind == "sigkill_mosec":
                victim = procs["mosec"][0]
                os.kill(victim, signal.SIGKILL)
            else:
                victim = None
                hang.touch()
            detected = None
            while time.monotonic() - t0 < 60:
                now_r = server.status().get("restarts", {})
                if sum(now_r.values()) > sum(before.values()):
                    detected = time.monotonic() - t0
                    break
                if kind in ("sigkill_score",) and victim not in server.processes().get("score", []):
                    detected = time.monotonic() - t0  # MOSEC itself replaces a dead worker with a sibling alive
                    break
                time.sleep(0.1)
            while not full() and time.monotonic() - t0 < 90:
                time.sleep(0.2)
            capacity = time.monotonic() - t0 if full() else None
            Path(str(hang) + ".taken").unlink(missing_ok=True)
            hang.unlink(missing_ok=True)
            window = [r for r in load.records if r[0] >= t0 - SETTINGS["request_timeout_s"] and r[0] <= t0 + (capacity or 90)]
            failed = [r for r in window if r[2] != 200]
            longest = max((d for _, d, _ in window), default=0.0)
            rows.append({"fault": kind, "detect_s": detected, "full_capacity_s": capacity, "failed": len(failed),
                         "failed_kinds": sorted({str(o) for *_, o in failed}), "longest_s": round(longest, 2)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        load.stop()
        rss1 = sup.memory_info().rss if sup.is_running() else None
        server.cli("stop", "--timeout", "20", timeout=120)
        leaked = [p.pid for p in instance_processes(instance)]
        server.cli("stop", timeout=60)
        shutil.rmtree(run_dir, ignore_errors=True)

    ok = [r for r in load.records if r[2] == 200]
    print(f"\nrequests: {len(load.records)}, ok {len(ok)}, failed {len(load.records) - len(ok)};"
          f" longest {max((d for _, d, _ in load.records), default=0):.2f}s")
    growth = None if rss0 is None or rss1 is None else (rss1 - rss0) / 2**20
    print(f"supervisor RSS: start {rss0 / 2**20 if rss0 else float('nan'):.1f} MiB, growth "
          f"{growth if growth is not None else float('nan'):+.2f} MiB; leaked processes: {len(leaked)}")
    misses = []
    if leaked:
        misses.append(f"leaked processes {leaked}")
    if args.soak:
        if growth is None or growth > 2.0:
            misses.append(f"RSS growth {growth} MiB > 2")
    for r in rows:
        limit = 10 + (SETTINGS["worker_hang_s"] if r["fault"] == "native_hang" else 0)
        if r["detect_s"] is None or r["detect_s"] > limit:
            misses.append(f"{r['fault']}: detection {r['detect_s']} > {limit}s")
        if r["full_capacity_s"] is None or r["full_capacity_s"] > 30:
            misses.append(f"{r['fault']}: full capacity after {r['full_capacity_s']} > 30s")
        if r["longest_s"] > SETTINGS["request_timeout_s"] + 2.5:
            misses.append(f"{r['fault']}: a request took {r['longest_s']}s")
    if rows:
        print("\n| fault | n | detection s (median, max) | full capacity s (median, max) | failed (median, max) | longest s |")
        print("|---|---|---|---|---|---|")
        for kind in FAULTS:
            rs = [r for r in rows if r["fault"] == kind]
            if not rs:
                continue
            det = [r["detect_s"] for r in rs if r["detect_s"] is not None]
            cap = [r["full_capacity_s"] for r in rs if r["full_capacity_s"] is not None]
            fl = [r["failed"] for r in rs]
            print(f"| {kind} | {len(rs)} | {statistics.median(det):.1f}, {max(det):.1f} | "
                  f"{statistics.median(cap):.1f}, {max(cap):.1f} | {statistics.median(fl):g}, {max(fl)} | "
                  f"{max(r['longest_s'] for r in rs):.1f} |" if det and cap else f"| {kind} | {len(rs)} | missed |")
    print("\nTARGETS: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
