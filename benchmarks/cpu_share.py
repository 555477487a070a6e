"""Where a request's CPU goes, process by process, against what the model alone takes in-process.

    .venv/bin/python benchmarks/cpu_share.py [--shape dity-short] [--precision int8] [--workload tiny]
                                             [-c 10] [--seconds 8] [--rounds 3] [--out DIR]

On a machine whose cores all run the model, every millisecond of CPU the server spends outside OpenVINO is
taken from it, so a served/ceiling ratio cannot exceed (the model's CPU a request, in-process) / (all the CPU
a request takes served, the load generator's included). This measures both sides in alternating rounds: the
server's processes by role (CPU time over the round from /proc, through psutil), the load generator's own
(this process's threads: ``rerankctl bench``'s closed loop runs in it), and the in-process scorer's CPU per
request (``Ceiling``, selected once as perf.py's ceiling is: the best of at most ``c`` requests a call), and
prints that bound beside the throughputs measured. It changes nothing; it says what a change to the request path has to
win (issue 36).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import Server, cpu_seconds, model_of_shape  # noqa: E402

from reranker_ops.bench import run_load  # noqa: E402
from reranker_ops.ceiling import Ceiling  # noqa: E402


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def tree_cpu(procs: dict[int, tuple[str, "psutil.Process"]]) -> dict[int, tuple[str, float]]:
    """Each live process of the server's tree: its role and CPU seconds so far."""
    out = {}
    for pid, (role, proc) in procs.items():
        try:
            out[pid] = (role, cpu_seconds(proc))
        except psutil.Error:
            continue
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="dity-short", choices=("dity", "dity-short"))
    ap.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--workload", default="tiny")
    ap.add_argument("-c", "--concurrency", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    a = ap.parse_args()
    out = a.out.resolve()
    model = model_of_shape(out, a.shape, (a.precision,))
    ceiling = Ceiling(model / f"openvino-{a.precision}", workload=a.workload, batch_requests=a.concurrency)
    ceiling.select(a.seconds)
    served: dict[str, list[float]] = {}
    inproc, rates, ceil_rates = [], [], []
    with Server(model, out / "run-cpu-share", precision=a.precision) as srv:
        run_load(srv.url, workload=a.workload, concurrency=a.concurrency, duration=2, warmup=2)
        # the tree and each process's role, once: a round reads only /proc (no status command run beside it)
        procs = {row["pid"]: (row["role"], psutil.Process(row["pid"])) for row in srv.status()["processes"]}
        for r in range(a.rounds):
            before, me = tree_cpu(procs), own_cpu()
            res = run_load(srv.url, workload=a.workload, concurrency=a.concurrency, duration=a.seconds)
            after, me_after = tree_cpu(procs), own_cpu()
            n = max(1, res.requests)
            by_role: dict[str, float] = {"load generator": (me_after - me) * 1000 / n}
            for pid, (role, t0) in before.items():
                if pid in after:
                    by_role[role] = by_role.get(role, 0.0) + (after[pid][1] - t0) * 1000 / n
            for role, ms in by_role.items():
                served.setdefault(role, []).append(ms)
            rates.append(res.requests / res.seconds)
            c0 = own_cpu()
            req, _pairs, elapsed = ceiling.measure(a.seconds)
            inproc.append((own_cpu() - c0) * 1000 / req)
            ceil_rates.append(req / elapsed)
            print(f"round {r + 1}: served {rates[-1]:.1f} req/s, "
                  + ", ".join(f"{k} {v[-1]:.3f}" for k, v in served.items())
                  + f" ms CPU a request; in-process {ceil_rates[-1]:.1f} req/s, {inproc[-1]:.3f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in served.items()}
    total = sum(med.values())
    model_ms = statistics.median(inproc)
    print(f"\n{a.workload} c={a.concurrency}, {a.shape} {a.precision}, medians of {a.rounds} rounds:")
    print("| where | CPU ms a request |\n|---|---|")
    for role, ms in sorted(med.items(), key=lambda kv: -kv[1]):
        print(f"| served: {role} | {ms:.3f} |")
    print(f"| served: all | {total:.3f} |\n| in-process: the model alone | {model_ms:.3f} |")
    print(f"bound on served/ceiling from CPU alone: {model_ms / total:.3f}; measured "
          f"{statistics.median(rates) / statistics.median(ceil_rates):.3f} "
          f"({statistics.median(rates):.1f} against {statistics.median(ceil_rates):.1f} req/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
