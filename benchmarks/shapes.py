"""What varied traffic adds to a score worker's memory, with OpenVINO's per-shape caches bounded
(``RERANKER_KERNEL_CACHE``, default 256 entries each) and with OpenVINO's own defaults; and what the bound costs
in speed on steady traffic.

    .venv/bin/python benchmarks/shapes.py [--shape dity-short] [--precision int8] [--shapes 450] [--rounds 2]

Each configuration runs in a process of its own (oneDNN reads its cache's capacity once per process), the two
alternated each round. A process loads the model as a worker does (``Scorer``), measures steady traffic
(``tiny`` in calls of 10 requests, ``rag`` in calls of 4, ``mixed`` one request a call), then runs one call of
each of ``--shapes`` distinct shapes (rows x padded width within the token and attention budgets, in a
shuffled order: what a day of varied requests makes), reading its resident memory (after giving the C heap
back) as it goes, then measures the steady traffic again. Random weights: speed and memory depend on the
shape only. Exit 1 when the bounded worker grows by more than ``--max-growth-mib`` over the sweep or its
steady traffic is slower than 0.95x the defaults'.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

OPENVINO_DEFAULTS = {"kernel_cache": 5000, "onednn": 1024}  # the CPU plugin's and oneDNN's own capacities


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(variant: Path, kernel_cache: int, onednn_cache: int, n_shapes: int) -> dict:
    import numpy as np

    from reranker_ops.bench import request_stream
    from reranker_ops.worker.engine import Scorer, configure_process_threads, trim_heap

    configure_process_threads()
    # the engine sets oneDNN's bound itself (an environment given to this process would be overwritten)
    sc = Scorer(variant, kernel_cache=kernel_cache, onednn_cache=onednn_cache,
                threads=os.cpu_count() or 1)  # a lone worker's threads
    tok = sc.tokenizer

    def requests(workload: str, n: int, seed: int) -> list[list[tuple[str, str]]]:
        stream = request_stream(workload, seed)
        return [[(r["query"], d) for d in r["documents"]] for r in (next(stream) for _ in range(n))]

    tiny = requests("tiny", 300, 1)
    rag = requests("rag", 16, 2)
    steady = {
        "tiny": [tok.encode_items([p for r in tiny[i:i + 10] for p in r]) for i in range(0, len(tiny), 10)],
        "rag": [tok.encode_items([p for r in rag[i:i + 4] for p in r]) for i in range(0, len(rag), 4)],
        "mixed": [tok.encode_items(r) for r in requests("mixed", 30, 3)],
    }

    def speed() -> dict:
        out = {}
        for name, calls in steady.items():
            t0, pairs = time.perf_counter(), 0
            for encs in calls:
                sc.score_encoded(encs)
                pairs += len(encs)
            out[name] = pairs / (time.perf_counter() - t0)
        return out

    speed()  # every steady shape seen once: the caches hold them, as a warm server's do
    trim_heap()
    base = _rss_mib()
    before = speed()
    shapes = [(rows, width) for rows in range(1, 33) for width in range(8, 513, 8)
              if rows * width <= sc.token_budget and rows * width * width <= sc.attention_budget]
    random.Random(0).shuffle(shapes)
    growth = []
    for i, (rows, width) in enumerate(shapes[:n_shapes], 1):
        ids = np.full((rows, width), 5, dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in sc.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        sc.request.infer(feed)
        if i % 75 == 0 or i == n_shapes:
            trim_heap()
            growth.append((i, round(_rss_mib() - base, 1)))
    after = speed()
    return {"growth": growth, "before": before, "after": after}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("dity", "dity-short"), default="dity-short")
    ap.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="int8")
    ap.add_argument("--shapes", type=int, default=450)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kernel-cache", type=int, default=1024)
    ap.add_argument("--max-growth-mib", type=float, default=250.0)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=PLUGIN:ONEDNN",
                    help="another configuration measured beside the two: the two caches' capacities")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "KERNEL_CACHE", "ONEDNN_CACHE", "SHAPES"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, cache, onednn, n = args.child
        print(json.dumps(child(Path(variant), int(cache), int(onednn), int(n))))
        return 0

    from perf import model_of_shape

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_of_shape(args.out, args.shape, tuple(dict.fromkeys(("fp32", args.precision))))
    variant = model / f"openvino-{args.precision}"
    configs = {"bounded": (args.kernel_cache, args.kernel_cache), "defaults": tuple(OPENVINO_DEFAULTS.values())}
    for extra in args.also:
        name, _, caps = extra.partition("=")
        configs[name] = tuple(int(x) for x in caps.split(":"))
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            cache, onednn = configs[name]
            res = subprocess.run([sys.executable, __file__, "--child", str(variant), str(cache), str(onednn),
                                  str(args.shapes)], capture_output=True, text=True, timeout=3600)
            if res.returncode != 0:
                raise SystemExit(f"{name}: {res.stderr.strip()[-2000:]}")
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: growth {runs[name][-1]['growth']}", flush=True)

    def med(name: str, when: str, key: str) -> float:
        return statistics.median(run[when][key] for run in runs[name])

    report = {"shape": args.shape, "precision": args.precision, "shapes": args.shapes, "configs": configs,
              "growth_mib": {n: statistics.median(run["growth"][-1][1] for run in runs[n]) for n in configs},
              "steady": {n: {w: {"before": round(med(n, "before", w), 1), "after": round(med(n, "after", w), 1)}
                             for w in ("tiny", "rag", "mixed")} for n in configs}}
    report["steady_over_defaults"] = {
        n: {w: round(report["steady"][n][w]["before"] / report["steady"]["defaults"][w]["before"], 3)
            for w in ("tiny", "rag", "mixed")} for n in configs}
    ratios = report["steady_over_defaults"]["bounded"]
    print(json.dumps(report, indent=1))
    (args.out / "shapes.json").write_text(json.dumps({"report": report, "runs": runs}, indent=1))
    missed = []
    if report["growth_mib"]["bounded"] > args.max_growth_mib:
        missed.append(f"bounded growth {report['growth_mib']['bounded']} MiB > {args.max_growth_mib}")
    missed += [f"{w} steady {x} < 0.95 of the defaults'" for w, x in ratios.items() if x < 0.95]
    print("; ".join(missed) or "targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
