"""What the API gate costs a request: c=1 latency through the gate vs straight to MOSEC's internal port.

    .venv/bin/python benchmarks/gate_cost.py [--requests 400] [--repeats 3] [--access-log]

Both paths score the same tiny request with the same server; the direct one carries this instance's gate
secret (read from the run dir, as only the owner can), so the score worker takes it. Prints the
median of each repeat's median and the spread; target: the gate adds <= 1.5 ms at the median.

Latency differences of a millisecond drown in this machine's noise, so it also prints the supervisor's CPU
time per request (over each series): what the gate takes from the model on a small machine.
During the direct series the supervisor only runs its own canary and watchdog; the difference is the gate's.

``--access-log``: instead, what the access log line costs (RERANKER_ACCESS_LOG, on by default): two servers,
one with it and one without, the same requests alternately, the supervisor's CPU per request and the c=1
latency of each.
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

from perf import cpu_seconds  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-ms", type=float, default=1.5)
    ap.add_argument("--access-log", action="store_true", help="measure the access log's cost instead")
    args = ap.parse_args()
    if args.access_log:
        return access_log_cost(args.requests, args.repeats)
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
        direct_body = seal(cfg["secret"].encode(), 1, [part]) + part  # an envelope of one (GenerationConfig)
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


def access_log_cost(requests: int, repeats: int) -> int:
    from chaos import build_model
    from conftest import DOCS, QUERY, ServerHandle

    model = build_model(Path(tempfile.gettempdir()) / "rerankctl-chaos-model")
    servers = {on: ServerHandle(model, Path(tempfile.mkdtemp(prefix="access-log-")), access_log=str(on).lower())
               for on in (True, False)}
    latency: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    try:
        for s in servers.values():
            s.start()
        procs = {on: psutil.Process(int(json.loads((s.run_dir / "state.json").read_text())["pid"]))
                 for on, s in servers.items()}
        with httpx.Client(timeout=30) as c:
            for s in servers.values():
                for _ in range(20):
                    assert c.post(s.base + "/rerank", content=body).status_code == 200
            for i in range(repeats):
                for on in ((True, False) if i % 2 == 0 else (False, True)):
                    times = []
                    c0 = cpu_seconds(procs[on])
                    for _ in range(requests):
                        t0 = time.perf_counter()
                        assert c.post(servers[on].base + "/rerank", content=body).status_code == 200
                        times.append(time.perf_counter() - t0)
                    cpu[on].append((cpu_seconds(procs[on]) - c0) / requests * 1000)
                    latency[on].append(statistics.median(times) * 1000)
        lines = [ln for ln in (servers[True].run_dir / "rerankctl.log").read_text().splitlines()
                 if " POST /rerank 200 " in ln]
        assert len(lines) >= requests * repeats, "the access log wrote no line per request: nothing was measured"
    finally:
        for s in servers.values():
            s.cleanup()
    print(f"c=1, {requests} requests x {repeats} repeats, alternated (medians per repeat)")
    for on in (True, False):
        print(f"  access log {'on ' if on else 'off'}: latency {', '.join(f'{x:.2f}' for x in latency[on])} ms;"
              f" supervisor CPU per request {', '.join(f'{x:.3f}' for x in cpu[on])} ms")
    print(f"  the line's cost: median CPU {statistics.median(cpu[True]) - statistics.median(cpu[False]):+.3f} ms,"
          f" median latency {statistics.median(latency[True]) - statistics.median(latency[False]):+.2f} ms a request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
