"""`rerankctl bench` kept working in CI: briefly, on the tiny model (targets live in the benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reranker_ops.bench import make_request, request_stream

pytestmark = pytest.mark.timeout(180)


def test_workloads_are_seeded_distinct_and_shaped():
    a = request_stream("rag", 3)
    b = request_stream("rag", 3)
    first = [next(a) for _ in range(20)]
    assert first == [next(b) for _ in range(20)]  # same seed, same work
    assert len({r["query"] for r in first}) == 20  # distinct: no cache can flatter
    for r in first:
        assert len(r["documents"]) == 20 and all(500 <= len(d) <= 700 for d in r["documents"])
    import random

    rng = random.Random(1)
    mixed = [make_request("mixed", rng, i) for i in range(50)]
    assert all(1 <= len(r["documents"]) <= 100 for r in mixed)
    assert all(20 <= len(d) <= 3001 for r in mixed for d in r["documents"])
    tiny = make_request("tiny", random.Random(0), 0)
    assert len(tiny["documents"]) == 1


@pytest.mark.parametrize("workload", ["tiny", "rag", "mixed"])
def test_bench_against_a_real_server(shared_server, workload):
    res = shared_server.cli("bench", "--url", shared_server.base, "--workload", workload, "-c", "2", "-n", "6",
                            "--json", "--timeout", "60")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["served"]
    assert out["requests"] == 6 and out["codes"] == {"200": 6} and out["errors"] == {}
    assert out["pairs_per_s"] > 0 and out["tokens_per_s"] > 0
    assert out["latency_ms"]["p50"] <= out["latency_ms"]["p95"] <= out["latency_ms"]["max"]


def test_bench_ceiling_and_ratios(shared_server):
    res = shared_server.cli("bench", "--url", shared_server.base, "-z", "1", "-c", "2", "--ceiling", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["ceiling"]["batched"]["pairs_per_s"] > 0 and out["ceiling"]["single"]["latency_ms_p50"] > 0
    # the ceiling is a fresh measurement of the group the trials selected, the trials kept beside it
    selection = out["ceiling"]["selection"]
    assert str(out["ceiling"]["batched"]["requests_per_call"]) in selection["by_group"]
    assert selection["pairs_per_s_without_memory_budgets"] > 0
    # at most as many requests a call as the two clients can have in the server
    assert selection["max_group"] == 2 and sorted(selection["by_group"]) == ["1", "2"]
    assert 0 < out["ratios"]["served_pairs_per_s_over_batched_ceiling"]
    # served and in-process side by side: three pairs of blocks, their order alternating, and the figures
    # reported are the sums of their blocks
    blocks = out["blocks"]
    assert [b["first"] for b in blocks] == ["served", "ceiling", "served"]
    for b in blocks:
        assert b["ratio"] == pytest.approx(b["served_pairs_per_s"] / b["ceiling_pairs_per_s"], abs=0.002)
    lo, hi = (f([b["ceiling_pairs_per_s"] for b in blocks]) for f in (min, max))
    assert lo * 0.999 <= out["ceiling"]["batched"]["pairs_per_s"] <= hi * 1.001
    lo, hi = (f([b["served_pairs_per_s"] for b in blocks]) for f in (min, max))
    assert lo * 0.999 <= out["served"]["pairs_per_s"] <= hi * 1.001
    assert out["served"]["codes"] == {"200": out["served"]["requests"]}
    # --blocks 1: served, then the ceiling, as one window each
    res = shared_server.cli("bench", "--url", shared_server.base, "-z", "1", "-c", "2", "--ceiling", "--blocks", "1",
                            "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "blocks" not in out and out["ratios"]["served_pairs_per_s_over_batched_ceiling"] > 0
    assert out["ceiling"]["selection"]["max_group"] == 2
    res = shared_server.cli("bench", "--url", shared_server.base, "-n", "2", "--workload", "nope")
    assert res.returncode != 0 and "unknown workload" in res.stderr


def test_bench_load_with_either_client(shared_server):
    for client in ("stdlib", "httpx"):
        res = shared_server.cli("bench", "--url", shared_server.base, "-c", "3", "-n", "6", "--client", client, "--json")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)["served"]
        assert out["codes"] == {"200": 6} and out["errors"] == {} and out["tokens_per_s"] > 0


def test_the_lean_client_sends_a_request_that_timed_out_once():
    """It opens a kept-alive connection again once when the server had closed it; a request that got no
    answer in time is not sent a second time (a load generator would double the work it measures)."""
    import socket
    import threading

    from reranker_ops.bench import LeanClient

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.1)
    seen: list[bytes] = []
    conns: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.wait(0):  # bounded: the test sets it, and joins with a deadline
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conns.append(conn)
            conn.settimeout(5)
            seen.append(conn.recv(65536))  # read the request, never answer

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    lean = LeanClient(f"http://127.0.0.1:{srv.getsockname()[1]}/rerank", {}, timeout=0.5)
    try:
        with pytest.raises(ConnectionError):
            lean.post({"query": "q", "documents": ["d"]})
    finally:
        lean.close()
        done.set()
        t.join(timeout=10)
        srv.close()
        for c in conns:
            c.close()
    assert len(seen) == 1 and seen[0].startswith(b"POST /rerank")


def test_bench_refuses_at_once_when_nothing_listens(shared_server):
    """Aimed at a port where nothing listens, bench says so in one line with what to do, before any load: a
    closed loop would otherwise count refusals for the whole duration and print them as a result."""
    from conftest import free_port

    port = free_port()
    for args in (["-z", "600"], ["--paired", "-z", "600"], ["--mixed", "-z", "600"], ["-z", "600", "--ceiling"]):
        res = shared_server.cli("bench", "--url", f"http://127.0.0.1:{port}", *args, timeout=60)
        assert res.returncode == 14, (args, res.stdout, res.stderr)
        assert f"nothing listens at 127.0.0.1:{port}" in res.stderr and "rerankctl serve --daemon" in res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""


def test_bench_counts_errors_instead_of_hanging(shared_server):
    """A server that accepts connections and closes them unanswered: every request is counted as failed, and the
    run ends after the requests asked for."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(1.0)
    port = srv.getsockname()[1]
    stop = threading.Event()
    accepted = [0]

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            accepted[0] += 1
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = shared_server.cli("bench", "--url", f"http://127.0.0.1:{port}", "-n", "3", "--json", "--timeout", "2")
        # and a server that does not answer is not measured as fast
        paired = shared_server.cli("bench", "--url", f"http://127.0.0.1:{port}", "--paired", "-z", "1",
                                   "--timeout", "2")
    finally:
        stop.set()
        t.join(timeout=10)
        srv.close()
    assert not t.is_alive()
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["served"]
    assert out["ok"] == 0 and sum(out["errors"].values()) == 3
    assert accepted[0] >= 4  # the reachability check, then a connection for each request (none is kept)
    assert paired.returncode == 1 and "0 requests" in paired.stdout and "failed" in paired.stdout, \
        paired.stdout + paired.stderr


def test_bench_paired_measures_what_the_server_adds_beside_the_same_request_in_process(shared_server):
    """`--paired`: each request is also scored in-process; the scores must agree with the server's, and the
    server's cost is the median of the paired latency differences."""
    res = shared_server.cli("bench", "--url", shared_server.base, "--paired", "-z", "1", "--warmup", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["paired"]
    assert out["pairs_measured"] >= 3 and out["failed"] == 0
    assert out["max_score_difference"] < 1e-5  # the same requests, scored the same way on both sides
    assert out["served_p50_ms"] > 0 and out["inprocess_p50_ms"] > 0
    assert out["added_ms"]["p25"] <= out["added_ms"]["p50"] <= out["added_ms"]["p75"]
    assert out["client"] == "stdlib"
    res = shared_server.cli("bench", "--url", shared_server.base, "--paired", "-z", "1", "--warmup", "1", "--json",
                            "--client", "httpx")
    out = json.loads(res.stdout)["paired"]
    assert out["client"] == "httpx" and out["pairs_measured"] >= 3 and out["failed"] == 0


def test_the_lean_client_opens_again_a_connection_the_server_closed_while_idle():
    """The paired measure's client keeps its connection alive; a server that closes an idle one (without
    saying so) costs one reconnect, not a failed request."""
    import socket
    import threading

    from reranker_ops.bench import LeanClient

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    served = []

    def serve() -> None:
        for _ in range(3):  # each connection answers one request, then is closed without "Connection: close"
            conn, _ = srv.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(v for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                                  if k.lower() == b"content-length"))
                while len(body) < length:
                    body += conn.recv(65536)
                served.append(json.loads(body))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = LeanClient(f"http://127.0.0.1:{port}/rerank", {}, timeout=5)
    try:
        assert [client.post({"n": i}) for i in range(3)] == [(200, b"{}")] * 3
    finally:
        client.close()
        srv.close()
    t.join(5)
    assert served == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_the_lean_client_reads_every_way_an_answer_can_be_framed():
    """It writes and reads HTTP/1.1 itself: answers by Content-Length (sent a byte at a time), chunked (with an
    extension and a trailer), up to the connection's end, and with Connection: close (the next request goes on
    a new connection). An answer it cannot read is an error, never a guess."""
    import socket
    import threading

    from reranker_ops.bench import LeanClient

    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 8\r\n\r\n{\"a\": 1}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\n{\"b\"\r\n4\r\n: 2}\r\n0\r\nT: 1\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ]
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)
    port = srv.getsockname()[1]
    connections: list[int] = []  # how many requests each connection carried

    def read_request(conn: socket.socket, data: bytes) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                raise EOFError
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(v for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                          if k.lower() == b"content-length"))
        while len(rest) < length:
            rest += conn.recv(65536)
        return head, rest[length:]

    def serve() -> None:
        left = list(answers)
        while left:
            conn, _ = srv.accept()
            conn.settimeout(10)
            connections.append(0)
            with conn:
                data = b""
                while left:
                    try:
                        _head, data = read_request(conn, data)
                    except EOFError:
                        break
                    connections[-1] += 1
                    answer = left.pop(0)
                    if connections[-1] == 1 and len(connections) == 1:
                        for i in range(len(answer)):  # the first answer, a byte at a time
                            conn.sendall(answer[i:i + 1])
                    else:
                        conn.sendall(answer)
                    if b"Connection: close" in answer or answer.startswith(b"HTTP/1.0") or b": x" in answer:
                        break

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = LeanClient(f"http://127.0.0.1:{port}/rerank", {"Authorization": "Bearer k"}, timeout=5)
    try:
        assert client.post({"n": 0}) == (200, b'{"a": 1}')
        assert client.post({"n": 1}) == (200, b'{"b": 2}')
        assert client.post({"n": 2}) == (429, b"{}")
        assert client.post({"n": 3}) == (200, b"until the end")
        with pytest.raises(ConnectionError, match="unreadable"):
            client.post({"n": 4})
    finally:
        client.close()
        t.join(10)
        srv.close()
    assert not t.is_alive()
    # three on the first connection (closed by its third answer), then one each
    assert connections == [3, 1, 1]


def test_ceiling_trials_alternate_their_candidates_in_slices():
    """The selection's candidates share the machine: round-robin slices, the order reversed every pass, their
    figures summed; one pass when a call is longer than a slice. (The scoring itself is replaced here by a
    recorder: what is tested is the order and the sums.)"""
    from reranker_ops.ceiling import Ceiling

    c = Ceiling.__new__(Ceiling)
    c.budgets = (2048, 512 * 512)
    seen: list[tuple[int, float]] = []

    class _Scorer:
        token_budget, attention_budget = c.budgets

    c.scorer = _Scorer()
    call_s = {1: 0.1, 2: 0.1, 4: 0.1}

    def run(group: int, seconds: float):
        seen.append((group, round(seconds, 3)))
        return group, 2 * group, max(seconds, call_s[group]), [0.01]

    c._run = run
    out = c._trials([(1, c.budgets), (2, c.budgets), (4, c.budgets)], 3.0)
    assert [g for g, _s in seen] == [1, 2, 4, 4, 2, 1, 1, 2, 4]
    assert {s for _g, s in seen} == {1.0}
    assert out[(2, c.budgets)] == (6, 12, 3.0, [0.01] * 3)
    seen.clear()
    call_s[4] = 13.0  # one call far longer than a slice: a single pass
    c._trials([(1, c.budgets), (4, c.budgets)], 3.0)
    assert [g for g, _s in seen] == [1, 4]


def test_perf_checks_every_target_at_every_precision_on_its_median_and_names_what_it_did_not_measure():
    """benchmarks/perf.py's verdict: a figure at its target passes, one just past it is named as missed (and
    only that one, with its precision), and what the run did not measure (a precision, infinity_emb, the start)
    is said to be unmeasured, never "met"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("perf_under_test", Path(__file__).parents[1] / "benchmarks" / "perf.py")
    perf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf)
    t = perf.TARGETS
    at = {"rag_c4_ratio": t["rag_c4_ratio_min"], "tiny_c10_ratio": t["tiny_c10_ratio_min"],
          "tiny_c1_p50_over_ms": t["tiny_c1_p50_over_ms_max"], "rag_over_infinity": t["rag_over_infinity_min"]}

    def run(precisions=perf.PRECISIONS, infinity=True, start=t["start_ratio_max"], shape="dity",
            **override: float) -> dict:
        r = {"precisions": list(precisions), "shape": shape, "targets": t}
        for prec in precisions:
            figures = {**at, "memory": t[f"{prec}_tree_pss_mib_max"]}
            figures.update({k.split(":")[1]: v for k, v in override.items() if k.startswith(prec + ":")})
            p = {k: {"median": v} for k, v in figures.items() if k not in ("memory", "rag_over_infinity")}
            p["memory"] = {"total_mib": {"median": figures["memory"]}}
            if infinity and prec != "int8":
                p["infinity"] = {}
                p["rag_over_infinity"] = {"median": figures["rag_over_infinity"]}
            r[prec] = p
        if start is not None:
            r["start_ratio"] = {"median": start}
        r["misses"] = perf.check(r)
        r["unmeasured"] = perf.unmeasured(r)
        return r

    at_target = run()
    assert at_target["misses"] == [] and at_target["unmeasured"] == []
    assert perf.verdict(at_target) == "All targets met."
    past = {"rag_c4_ratio": ("rag c=4", -0.001), "tiny_c10_ratio": ("tiny c=10", -0.001),
            "tiny_c1_p50_over_ms": ("tiny c=1", 0.05), "memory": ("tree PSS", 1),
            "rag_over_infinity": ("rag over infinity_emb", -0.01)}
    for prec in ("fp32", "bf16", "int8"):
        for key, (named, step) in past.items():
            if key == "rag_over_infinity" and prec == "int8":
                continue  # infinity_emb has no INT8 on CPU: nothing to compare
            base = t[f"{prec}_tree_pss_mib_max"] if key == "memory" else at[key]
            r = run(**{f"{prec}:{key}": base + step})
            assert len(r["misses"]) == 1 and r["misses"][0].startswith(f"{prec} {named}"), (prec, key, r["misses"])
            assert perf.verdict(r).startswith(f"Missed: {prec} {named}")
    late = run(start=t["start_ratio_max"] + 0.01)
    assert len(late["misses"]) == 1 and late["misses"][0].startswith("start")
    # a shorter model than DiTy's is not held to DiTy's memory and start targets (its compile is shorter)
    assert run(shape="dity-short", start=9.0, **{"int8:memory": 10_000})["misses"] == []
    partial = run(precisions=("fp32", "int8"), infinity=False, start=None)
    assert partial["misses"] == []
    assert partial["unmeasured"] == ["bf16 (not asked or not on this CPU)", "infinity_emb side by side (--infinity)",
                                     "start time (fp32 not measured)"]
    assert perf.verdict(partial).startswith("Every measured target met; not measured: bf16")


def test_tokens_per_s_from_usage_or_from_teis_header():
    """Tokens/s beside pairs/s: from ``usage.total_tokens`` (ours, infinity's) or, for a server answering a bare
    list as text-embeddings-inference does, from its ``x-compute-tokens`` header. TEI cannot run here: a
    loopback stand-in answers in its shape."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from reranker_ops.bench import answer_tokens, run_load

    class TeiShaped(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            out = json.dumps([{"index": i, "score": 0.5} for i in range(len(body["documents"]))]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Compute-Tokens", str(7 * len(body["documents"])))
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), TeiShaped)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for client in ("stdlib", "httpx"):
            r = run_load(f"http://127.0.0.1:{httpd.server_address[1]}", workload="tiny", concurrency=2,
                         duration=None, requests=8, client=client)
            assert r.requests == 8 and r.tokens == 7 * r.pairs > 0, (client, r.tokens, r.pairs)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert answer_tokens(b'{"usage": {"total_tokens": 12}}', "99") == 12  # the body's own count first
    assert answer_tokens(b'[{"index": 0}]', "31") == 31
    assert answer_tokens(b'[{"index": 0}]', None) == answer_tokens(b"{oops", "x1") == 0
