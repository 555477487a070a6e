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

``--floor [--shape dity-short] [--precision int8]``: instead, what any Python gate must cost, beside ours.
Four paths to the same MOSEC, each lone request sent down all four back to back (the order rotates), medians
of the paired differences against the straight path: ``raw``, the least an asyncio front can do (a Protocol
that parses with httptools, seals the body into an envelope of one, writes it to a kept-alive connection
to MOSEC and writes the answer back from the upstream socket's own callback: no task, no scheduler, no
checks); ``aiohttp``, the same in one aiohttp handler; and the gate. Both fronts run in a process of their
own, as the gate does. ``gate - aiohttp`` is what our request path costs beyond the framework, ``aiohttp -
raw`` the framework's own, ``raw - straight`` the extra hop itself (two more loopback sends and wakeups),
which no Python front can avoid.
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def run_state(run_dir: Path) -> dict:
    """The server's ``state.json`` (what ``status`` reads): its pid, MOSEC's port and generation."""
    return json.loads((run_dir / "state.json").read_text())


def straight_to_mosec(run_dir: Path, state: dict, body: bytes) -> tuple[int, bytes, bytes]:
    """MOSEC's port, the generation's secret, and ``body`` sealed as an envelope of one: what only the gate sends,
    here from the run dir's files (as only the server's owner can read them)."""
    from reranker_ops.protocol.envelope import part_head, seal
    from reranker_ops.protocol.genconfig import GenerationConfig

    gen = state["mosec"]["generation"]
    secret = GenerationConfig.read(next((run_dir / "mosec").glob(f"*.g{gen}.json"))).secret.encode()
    part = part_head("0", len(body)) + body
    return state["mosec"]["port"], secret, seal(secret, 1, [part]) + part


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-ms", type=float, default=1.5)
    ap.add_argument("--access-log", action="store_true", help="measure the access log's cost instead")
    ap.add_argument("--floor", action="store_true", help="the gate beside the least a Python front costs")
    ap.add_argument("--shape", default="dity-short", choices=("dity", "dity-short"), help="with --floor")
    ap.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"), help="with --floor")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="with --floor: the model's folder")
    args = ap.parse_args()
    if args.access_log:
        return access_log_cost(args.requests, args.repeats)
    if args.floor:
        return floor_cost(args.requests, args.shape, args.precision, args.out)
    from chaos import build_model
    from conftest import DOCS, QUERY, ServerHandle

    model = build_model(Path(tempfile.gettempdir()) / "rerankctl-chaos-model")
    server = ServerHandle(model, Path(tempfile.mkdtemp(prefix="gate-cost-")))
    server.start()
    try:
        body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
        state = run_state(server.run_dir)
        mosec_port, _secret, direct_body = straight_to_mosec(server.run_dir, state, body)
        direct_url = f"http://127.0.0.1:{mosec_port}/score"
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
        procs = {on: psutil.Process(int(run_state(s.run_dir)["pid"]))
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


def _to_mosec(mosec_port: int, secret: bytes):
    """The floor fronts' connection to MOSEC, made on the running loop: ``send(body, then)`` seals ``body`` into an
    envelope of one and writes it; ``then`` gets the answer's JSON, from the socket's own callback."""
    import asyncio

    from reranker_ops.http1 import ClientConnection
    from reranker_ops.protocol.envelope import open_answer, part_head, seal, split_answers

    class ToMosec(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.http, self.then = transport, ClientConnection(), None

        def send(self, body: bytes, then) -> None:
            part = part_head("0", len(body)) + body
            self.then = then
            self.transport.writelines(self.http.request("/score", (), [seal(secret, 1, [part]), part]))

        def data_received(self, data):
            got = self.http.receive(data)
            if got is not None:
                (answer, _timing), = split_answers(open_answer(secret, 1, got[1]), 1)
                self.then(answer)

    return asyncio.get_running_loop().create_connection(ToMosec, "127.0.0.1", mosec_port)


def _raw_front(port: int, mosec_port: int, secret: bytes, ready) -> None:
    """The floor: one Protocol, httptools both ways, the answer written from the upstream's callback."""
    import asyncio

    import httptools

    async def main():
        _, up = await _to_mosec(mosec_port, secret)

        class Front(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport, self.parser, self.body = transport, httptools.HttpRequestParser(self), []

            def data_received(self, data):
                self.parser.feed_data(data)

            def on_body(self, body):
                self.body.append(body)

            def on_message_complete(self):
                body, self.body = b"".join(self.body), []
                up.send(body, lambda answer: self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(answer), answer)))

        await asyncio.get_running_loop().create_server(Front, "127.0.0.1", port)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _aiohttp_front(port: int, mosec_port: int, secret: bytes, ready) -> None:
    """The same in one aiohttp handler (no middleware, no access log): what the framework adds to the floor."""
    import asyncio

    from aiohttp import web

    async def main():
        _, up = await _to_mosec(mosec_port, secret)

        async def handle(request: web.Request) -> web.Response:
            answer = asyncio.get_running_loop().create_future()
            up.send(await request.read(), answer.set_result)
            return web.Response(body=await answer, content_type="application/json")

        app = web.Application()
        app.router.add_post("/rerank", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def floor_cost(rounds: int, shape: str, precision: str, out: Path) -> int:
    import http.client
    import itertools
    import multiprocessing

    from conftest import free_port
    from perf import Server, model_of_shape

    model = model_of_shape(out.resolve(), shape, (precision,))
    run_dir = Path(tempfile.mkdtemp(prefix="gate-floor-"))
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each, as the gate's process is
    fronts = []
    conns: dict = {}
    with Server(model, run_dir, precision=precision) as srv:
        body = json.dumps({"query": "кто написал войну и мир", "documents": ["Лев Толстой написал роман"]}).encode()
        mosec_port, secret, sealed = straight_to_mosec(run_dir, run_state(run_dir), body)
        ports = {}
        try:
            for name, target in (("raw", _raw_front), ("aiohttp", _aiohttp_front)):
                ports[name] = free_port()
                ready = ctx.Event()
                proc = ctx.Process(target=target, args=(ports[name], mosec_port, secret, ready), daemon=True)
                proc.start()
                fronts.append(proc)
                if not ready.wait(60):
                    raise SystemExit(f"the {name} front did not start")
            conns = {"straight": (http.client.HTTPConnection("127.0.0.1", mosec_port), "/score", sealed),
                     "raw": (http.client.HTTPConnection("127.0.0.1", ports["raw"]), "/rerank", body),
                     "aiohttp": (http.client.HTTPConnection("127.0.0.1", ports["aiohttp"]), "/rerank", body),
                     "gate": (http.client.HTTPConnection("127.0.0.1", srv.port), "/rerank", body)}

            def send(name: str) -> float:
                conn, path, payload = conns[name]
                t0 = time.perf_counter()
                conn.request("POST", path, payload, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                took = time.perf_counter() - t0
                assert r.status == 200, (name, r.status)
                return took

            for name in conns:
                for _ in range(30):
                    send(name)
            times: dict[str, list[float]] = {name: [] for name in conns}
            orders = list(itertools.permutations(conns))
            for i in range(rounds):
                for name in orders[i % len(orders)]:
                    times[name].append(send(name))
        finally:
            for conn, _path, _payload in conns.values():
                conn.close()
            for proc in fronts:
                proc.kill()
                proc.join(10)
    shutil.rmtree(run_dir, ignore_errors=True)  # the server stopped: nothing of it is left to read
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}

    def added(a: str, b: str) -> float:
        return statistics.median(x - y for x, y in zip(times[a], times[b])) * 1000

    print(f"a lone request, {rounds} rounds, {shape} {precision}: medians "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    print(f"  added over straight to MOSEC (median of paired differences): raw front {added('raw', 'straight'):.2f},"
          f" aiohttp front {added('aiohttp', 'straight'):.2f}, the gate {added('gate', 'straight'):.2f} ms")
    print(f"  so: the hop itself {added('raw', 'straight'):.2f}, aiohttp's own {added('aiohttp', 'raw'):.2f},"
          f" our request path {added('gate', 'aiohttp'):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
