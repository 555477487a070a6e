"""Two servers that differ in settings, up at once and measured in alternation: is a setting worth it?

    .venv/bin/python benchmarks/ab.py --shape dity-short --precision int8 --workload rag -c 4 \
        --b quiet_batch_ms=0 [--a NAME=VALUE ...] [--rounds 4] [--seconds 8] [--out bench-results]
    .venv/bin/python benchmarks/ab.py ... --a-tree ../before      (A serves another checkout's code)
    .venv/bin/python benchmarks/ab.py --shape dity-short --precision int8 --a-tree ../before --lone 400

Both servers serve the same model files. Each round measures A then B, or B then A (alternating), so both meet
the same machine; the report gives every round's figure and the medians. With ``--paired`` each round also
measures a lone request's added latency (``bench --paired``). With ``--lone N`` a round is instead N lone
``tiny`` requests, each sent to A and to B one right after the other (which first alternates), from this
checkout's load generator whatever the trees serve: the median of the paired differences B - A, each server's
median, and each supervisor's CPU a request (the gate's). A difference of a few tenths of a millisecond shows
there, where whole runs drift by more; but B comes out 0.1-0.3 ms faster when both serve the same code
(benchmarks/HISTORY.md), so run both orders (``--a-tree`` then ``--b-tree``) and take half the difference. Used for the A/B figures of issue 36 in benchmarks/HISTORY.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from perf import MEMORY_SETTLE_S, Server, cpu_seconds, model_of_shape, parse_settings  # noqa: E402


def lone_round(clients: dict, sups: dict, n: int, stream) -> dict:
    """``n`` lone requests, each to A and to B back to back (A first, then B first, ...) on each server's kept-alive
    client: per server its latencies' median and its supervisor's CPU a request, and the median of the
    differences B - A (ms)."""
    lat: dict[str, list[float]] = {name: [] for name in clients}
    cpu0 = {name: cpu_seconds(p) for name, p in sups.items()}
    for i in range(n):
        req = next(stream)
        for name in (("A", "B") if i % 2 == 0 else ("B", "A")):
            t0 = time.perf_counter()
            status, _ = clients[name].post(req)
            lat[name].append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise SystemExit(f"server {name} answered {status}")
    cpu = {name: (cpu_seconds(p) - cpu0[name]) * 1000 / n for name, p in sups.items()}
    return {"p50": {name: statistics.median(v) for name, v in lat.items()}, "cpu": cpu,
            "diff": statistics.median(b - a for a, b in zip(lat["A"], lat["B"]))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("dity", "dity-short"), default="dity")
    ap.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32")
    ap.add_argument("--workload", default="rag")
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--a", action="append", default=[], metavar="NAME=VALUE", help="server A's settings")
    ap.add_argument("--b", action="append", default=[], metavar="NAME=VALUE", help="server B's settings")
    ap.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE",
                    help="a variable of server A's environment (MOSEC and its workers inherit it)")
    ap.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE", help="the same for server B")
    ap.add_argument("--a-tree", type=Path, default=None, help="server A runs this checkout's code (a worktree)")
    ap.add_argument("--b-tree", type=Path, default=None, help="server B runs this checkout's code")
    ap.add_argument("--paired", action="store_true", help="also a lone request's added latency each round")
    ap.add_argument("--lone", type=int, default=0, metavar="N",
                    help="instead of the workload: N lone tiny requests a round, to A and B back to back")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (one each way)")
    # absolute: a server of another tree runs from that tree's folder, where a relative path means nothing
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_of_shape(args.out, args.shape, tuple(dict.fromkeys(("fp32", args.precision))))
    configs = {"A": parse_settings(args.a), "B": parse_settings(args.b)}
    envs = {"A": dict(v.split("=", 1) for v in args.a_env), "B": dict(v.split("=", 1) for v in args.b_env)}
    trees = {"A": args.a_tree, "B": args.b_tree}
    key = "requests_per_s" if args.workload == "tiny" else "pairs_per_s"
    figures: dict[str, list[float]] = {name: [] for name in configs}
    added: dict[str, list[float]] = {name: [] for name in configs}
    with ExitStack() as stack:
        servers = {}
        for name, extra in configs.items():
            srv = Server(model, args.out / f"run-ab-{name}", tree=trees[name], precision=args.precision, **extra)
            srv.env.update(envs[name])
            servers[name] = stack.enter_context(srv)
        if args.lone:
            # what each report line names a server by: its settings and the variables it got
            return report_lone(args, servers, {n: {**configs[n], **envs[n]} for n in configs}, trees)
        for r in range(args.rounds):
            for name in (("A", "B") if r % 2 == 0 else ("B", "A")):
                srv = servers[name]
                res = srv.bench("--workload", args.workload, "-c", str(args.concurrency), "-z", str(args.seconds),
                                "--warmup", str(args.concurrency))
                figures[name].append(res["served"][key])
                if args.paired:
                    added[name].append(srv.bench("--workload", "tiny", "--paired", "-z", str(args.seconds),
                                                 "--warmup", "5")["paired"]["added_ms"]["p50"])
        # both served the same load: what each tree holds after it, at rest (after the worker's trim)
        time.sleep(MEMORY_SETTLE_S)
        memory = {name: srv.status()["total_pss_bytes"] / 2**20 for name, srv in servers.items()}
    print(f"{args.workload} c={args.concurrency}, {args.precision}, shape {args.shape}: {key}, each round")
    for name, extra in configs.items():
        where = f" [{trees[name]}]" if trees[name] else ""
        extra = {**extra, **envs[name]}
        line = (f"{name}{where} {extra or '(defaults)'}: " + ", ".join(f"{v:.1f}" for v in figures[name])
                + f"; median {statistics.median(figures[name]):.1f}")
        if args.paired:
            line += f"; tiny c=1 added p50 median {statistics.median(added[name]):.2f} ms"
        line += f"; tree PSS after {memory[name]:.0f} MiB"
        print(line)
    return 0


def report_lone(args, servers: dict, configs: dict, trees: dict) -> int:
    import psutil

    from reranker_ops.bench import LeanClient, request_stream

    stream = request_stream("tiny", 7)
    # each server's supervisor and one kept-alive client to it, for every round (the load generator is this
    # checkout's whatever code the trees serve)
    sups = {name: psutil.Process(srv.status()["pid"]) for name, srv in servers.items()}
    clients = {name: LeanClient(srv.url + "/rerank", {}, 120) for name, srv in servers.items()}
    rounds = []
    try:
        lone_round(clients, sups, 50, stream)  # warm both
        for r in range(args.rounds):
            rounds.append(lone_round(clients, sups, args.lone, stream))
            x = rounds[-1]
            print(f"round {r + 1}: p50 A {x['p50']['A']:.2f} ms, B {x['p50']['B']:.2f} ms; B - A (median of paired"
                  f" differences) {x['diff']:+.3f} ms; supervisor CPU a request A {x['cpu']['A']:.3f},"
                  f" B {x['cpu']['B']:.3f} ms", flush=True)
    finally:
        for c in clients.values():
            c.close()
    for name, extra in configs.items():
        where = f" [{trees[name]}]" if trees[name] else ""
        print(f"{name}{where} {extra or '(defaults)'}: p50 median {statistics.median(x['p50'][name] for x in rounds):.2f}"
              f" ms, supervisor CPU a request {statistics.median(x['cpu'][name] for x in rounds):.3f} ms")
    print(f"B - A, lone tiny requests ({args.precision}, shape {args.shape}), per round: "
          + ", ".join(f"{x['diff']:+.3f}" for x in rounds) + " ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
