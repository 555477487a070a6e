"""Two models: in one server (RERANKER_MODELS) against two servers, one per model (issue 38).

    .venv/bin/python benchmarks/models.py [--rounds 3] [--seconds 10] [--shape dity] [--out bench-results]
                                          [--threads N] [--only one|two]

Two random models of the shape asked (DiTy's by default; speed and memory depend on shape only), in two
folders of their own (no file shared: each is its own model, as a Russian and a multilingual one would be),
served at FP32 with one score worker each, in each of --rounds rounds, in alternating order:

* **one server** of both models, and **two servers** started at once (two pods, or two units, starting
  together): the start time (``serve --daemon`` until every model answers its canary; for two servers until
  both do), and the PSS of every process after real traffic to both models (rag, then passages past the
  window), per model where one server has several;
* **across models**: model B's short requests at concurrency 1 alone, then while model A serves long
  requests at concurrency 2: B's p95 together over alone. By default every model's workers get
  ``cores / its workers`` threads in both (each may use every core; busy together, they share them);
  ``--threads N`` gives every worker N threads (RERANKER_THREADS: ``--threads 1`` splits two cores between
  two models); ``--only one|two`` measures one of the two.

Every figure is the median of the rounds with its spread; nothing here is a target of the issue's but the
report, which goes to ``benchmarks/HISTORY.md`` with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from perf import MEMORY_SETTLE_S, Server, _cpu_flags, _cpu_name, cli, model_of_shape  # noqa: E402

SETTINGS = dict(probe_interval_s=2, worker_hang_s=120)


def traffic(srv: Server, seconds: float, names: list[str]) -> None:
    for name in names:
        srv.bench("--workload", "rag", "-c", "2", "-z", str(seconds), "--warmup", "1", "--model-name", name)
        srv.bench("--workload", "wide", "-c", "2", "-z", str(seconds), "--warmup", "0", "--model-name", name)


def p95_short(srv: Server, name: str, seconds: float) -> float:
    served = srv.bench("--workload", "short", "-c", "1", "-z", str(seconds), "--model-name", name)["served"]
    if served["ok"] != served["requests"]:
        raise SystemExit(f"{name}: {served['requests'] - served['ok']} short requests failed: {served['codes']}")
    return served["latency_ms"]["p95"]


def p95_short_beside_long(short: Server, name_b: str, long: Server, name_a: str, seconds: float) -> float:
    """B's short requests while A's long ones run (A's load started first, ended after)."""
    proc = subprocess.Popen([sys.executable, "-m", "reranker_ops", "bench", "--url", long.url, "--workload", "long",
                             "-c", "2", "-z", str(seconds + 6), "--warmup", "0", "--model-name", name_a,
                             "--timeout", "900"], env=long.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)  # a benchmark's ramp: A's long requests are being scored before B's are measured
        return p95_short(short, name_b, seconds)
    finally:
        proc.wait(timeout=seconds + 600)


def one_server(a: Path, b: Path, out: Path, seconds: float) -> dict:
    with Server(a, out / "run-one", models=f"{a}, {b}", **SETTINGS) as srv:
        started = srv.start_seconds
        names = [m["model"] for m in srv.status()["models"]]
        alone = p95_short(srv, names[1], seconds)
        beside = p95_short_beside_long(srv, names[1], srv, names[0], seconds)
        traffic(srv, seconds, names)
        time.sleep(MEMORY_SETTLE_S)  # a benchmark, not a test: measured at rest, after the workers' trim
        st = srv.status()
        return {"start_s": started, "pss_mib": st["total_pss_bytes"] / 2**20,
                "per_model_mib": {m["model"]: (m["pss_bytes"] or 0) / 2**20 for m in st["models"]},
                "short_p95_alone_ms": alone, "short_p95_beside_ms": beside, "cross_ratio": beside / alone}


def two_servers(a: Path, b: Path, out: Path, seconds: float) -> dict:
    sa, sb = Server(a, out / "run-a", **SETTINGS), Server(b, out / "run-b", **SETTINGS)
    errors: list[BaseException] = []

    def start(srv: Server) -> None:
        try:
            srv.__enter__()
        except BaseException as exc:  # noqa: BLE001 - reported after both
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=start, args=(s,)) for s in (sa, sb)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    started = time.perf_counter() - t0
    try:
        if errors:
            raise SystemExit(f"a server did not start: {errors[0]}")
        na, nb = sa.status()["model"], sb.status()["model"]
        alone = p95_short(sb, nb, seconds)
        beside = p95_short_beside_long(sb, nb, sa, na, seconds)
        traffic(sa, seconds, [na])
        traffic(sb, seconds, [nb])
        time.sleep(MEMORY_SETTLE_S)
        pss = [s.status()["total_pss_bytes"] / 2**20 for s in (sa, sb)]
        return {"start_s": started, "pss_mib": sum(pss), "per_model_mib": {na: pss[0], nb: pss[1]},
                "short_p95_alone_ms": alone, "short_p95_beside_ms": beside, "cross_ratio": beside / alone}
    finally:
        for s in (sa, sb):
            cli(["stop"], s.env, timeout=120)


def med(rows: list[dict], key: str) -> str:
    xs = [r[key] for r in rows]
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--shape", default="dity")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--threads", type=int, default=0, help="OpenVINO threads per worker (0: each server's rule)")
    ap.add_argument("--only", choices=("one", "two"), default=None)
    args = ap.parse_args()
    if args.threads:
        SETTINGS["threads"] = args.threads
    args.out.mkdir(parents=True, exist_ok=True)
    a = model_of_shape(args.out, args.shape, ("fp32",))
    b = args.out / f"{a.name}-b"  # the same shape, files of its own
    if not (b / "openvino-fp32" / "manifest.json").is_file():
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(a, b)
    rows: dict[str, list[dict]] = {name: [] for name in ("one server, two models", "two servers")
                                   if args.only is None or name.startswith(args.only)}
    for i in range(args.rounds):
        order = list(rows) if i % 2 == 0 else list(reversed(rows))
        for name in order:
            print(f"round {i + 1}: {name} ...", flush=True)
            fn = one_server if name.startswith("one") else two_servers
            rows[name].append(fn(a, b, args.out, args.seconds))
    threads = f"{args.threads} threads per worker" if args.threads else "threads: each server's rule"
    print(f"\nCPU: {_cpu_name()} ({_cpu_flags()}); shape {args.shape}, FP32, one score worker per model, {threads};"
          f" {args.rounds} rounds, median (min–max)\n")
    print("| | start s | PSS MiB after load | B short p95 alone ms | beside A's long ms | ratio |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        print(f"| {name} | {med(rs, 'start_s')} | {med(rs, 'pss_mib')} | {med(rs, 'short_p95_alone_ms')} | "
              f"{med(rs, 'short_p95_beside_ms')} | {med(rs, 'cross_ratio')} |")
    one, two = rows.get("one server, two models"), rows.get("two servers")
    if one and two:
        print(f"\none server / two servers: memory {statistics.median(r['pss_mib'] for r in one) / statistics.median(r['pss_mib'] for r in two):.3f},"
              f" start {statistics.median(r['start_s'] for r in one) / statistics.median(r['start_s'] for r in two):.3f}")
    if one:
        print("per model in one server (MiB):", {k: round(v) for k, v in one[-1]["per_model_mib"].items()})
    (args.out / "models.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
