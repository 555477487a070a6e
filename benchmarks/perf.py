"""Reproduce the README's Performance table on this machine.

    .venv/bin/python benchmarks/perf.py [--seconds 60] [--out bench-results]

Builds (once) a randomly initialised model with DiTy's exact shape (speed and memory depend on shape
only), converts it to OpenVINO FP32, then measures side by side in one run:
  * rag at concurrency 4 and tiny at concurrency 10 and 1: served vs the in-process ceiling;
  * memory (PSS) of the whole process tree with 1 and 2 workers;
  * start time: `serve --daemon` to healthy vs OpenVINO alone reading and compiling the model;
  * two workers with OpenVINO's thread pinning off (ours) and on (OpenVINO's default).
Every figure is a median of the repeats; the targets are checked and printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(args: list[str], env: dict, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reranker_ops", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


class Server:
    def __init__(self, model: Path, run_dir: Path, **settings) -> None:
        self.port, self.hport = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
        # Throughput runs: a deadline no request here can reach (a rag request takes ~5 s of both cores;
        # four batched take ~20 s; a mixed one up to a minute). Deadlines are tested elsewhere.
        self.env.update(RERANKER_MODEL=str(model), RERANKER_RUN_DIR=str(run_dir), RERANKER_PORT=str(self.port),
                        RERANKER_HEALTH_PORT=str(self.hport), RERANKER_REQUEST_TIMEOUT_S="900",
                        RERANKER_PROBE_TIMEOUT_S="120",
                        **{f"RERANKER_{k.upper()}": str(v) for k, v in settings.items()})
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_seconds = 0.0

    def __enter__(self) -> "Server":
        t0 = time.perf_counter()
        res = cli(["serve", "--daemon"], self.env, timeout=900)
        self.start_seconds = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"serve failed: {res.stderr}")
        return self

    def __exit__(self, *exc) -> None:
        cli(["stop"], self.env, timeout=120)

    def status(self) -> dict:
        return json.loads(cli(["status", "--json"], self.env, timeout=60).stdout)

    def bench(self, *args: str) -> dict:
        res = cli(["bench", "--url", self.url, "--json", "--timeout", "900", *args], self.env, timeout=3600)
        if res.returncode != 0:
            raise SystemExit(f"bench failed: {res.stderr}")
        return json.loads(res.stdout)


def ov_compile_seconds(variant: Path, threads: int) -> float:
    code = (
        "import time,openvino as ov; t=time.perf_counter(); c=ov.Core();"
        f"m=c.read_model(r'{variant / 'openvino_model.xml'}');"
        f"c.compile_model(m,'CPU',{{'INFERENCE_NUM_THREADS':{threads},'ENABLE_CPU_PINNING':False,"
        "'PERFORMANCE_HINT':'LATENCY','INFERENCE_PRECISION_HINT':'f32'}); print(time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return float(out.stdout.strip())


def dity_model(out: Path) -> Path:
    """A random model with DiTy's exact shape under ``out``, converted to OpenVINO FP32 (built once)."""
    model = out / "dity-shaped"
    if not (model / "config.json").is_file():
        print("building a random model with DiTy's shape ...", flush=True)
        from reranker_ops.models.synthetic import build_model

        build_model(model, shape="dity")
    if not (model / "openvino-fp32" / "manifest.json").is_file():
        print("converting to OpenVINO FP32 (with parity check) ...", flush=True)
        res = cli(["convert", str(model), "--precision", "fp32", "--bench-seconds", "10"], dict(os.environ))
        if res.returncode != 0:
            raise SystemExit(res.stderr)
    return model


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = dity_model(args.out)
    variant = model / "openvino-fp32"
    cores = os.cpu_count() or 1
    results: dict = {"machine": {"cores": cores, "cpu": _cpu_name()}, "seconds": args.seconds}
    s = str(args.seconds)

    print("start time and memory (1 worker) ...", flush=True)
    starts, compiles = [], []
    for i in range(max(1, args.repeats)):
        compiles.append(ov_compile_seconds(variant, cores))
        with Server(model, args.out / f"run-start{i}") as srv:
            starts.append(srv.start_seconds)
            if i == 0:
                st = srv.status()
                results["memory_1_worker"] = {p["role"]: p["pss_bytes"] for p in st["processes"]}
                results["memory_1_worker"]["total"] = st["total_pss_bytes"]
                print("served workloads side by side with the ceiling ...", flush=True)
                results["rag_c4"] = srv.bench("--workload", "rag", "-c", "4", "-z", s, "--ceiling", "--warmup", "4")
                results["tiny_c10"] = srv.bench("--workload", "tiny", "-c", "10", "-z", s, "--ceiling", "--warmup", "10")
                results["tiny_c1"] = srv.bench("--workload", "tiny", "-c", "1", "-z", s, "--ceiling", "--warmup", "5")
                results["mixed_c4"] = srv.bench("--workload", "mixed", "-c", "4", "-z", s, "--warmup", "0")
    results["start"] = {"serve_daemon_s": median(starts), "openvino_read_compile_s": median(compiles),
                        "ratio": median(starts) / median(compiles)}

    with Server(model, args.out / "run-2w", workers=2) as srv:
        st = srv.status()
        results["memory_2_workers"] = {"total": st["total_pss_bytes"]}

    if not args.skip_scaling and cores >= 2:
        print("worker scaling: 1 vs 2 single-thread workers, pinning off and on ...", flush=True)
        scale = {}
        for name, kw in (("1w_1t", dict(workers=1, threads=1)),
                         ("2w_1t_unpinned", dict(workers=2, threads=1, pin_threads="false")),
                         ("2w_1t_pinned", dict(workers=2, threads=1, pin_threads="true"))):
            with Server(model, args.out / f"run-{name}", **kw) as srv:
                scale[name] = srv.bench("--workload", "rag", "-c", "4", "-z", s, "--warmup", "4")["served"]["pairs_per_s"]
        results["scaling_rag_pairs_per_s"] = scale

    (args.out / "perf.json").write_text(json.dumps(results, indent=2))
    report = render(results)
    (args.out / "perf.md").write_text(report)
    print(report)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def render(r: dict) -> str:
    rag, t10, t1 = r["rag_c4"], r["tiny_c10"], r["tiny_c1"]
    mib = 2**20
    lines = [
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; {r['seconds']:.0f} s per run; "
        "FP32, one worker with all cores, random model of DiTy's exact shape.",
        "",
        "| measure | served | in-process ceiling | ratio | target |",
        "|---|---|---|---|---|",
        f"| rag, c=4: pairs/s | {rag['served']['pairs_per_s']:.2f} | {rag['ceiling']['batched']['pairs_per_s']:.2f} | "
        f"{rag['ratios']['served_pairs_per_s_over_batched_ceiling']:.3f} | ≥ 0.95 |",
        f"| tiny, c=10: requests/s | {t10['served']['requests_per_s']:.2f} | {t10['ceiling']['batched']['requests_per_s']:.2f} | "
        f"{t10['ratios']['served_requests_per_s_over_batched_ceiling']:.3f} | ≥ 0.9 |",
        f"| tiny, c=10: p95 / p50 | {t10['served']['latency_ms']['p95']:.0f} / {t10['served']['latency_ms']['p50']:.0f} ms | | "
        f"{t10['served']['latency_ms']['p95'] / t10['served']['latency_ms']['p50']:.2f} | ≤ 2 |",
        f"| tiny, c=1: p50 latency | {t1['served']['latency_ms']['p50']:.1f} ms | {t1['ceiling']['single']['latency_ms_p50']:.1f} ms | "
        f"+{t1['ratios']['served_p50_minus_inprocess_ms']:.1f} ms | ≤ +10 ms |",
        f"| memory, 1 worker (PSS, whole tree) | {r['memory_1_worker']['total'] / mib:.0f} MiB | | | ≤ 1.4 GB |",
        f"| memory, 2 workers | {r['memory_2_workers']['total'] / mib:.0f} MiB "
        f"(+{(r['memory_2_workers']['total'] - r['memory_1_worker']['total']) / mib:.0f} MiB per worker) | | | |",
        f"| start: serve --daemon to healthy | {r['start']['serve_daemon_s']:.1f} s | OpenVINO read+compile "
        f"{r['start']['openvino_read_compile_s']:.1f} s | {r['start']['ratio']:.2f} | ≤ 2 |",
        f"| mixed, c=4 | {r['mixed_c4']['served']['pairs_per_s']:.2f} pairs/s, p50 {r['mixed_c4']['served']['latency_ms']['p50']:.0f} ms | | | |",
    ]
    if "scaling_rag_pairs_per_s" in r:
        sc = r["scaling_rag_pairs_per_s"]
        lines += [
            "",
            "| rag, c=4, pairs/s | 1 worker × 1 thread | 2 workers × 1 thread, pinning off (ours) | 2 workers × 1 thread, pinning on |",
            "|---|---|---|---|",
            f"| | {sc['1w_1t']:.2f} | {sc['2w_1t_unpinned']:.2f} ({sc['2w_1t_unpinned'] / sc['1w_1t']:.2f}×) | "
            f"{sc['2w_1t_pinned']:.2f} ({sc['2w_1t_pinned'] / sc['1w_1t']:.2f}×) |",
        ]
    lines.append("")
    lines.append("Per-process PSS, 1 worker: " + ", ".join(
        f"{k} {v / mib:.0f} MiB" for k, v in r["memory_1_worker"].items() if k != "total" and v))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
