"""When the model runs: a served closed-loop load as the kernel's scheduler saw it, against the model in-process.

    .venv/bin/python benchmarks/cycle.py [--shape dity-short] [--precision int8] [--workload tiny] [-c 10]
                                         [--seconds 2] [--rounds 3] [--out DIR]

Needs ``perf`` (Debian: linux-perf) and the right to trace the scheduler (root, or a low enough
``kernel.perf_event_paranoid``). Each round runs the load, records every context switch on the machine for
``--seconds`` in the middle of it (``perf sched record -a``) and then measures the same model in-process
(``Ceiling``, selected once as perf.py's ceiling is). From the switches (``perf sched timehist``) it adds up how
long the score worker's OpenVINO threads (the worker's threads that ran a tenth of the window or more) ran
together, how long one of them ran alone, and how long none ran, and what else was running meanwhile: the gate
(the supervisor), the load generator (this process), MOSEC's controller, anything else.

On a machine whose cores all run the model, the served rate over the in-process rate is about the share of time
all of the model's threads ran: the rest is where the path around the model keeps it waiting. With one worker
and one big batch a turn (`tiny` c=10), that is serial by nature: the gate answers the batch's clients and reads
their next requests while the model waits, then the worker parses and tokenizes them on one thread (issue 36).
It changes nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import Server, model_of_shape  # noqa: E402

from reranker_ops.bench import run_load  # noqa: E402
from reranker_ops.ceiling import Ceiling  # noqa: E402


def intervals(timehist: str) -> list[tuple[float, float, int, int, str]]:
    """(start, end, cpu, tid, comm) of every run in ``perf sched timehist``'s output."""
    out = []
    for line in timehist.splitlines():
        p = line.split()
        if len(p) < 6 or not p[1].startswith("[") or not p[0][0].isdigit():
            continue
        try:
            end, run_ms = float(p[0]), float(p[-1])
        except ValueError:
            continue
        task = p[2]  # comm[tid/pid], comm[pid], or <idle>
        if task == "<idle>":
            continue
        comm, _, ids = task.rpartition("[")
        first = ids.rstrip("]").split("/")[0]
        out.append((end - run_ms / 1000, end, int(p[1].strip("[]")), int(first) if first.isdigit() else -1, comm))
    return out


def tids_of(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def shares(runs: list[tuple[float, float, int, int, str]], model: set[int], roles: dict[int, str]) -> dict:
    """Seconds of each (model threads running, others running) state over the window."""
    events = []
    for start, end, cpu, tid, comm in runs:
        if tid <= 0:
            continue
        who = "model" if tid in model else roles.get(tid, "other")
        events += [(start, 1, cpu, who), (end, -1, cpu, who)]
    events.sort()
    acc: collections.Counter = collections.Counter()
    running: dict[int, str] = {}
    last = events[0][0] if events else 0.0
    for t, kind, cpu, who in events:
        if t > last:
            now = list(running.values())
            others = tuple(sorted({w for w in now if w != "model"}))
            acc[(now.count("model"), others)] += t - last
            last = t
        if kind == 1:
            running[cpu] = who
        elif running.get(cpu) == who:
            del running[cpu]
    return dict(acc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="dity-short", choices=("dity", "dity-short"))
    ap.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--workload", default="tiny")
    ap.add_argument("-c", "--concurrency", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=2.0, help="the scheduler's record, a round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    a = ap.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("cycle.py needs perf (Debian: apt-get install linux-perf)")
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = model_of_shape(out, a.shape, (a.precision,))
    ceiling = Ceiling(model / f"openvino-{a.precision}", workload=a.workload, batch_requests=a.concurrency)
    ceiling.select(4.0)
    rows: list[dict] = []
    with Server(model, out / "run-cycle", precision=a.precision) as srv:
        run_load(srv.url, workload=a.workload, concurrency=a.concurrency, duration=2, warmup=2)
        procs = {row["pid"]: row["role"] for row in srv.status()["processes"]}
        roles = {tid: ("gate" if role == "supervisor" else role) for pid, role in procs.items() for tid in tids_of(pid)}
        roles.update({tid: "load generator" for tid in tids_of(os.getpid())})
        worker = next(pid for pid, role in procs.items() if role == "score")
        for r in range(a.rounds):
            res: dict = {}
            load = threading.Thread(target=lambda: res.setdefault("r", run_load(
                srv.url, workload=a.workload, concurrency=a.concurrency, duration=a.seconds + 3)))
            load.start()
            threading.Event().wait(1.5)
            # the load generator's threads are made per run: named while they run
            roles.update({tid: "load generator" for tid in tids_of(os.getpid()) if tid not in roles})
            data = out / "cycle-sched.data"
            finish = record(data, a.seconds)
            load.join(a.seconds + 120)
            finish()
            served = res["r"].requests / res["r"].seconds
            row = {"served": served, **{f"served {k}": v for k, v in view(data, tids_of(worker), roles).items()}}
            # the same model in-process (this process's threads), recorded the same way
            finish = record(data, a.seconds)
            req, _pairs, elapsed = ceiling.measure(a.seconds + 1.5)
            finish()
            row.update({"in-process": req / elapsed,
                        **{f"in-process {k}": v for k, v in view(data, tids_of(os.getpid()), roles).items()}})
            rows.append(row)
            print(f"round {r + 1}: served {served:.1f} req/s, in-process {row['in-process']:.1f} "
                  f"({served / row['in-process']:.3f})", flush=True)
            for side in ("served", "in-process"):
                print(f"  {side}: the model's {row[side + ' threads']} threads all running {row[side + ' all']:.1%},"
                      f" some {row[side + ' some']:.1%}, none {row[side + ' none']:.1%}")
                for what, share in row[side + " states"].items():
                    print(f"    {share:6.1%}  {what}")
    keys = [k for k in rows[0] if not k.endswith(("states", "threads"))]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    print(f"\n{a.workload} c={a.concurrency}, {a.precision}, {a.shape}, medians of {a.rounds} rounds: served "
          f"{med['served']:.1f} req/s, in-process {med['in-process']:.1f} "
          f"(ratio {statistics.median(r['served'] / r['in-process'] for r in rows):.3f})")
    for side in ("served", "in-process"):
        print(f"  {side}: time with all the model's threads running {med[side + ' all']:.1%}, "
              f"some {med[side + ' some']:.1%}, none {med[side + ' none']:.1%}")
    return 0


def record(data: Path, seconds: float):
    """Start recording every context switch on the machine for ``seconds`` into ``data``; the function returned
    waits for the record (with a deadline) and stops the run if it failed."""
    rec = subprocess.Popen(["perf", "sched", "record", "-a", "-o", str(data), "--", "sleep", str(seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish() -> None:
        try:
            _out, err = rec.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            rec.kill()  # not left recording every context switch of the machine after the run gave up
            rec.wait()
            raise SystemExit("perf sched record did not end in time") from None
        if rec.returncode != 0:
            raise SystemExit(f"perf sched record failed: {err.strip()[-300:]}")

    return finish


def view(data: Path, candidates: set[int], roles: dict[int, str]) -> dict:
    """The model's threads (of ``candidates``, those that ran a tenth of the window or more) and how the
    window's time split between all of them running, some, none, with what else ran."""
    hist = subprocess.run(["perf", "sched", "timehist", "-i", str(data)], capture_output=True, text=True,
                          timeout=300).stdout
    runs = intervals(hist)
    window = max(e for _, e, *_ in runs) - min(s for s, *_ in runs)
    ran: collections.Counter = collections.Counter()
    for s, e, _cpu, tid, _comm in runs:
        if tid in candidates:
            ran[tid] += e - s
    model = {tid for tid, t in ran.items() if t >= 0.1 * window}
    acc = shares(runs, model, roles)
    total = sum(acc.values()) or 1.0
    return {"threads": len(model),
            "all": sum(v for (n, _o), v in acc.items() if n >= len(model)) / total,
            "some": sum(v for (n, _o), v in acc.items() if 0 < n < len(model)) / total,
            "none": sum(v for (n, _o), v in acc.items() if n == 0) / total,
            "states": {f"{n} model thread(s); {', '.join(o) or 'nothing else'}": v / total
                       for (n, o), v in sorted(acc.items(), key=lambda kv: -kv[1])[:8]}}


if __name__ == "__main__":
    sys.exit(main())
