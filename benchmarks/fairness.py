"""Short requests beside long ones, on a random model with DiTy's exact shape (FP32), side by side in one run:

    .venv/bin/python benchmarks/fairness.py [--seconds 60] [--out bench-results]
                                            [--shape dity-short --precision int8]

``--shape dity-short --precision int8``: each call as short as DiTy's with AMX (perf.py). There the long target
is missed (long requests keep ~0.3 of their pairs/s beside two short clients; README, "Performance"): the
lanes take turns by characters of text, and a short request costs more time per character than a chunk.

For each configuration it runs `rerankctl bench --mixed`: 2 clients sending short requests (5 passages of
60-200 characters) alone, 2 clients sending long ones (100 passages of 1000 characters) alone, then both at
once. Configurations: the fair scheduler (the default) and, for comparison, MOSEC's own order (no split,
no budget: requests go to MOSEC as they come, as before the scheduler). Targets (checked, exit 1 when the
default misses one): short p95 together <= 10x alone, long pairs/s together >= 0.9x alone, no failed short.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from perf import Server, cli, model_of_shape, parse_settings  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--only-default", action="store_true")
    ap.add_argument("--shape", choices=("dity", "dity-short"), default="dity")
    ap.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32")
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                    help="a server setting for every configuration, e.g. quiet_batch_ms=0 (repeatable)")
    args = ap.parse_args()
    common = parse_settings(args.setting)
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_of_shape(args.out, args.shape, tuple(dict.fromkeys(("fp32", args.precision))))
    configs = {"fair scheduler (default)": {}}
    if not args.only_default:
        configs["MOSEC order (no split, no budget)"] = {"split_bytes": 0, "schedule_budget_chars": 10**9}
    results = {}
    for name, extra in configs.items():
        print(f"{name} ...", flush=True)
        with Server(model, args.out / "run-fair", precision=args.precision, **{**common, **extra}) as srv:  # a 900 s deadline: throughput, not deadlines
            res = cli(["bench", "--url", srv.url, "--mixed", "--duration", str(args.seconds), "--json",
                       "--timeout", "900"], srv.env, timeout=6 * args.seconds + 1800)
            try:
                results[name] = json.loads(res.stdout)
            except ValueError:
                raise SystemExit(f"bench failed: {res.stdout}\n{res.stderr}")
    print("\n| configuration | short p50 / p95 alone ms | short p50 / p95 together ms | p95 ratio | failed short |"
          " long pairs/s alone | together | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        sa, sm = r["short_alone"]["latency_ms"], r["short_mixed"]["latency_ms"]
        print(f"| {name} | {sa['p50']:.0f} / {sa['p95']:.0f} | {sm['p50']:.0f} / {sm['p95']:.0f} | "
              f"{r['short_p95_ratio']} | {r['short_failed']} | {r['long_alone']['pairs_per_s']} | "
              f"{r['long_mixed']['pairs_per_s']} | {r['long_pairs_ratio']} |")
    (args.out / "fairness.json").write_text(json.dumps(results, indent=2))
    met = results["fair scheduler (default)"]["met"]
    print("\nTARGETS (default): " + ("all met" if met else "MISSED"))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
