"""Every precision this CPU can run: served speed against its own in-process ceiling, and its fidelity.

    .venv/bin/python benchmarks/precision.py [--seconds 20] [--repeats 3] [--out bench-results]

Speed on a random model of DiTy's exact shape (speed depends on shape only): for each precision, in each
of --repeats rounds, `rag` at c=4 served, then the in-process ceiling with the same variant (the best
batching measured), so each ratio is between figures of one round. Fidelity cannot be judged on a random
model: it comes from `convert --precision auto` on the model trained here (its held-out queries), which
also shows what `auto` chooses on this CPU. Exit status 1 when a served/ceiling median is under 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from perf import Server, _cpu_flags, _cpu_name, cli, dity_model  # noqa: E402

RATIO_MIN = 0.95


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from reranker_ops.models.auto import cpu_can
    from modelkit.trained import cached_trained_model

    print("fidelity: convert --precision auto on the trained model ...", flush=True)
    trained = args.out / "trained"
    shutil.rmtree(trained, ignore_errors=True)
    shutil.copytree(cached_trained_model(args.out / "trained-cache"), trained)
    res = cli(["convert", str(trained), "--precision", "auto", "--eval", str(trained / "eval.jsonl"),
               "--calibration", str(trained / "calibration.jsonl"), "--bench-seconds", "3"],
              dict(os.environ), timeout=1800)
    if res.returncode != 0:
        raise SystemExit(res.stderr)
    from reranker_ops.models.auto import read_auto_choice

    auto = read_auto_choice(trained)

    model = dity_model(args.out, int8=True)
    precisions = [p for p in ("fp32", "int8", "bf16") if cpu_can(p)]
    if cpu_can("bf16") and not (model / "openvino-bf16" / "manifest.json").is_file():
        cli(["convert", str(model), "--precision", "bf16", "--bench-seconds", "0"], dict(os.environ))
    rows: dict = {}
    for p in precisions:
        rows[p] = {"served": [], "ceiling": [], "ratio": []}
    for i in range(args.repeats):
        for p in precisions:
            print(f"round {i + 1}/{args.repeats}: {p} served rag c=4 and its ceiling ...", flush=True)
            with Server(model, args.out / f"run-prec-{p}", precision=p) as srv:
                b = srv.bench("--workload", "rag", "-c", "4", "-z", str(args.seconds), "--ceiling", "--warmup", "4")
            rows[p]["served"].append(b["served"]["pairs_per_s"])
            rows[p]["ceiling"].append(b["ceiling"]["batched"]["pairs_per_s"])
            rows[p]["ratio"].append(b["ratios"]["served_pairs_per_s_over_batched_ceiling"])

    def fmt(xs: list[float], spec: str = ".2f") -> str:
        return f"{statistics.median(xs):{spec}} ({min(xs):{spec}}–{max(xs):{spec}})"

    lines = [f"Machine: {_cpu_name()}, {os.cpu_count()} cores, {_cpu_flags()}. Speed: DiTy-shaped random model, "
             f"rag c=4, {args.seconds:.0f} s, median (min–max) of {args.repeats} rounds. Fidelity: the trained "
             "model's 40 held-out queries against its PyTorch FP32 reference.", "",
             "| precision | served pairs/s | in-process ceiling | served / ceiling | × FP32 served | top-1 agree | "
             "mean Spearman | NDCG@10 vs FP32 ref | max \\|Δscore\\| |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = statistics.median(rows["fp32"]["served"])
    misses = []
    for p in ("fp32", "int8", "bf16"):
        fid = auto["candidates"].get(p, {})
        if p not in rows:
            lines.append(f"| {p} | {fid.get('reason', 'not available on this CPU')} | | | | | | | |")
            continue
        r = rows[p]
        if statistics.median(r["ratio"]) < RATIO_MIN:
            misses.append(f"{p} served/ceiling {statistics.median(r['ratio']):.3f} < {RATIO_MIN}")
        passed = fid.get("status") == "passed"
        lines.append(
            f"| {p}{' (auto’s choice)' if auto['chosen'] == p else ''} | {fmt(r['served'])} | {fmt(r['ceiling'])} | "
            f"{fmt(r['ratio'], '.3f')} | {statistics.median(r['served']) / base:.2f} | "
            + (f"{fid['top1_agreement']:.0%} | {fid['mean_spearman']:.3f} | {fid['ndcg_vs_reference']:.3f} | "
               f"{fid['max_abs_diff']:.3f} |" if passed else f"{fid.get('status', '—')} | | | |"))
    lines += ["", f"auto on the trained model: {auto['chosen']} — {auto['reason']}"]
    report = "\n".join(lines) + "\n"
    (args.out / "precision.md").write_text(report)
    (args.out / "precision.json").write_text(json.dumps({"rows": rows, "auto": auto}, indent=2))
    print(report)
    if misses:
        print("MISSED: " + "; ".join(misses), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
