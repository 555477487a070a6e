"""What the API gate costs a request: c=1 latency through the gate vs straight to MOSEC's internal port.

    .venv/bin/python benchmarks/gate_cost.py [--requests 400] [--repeats 3]

Both paths score the same tiny request with the same server; the direct one carries this instance's gate
secret (read from the run dir, as only the owner can), so the score worker takes it. Prints the
median of each repeat's median and the spread; target: the gate adds <= 1.5 ms at the median.

Latency differences of a millisecond drown in this machine's noise, so it also prints the supervisor's CPU
time per request (over each series): what the gate takes from the model on a small machine.
During the direct series the supervisor only runs its own canary and watchdog; the difference is the gate's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU time of one process."""
    t = proc.cpu_times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-ms", type=float, default=1.5)
    args = ap.parse_args()
    from chaos import build_model
    from conftest import DOCS, QUERY, ServerHandle
    from reranker_ops.protocol.envelope import part_head, seal

    model = build_model(Path(tempfile.gettempdir()) / "rerankctl-chaos-model")
    server = ServerHandle(model, Path(tempfile.mkdtemp(prefix="gate-cost-")))
    server.start()
    try:
        state = json.loads((server.run_dir / "state.json").read_text())
        gen = state["mosec"]["generation"]
        cfg = json.loads(next((server.run_dir / "mosec").glob(f"*.g{gen}.json")).read_text())
        body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
        direct_url = f"http://127.0.0.1:{state['mosec']['port']}/score"
        part = part_head("0", len(body)) + body
        direct_body = seal(cfg["gate_secret"].encode(), 1, [part]) + part  # an envelope of one
        gate_url = server.base + "/rerank"
        gate_med, direct_med = [], []
        cpu = {"gate": [], "direct": []}
        supervisor = psutil.Process(int(state["pid"]))
        with httpx.Client(timeout=30) as c:
            for _ in range(20):
                assert c.post(gate_url, content=body).status_code == 200
                assert c.post(direct_url, content=direct_body).status_code == 200
            for _ in range(args.repeats):
                for url, payload, out in ((gate_url, body, gate_med), (direct_url, direct_body, direct_med)):
                    times = []
                    c0 = cpu_seconds(supervisor)
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        r = c.post(url, content=payload)
                        times.append(time.perf_counter() - t0)
                        assert r.status_code == 200, r.text
                    out.append(statistics.median(times) * 1000)
                    cpu["gate" if url == gate_url else "direct"].append(
                        (cpu_seconds(supervisor) - c0) / args.requests * 1000)
    finally:
        server.cleanup()
    added = [g - d for g, d in zip(gate_med, direct_med)]
    print(f"c=1, {args.requests} requests x {args.repeats} repeats (medians per repeat, ms)")
    print(f"  through the gate : {', '.join(f'{x:.2f}' for x in gate_med)}")
    print(f"  straight to MOSEC: {', '.join(f'{x:.2f}' for x in direct_med)}")
    med = statistics.median(added)
    print(f"  added by the gate: median {med:.2f} ms (spread {min(added):.2f}..{max(added):.2f})")
    gate_cpu = [g - d for g, d in zip(cpu["gate"], cpu["direct"])]
    print(f"  supervisor CPU per request: through the gate {', '.join(f'{x:.2f}' for x in cpu['gate'])} ms,"
          f" while requests went straight to MOSEC {', '.join(f'{x:.2f}' for x in cpu['direct'])} ms;"
          f" the gate's own: median {statistics.median(gate_cpu):.2f} ms")
    ok = med <= args.target_ms
    print("TARGET: " + ("met" if ok else f"MISSED (> {args.target_ms} ms)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
