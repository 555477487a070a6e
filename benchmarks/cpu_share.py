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

Each round also scores in-process beside a stand-in for the server's other processes: a process that burns, at
the served request rate, the CPU the gate, MOSEC's controller and the load generator took a request (in bursts of
that size). OpenVINO's threads of one call wait for each other at every layer, so a burst that preempts one of
them stalls the other too: the model loses more than the CPU taken. ``straggling`` is that loss over the share
of the machine the burner took (1 would be a fair share; 2, each millisecond taken costs the model two).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
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


def burn(burst_s: float, rate: float, seconds: float) -> None:
    """Busy for ``burst_s`` ``rate`` times a second, for ``seconds``; print the CPU seconds taken."""
    period, t_next = 1.0 / rate, time.perf_counter()
    end = t_next + seconds
    while t_next < end:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < burst_s:
            pass
        t_next += period
        lag = t_next - time.perf_counter()
        if lag > 0:
            time.sleep(lag)
        else:
            t_next = time.perf_counter()  # behind (the machine is full): no catch-up burst
    print(f"{time.process_time():.4f}", flush=True)


def beside_burner(ceiling: Ceiling, burst_s: float, rate: float, seconds: float) -> tuple[float, float]:
    """In-process requests/s while a burner runs; and the share of the machine's CPU the burner took."""
    burner = subprocess.Popen([sys.executable, __file__, "--burn", f"{burst_s}", f"{rate}", f"{seconds + 0.5}"],
                              stdout=subprocess.PIPE, text=True)
    try:
        req, _pairs, elapsed = ceiling.measure(seconds)
        out, _ = burner.communicate(timeout=seconds + 30)
    finally:
        if burner.poll() is None:
            burner.kill()
            burner.wait(10)
    cores = len(os.sched_getaffinity(0))
    return req / elapsed, float(out) / ((seconds + 0.5) * cores)


def main() -> int:
    if sys.argv[1:2] == ["--burn"]:
        burn(*(float(x) for x in sys.argv[2:5]))
        return 0
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
    inproc, rates, ceil_rates, beside, straggling = [], [], [], [], []
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
            # the CPU of the processes that are not the score worker, a request, at the served rate
            others = sum(v[-1] for k, v in served.items() if "score" not in k) / 1000
            rate, share = beside_burner(ceiling, others, rates[-1], a.seconds)
            beside.append(rate)
            straggling.append((1 - rate / ceil_rates[-1]) / share)
            print(f"round {r + 1}: served {rates[-1]:.1f} req/s, "
                  + ", ".join(f"{k} {v[-1]:.3f}" for k, v in served.items())
                  + f" ms CPU a request; in-process {ceil_rates[-1]:.1f} req/s, {inproc[-1]:.3f} ms; "
                  f"beside a burner of {others * 1000:.3f} ms x {rates[-1]:.0f}/s ({share:.1%} of the CPU) "
                  f"{rate:.1f} req/s", flush=True)
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
    print(f"in-process beside a burner of the other processes' CPU: {statistics.median(beside):.1f} req/s, "
          f"{statistics.median(beside) / statistics.median(ceil_rates):.3f} of alone; straggling "
          f"{statistics.median(straggling):.2f} (the model's loss over the burner's share of the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
