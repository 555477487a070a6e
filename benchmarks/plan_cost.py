"""How the score worker groups pairs into OpenVINO calls, measured: the cost model and what it buys.

    .venv/bin/python benchmarks/plan_cost.py [--rounds 5] [--out bench-results] [--shape dity|dity-short]
                                             [--precisions fp32,bf16,int8]

1. **Calibration.** One call per shape (rows x width), shapes interleaved in a shuffled order each round,
   median of the rounds, fitted to ``time = a + b * rows * width * (1 + width / A)``: the cost of a call in
   tokens (``a / b``) and the width ``A`` at which attention doubles a token's cost are what
   ``engine.CALL_COST_TOKENS`` and ``engine.ATTENTION_TOKENS`` stand for.
2. **Plans side by side.** The same pools of pairs (the pairs a worker is handed at once: a few ``rag``
   chunks, ``tiny`` requests batched by MOSEC) scored with the planner the server uses and with the one it
   replaced (fill each call up to the budgets), alternating, median seconds per pool of each. A ratio
   above 1 means the server's planner is faster.
3. **A price per precision.** The server plans every precision with one price of a call
   (``engine.CALL_COST_TOKENS``, fitted at FP32), while a call's price in tokens is the silicon's: INT8 and
   AMX make each token cheaper, not the call. Each precision measured (``--precisions``: FP32 unless asked,
   ``all`` for every one this CPU computes in) is calibrated on its own, and its pools are also planned with that precision's own price (``fitted``):
   ``fitted_over_shipped`` above 1 means the server would gain by fitting the price per precision.

Random model of DiTy's exact shape (or, ``--shape dity-short``, its width with 3 layers): speed depends on shape
only. Say which CPU with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def fill_to_budgets(lengths, token_budget: int, attention_budget: int = 0) -> list[list[int]]:
    """The planner before this one: sorted, each call filled until the next pair would break a budget."""
    from reranker_ops.worker.engine import _round_up

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        padded = _round_up(lengths[i])
        rows = len(current) + 1
        over = padded * rows > token_budget or (attention_budget > 0 and padded * padded * rows > attention_budget)
        if current and over:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def calibrate(scorer, rounds: int) -> dict:
    from reranker_ops.worker.engine import ATTENTION_TOKENS

    shapes = [(r, w) for w in (16, 32, 64, 128, 256) for r in (1, 2, 4, 8) if r * w <= 2048]

    def call(rows: int, width: int) -> float:
        feed = {"input_ids": np.full((rows, width), 5, dtype=np.int64),
                "attention_mask": np.ones((rows, width), dtype=np.int64)}
        if "token_type_ids" in scorer.input_names:
            feed["token_type_ids"] = np.zeros((rows, width), dtype=np.int64)
        t0 = time.perf_counter()
        scorer.request.infer(feed)
        return time.perf_counter() - t0

    for shape in shapes:
        call(*shape)
    times: dict = {shape: [] for shape in shapes}
    for k in range(rounds):
        order = shapes[:]
        random.Random(k).shuffle(order)
        for shape in order:
            times[shape].append(call(*shape))
    med = {shape: statistics.median(v) for shape, v in times.items()}
    fits = [_fit(med, attention) for attention in (750, 1000, 1500, 2048, 3000, 4096, 6000, 1e9)]
    err, a, b, attention = min(fits)
    # the price the planner would use: fitted with the attention width it plans with
    err_s, a_s, b_s, _ = _fit(med, ATTENTION_TOKENS)
    return {
        "call_cost_tokens_at_shipped_attention": round(a_s / b_s, 1),
        "relative_rms_error_at_shipped_attention": round(err_s, 3),
        "call_ms": round(a * 1000, 2),
        "token_ms": round(b * 1000, 3),
        "call_cost_tokens": round(a / b, 1),
        "attention_tokens": attention,
        "relative_rms_error": round(err, 3),
        "median_ms": {f"{r}x{w}": round(t * 1000, 2) for (r, w), t in sorted(med.items())},
    }


def _fit(med: dict, attention: float) -> tuple[float, float, float, float]:
    """Least squares of ``t = a + b * rows * width * (1 + width / attention)`` in relative error (the
    calls span 50 ms to 3 s: absolute error would fit the long ones only). Returns (rms, a, b, attention)."""
    rows = [(1.0 / t, r * w * (1 + w / attention) / t) for (r, w), t in med.items()]
    (a, b), *_ = np.linalg.lstsq(np.array(rows), np.ones(len(rows)), rcond=None)
    err = float(np.sqrt(np.mean([(a + b * r * w * (1 + w / attention) - t) ** 2 / t ** 2
                                 for (r, w), t in med.items()])))
    return err, float(a), float(b), attention


def pools(scorer, workload: str, size: int, count: int, seed: int = 1) -> list[list]:
    from reranker_ops.bench import make_request

    rng = random.Random(seed)
    pairs = []
    n = 0
    while len(pairs) < size * count:
        req = make_request(workload, rng, n)
        n += 1
        pairs.extend(scorer.tokenizer.encode_pairs(req["query"], req["documents"]))
    return [pairs[i * size : (i + 1) * size] for i in range(count)]


def compare(scorer, workload: str, size: int, count: int, rounds: int, fitted_tokens: float | None = None) -> dict:
    """The same pools planned each way, the planners' order rotated every round. ``fitted_tokens``: also plan
    with that price of a call (``fitted``) beside the shipped one (``server``)."""
    from reranker_ops.worker import engine

    planners = {"server": engine.plan_microbatches, "fill": fill_to_budgets}
    if fitted_tokens is not None:
        planners["fitted"] = lambda lengths, tb, ab: engine.plan_microbatches(lengths, tb, ab, fitted_tokens)
    work = pools(scorer, workload, size, count)
    seconds: dict = {name: [] for name in planners}
    calls: dict = {name: 0 for name in planners}
    padded = {name: 0 for name in planners}
    real = sum(len(e) for pool in work for e in pool)
    for k in range(rounds):
        names = list(planners)
        names = names[k % len(names):] + names[:k % len(names)]
        for name in names:
            engine_plan = planners[name]
            t0 = time.perf_counter()
            for pool in work:
                lengths = [len(e) for e in pool]
                for batch in engine_plan(lengths, scorer.token_budget, scorer.attention_budget):
                    scorer._run([pool[i] for i in batch])
                    if k == 0:
                        calls[name] += 1
                        padded[name] += len(batch) * engine._round_up(max(lengths[i] for i in batch))
            seconds[name].append((time.perf_counter() - t0) / len(work))
    med = {name: statistics.median(v) for name, v in seconds.items()}
    out = {
        "workload": workload,
        "pairs_per_pool": size,
        "seconds_per_pool": {name: round(v, 3) for name, v in med.items()},
        "spread": {name: [round(min(v), 3), round(max(v), 3)] for name, v in seconds.items()},
        "calls_per_pool": {name: calls[name] / len(work) for name in planners},
        "padded_over_real_tokens": {name: round(padded[name] / real, 3) for name in planners},
        "speedup": round(med["fill"] / med["server"], 3),
    }
    if "fitted" in med:
        # each round's own ratio, the shipped price's time over the fitted one's (above 1: the fitted is faster)
        paired = [s / f for s, f in zip(seconds["server"], seconds["fitted"])]
        out["fitted_over_shipped"] = round(med["server"] / med["fitted"], 3)
        out["fitted_over_shipped_by_round"] = [round(x, 3) for x in paired]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE.parent / "bench-results")
    ap.add_argument("--shape", choices=("dity", "dity-short"), default="dity",
                    help="dity-short: DiTy's width, 3 layers: each call as short as AMX makes DiTy's")
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated, of fp32,bf16,int8, or 'all' (all this CPU has)")
    args = ap.parse_args()
    from perf import PRECISIONS, _cpu_flags, _cpu_name, cpu_precisions, model_of_shape

    from reranker_ops.worker.engine import CALL_COST_TOKENS, Scorer, configure_process_threads

    precisions = cpu_precisions() if args.precisions == "all" else tuple(args.precisions.split(","))
    if not precisions or any(p not in PRECISIONS for p in precisions):
        ap.error(f"--precisions: comma-separated, of {','.join(PRECISIONS)}, or 'all'")
    configure_process_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_of_shape(args.out, args.shape, precisions)
    result = {"cpu": f"{_cpu_name()} ({_cpu_flags()})", "shape": args.shape, "shipped_call_tokens": CALL_COST_TOKENS,
              "precisions": {}}
    for prec in precisions:
        scorer = Scorer(model / f"openvino-{prec}")
        cal = calibrate(scorer, args.rounds)
        print(prec, json.dumps(cal), flush=True)
        rows = []
        for workload, size, count in (("rag", 4, 3), ("rag", 12, 2), ("tiny", 10, 4), ("mixed", 8, 2)):
            row = compare(scorer, workload, size, count, args.rounds, fitted_tokens=cal["call_cost_tokens_at_shipped_attention"])
            print(prec, json.dumps(row), flush=True)
            rows.append(row)
        result["precisions"][prec] = {"calibration": cal, "plans": rows}
        del scorer  # its compiled model goes before the next precision's is compiled, not after
    (args.out / "plan_cost.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
