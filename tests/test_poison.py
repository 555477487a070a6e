"""No request can take the server down (issue 31): hostile input answered alone, with real processes.

- A corpus of hostile requests (the stride panic, odd Unicode, huge tokens, deep JSON, extreme numbers, many
  documents x many windows, bad headers, a client that leaves mid-body) sent while clients send normal
  requests, with two workers: no worker dies, MOSEC never restarts, every hostile request gets a 4xx or a
  200, every normal one a 200, /health stays green and the supervisor's memory does not grow past 64 MiB.
- A request that does kill its worker (injected: a marker in a passage makes the worker SIGKILL itself, as a
  crash in native code would) is answered with its own 500 after at most two worker deaths, quarantined,
  and spends no restart budget; nothing else fails.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import psutil
import pytest
from conftest import DOCS, QUERY, Clients, assert_nothing_went_down, wait_until

pytestmark = pytest.mark.timeout(600)

MARKER = "⟦poison⟧"
FAST = dict(probe_interval_s=1, probe_timeout_s=3, request_timeout_s=20)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.health + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def supervisor_rss(server) -> int:
    return psutil.Process(server.pidfile()["pid"]).memory_info().rss


class HealthWatch:
    """Polls /health in a thread (bounded by time) and records every answer that is not 200."""

    def __init__(self, server) -> None:
        self.url = server.health + "/health"
        self.bad: list[tuple[float, object]] = []
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        end = time.monotonic() + 300
        with httpx.Client(timeout=10) as c:
            while not self._stop.wait(0.2) and time.monotonic() < end:
                try:
                    r = c.get(self.url)
                    outcome: object = r.status_code
                    if r.status_code != 200:  # with the health's own reason, so a failure says what went wrong
                        try:
                            body = r.json()
                            outcome = (r.status_code, body.get("reason"), body.get("last_probe"))
                        except ValueError:
                            outcome = (r.status_code, r.text[:200])
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.seen += 1
                if outcome != 200:
                    self.bad.append((time.monotonic(), outcome))

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def raw_http(port: int, data: bytes, *, close_after: bool = True, read: bool = True) -> bytes:
    """Send raw bytes on a new connection; the answer (or b"" when the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if close_after and not read:
            return b""
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"content-length: *(\d+)", head, re.I)
    return m is not None and len(body) >= int(m.group(1))


def status_of(answer: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return int(m.group(1)) if m else 0


def post(path: str, body) -> tuple[str, bytes, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return path, raw, {"Content-Type": "application/json"}


def hostile_corpus() -> list[tuple[str, tuple[str, bytes, dict]]]:
    a400, b200 = " ".join(["a"] * 400), " ".join(["b"] * 200)
    long_word = "ж" * 49_000
    zalgo = "z" + "\u0301" * 20_000
    return [
        # the request: a query that leaves less room than the stride made tokenizers panic
        ("stride panic", post("/rerank", {"query": a400, "documents": [b200], "windows": 2})),
        ("stride panic, more windows", post("/rerank", {"query": a400, "documents": [b200 * 5], "windows": 8})),
        ("stride panic on cohere", post("/v1/rerank", {"query": a400, "documents": [b200], "windows": 8})),
        ("query just short of the panic", post("/rerank", {"query": " ".join(["a"] * 380),
                                                           "documents": [" ".join(["b"] * 4000)], "windows": 8})),
        ("query over its limit", post("/rerank", {"query": "борщ " * 3000, "documents": ["d"]})),
        ("lone surrogate", post("/rerank", b'{"query": "\\ud800", "documents": ["ok"]}')),
        ("lone surrogate in a document", post("/rerank", b'{"query": "q", "documents": ["a\\udfffb"]}')),
        ("surrogate pair escaped right", post("/rerank", b'{"query": "\\ud83d\\ude00", "documents": ["ok"]}')),
        ("invalid UTF-8", post("/rerank", b'{"query": "\xff\xfe", "documents": ["x"]}')),
        ("control characters", post("/rerank", {"query": "\x01\x02\x1b[31m", "documents": ["\x7f\u200b\ufeff"]})),
        ("only invisible characters", post("/rerank", {"query": "\u200b\u200d", "documents": ["\u2060"]})),
        ("NUL", post("/rerank", {"query": "a\x00b", "documents": ["c"]})),
        ("one huge token", post("/rerank", {"query": "q", "documents": [long_word]})),
        ("a huge token in windows", post("/rerank", {"query": "q", "documents": [long_word], "windows": 8})),
        ("combining marks", post("/rerank", {"query": zalgo[:8000], "documents": [zalgo]})),
        ("right-to-left and emoji", post("/rerank", {"query": "\u202eборщ😀" * 50, "documents": ["👩‍👩‍👧‍👦" * 500]})),
        ("deep JSON", post("/rerank", b'{"query": "q", "documents": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")),
        ("deep JSON object", post("/rerank", b'{"a":' * 20_000 + b"1" + b"}" * 20_000)),
        ("huge integer", post("/rerank", b'{"query": "q", "documents": ["d"], "top_n": ' + b"9" * 5000 + b"}")),
        ("float top_n", post("/rerank", b'{"query": "q", "documents": ["d"], "top_n": 1e400}')),
        ("negative windows", post("/rerank", {"query": "q", "documents": ["d"], "windows": -(2**63)})),
        ("windows over the limit", post("/rerank", {"query": "q", "documents": ["d"], "windows": 2**64})),
        ("boolean windows", post("/rerank", {"query": "q", "documents": ["d"], "windows": True})),
        ("top_k zero", post("/rerank", {"query": "q", "documents": ["d"], "top_k": 0})),
        ("top_n larger than documents", post("/rerank", {"query": "q", "documents": ["d"], "top_n": 10**18})),
        ("documents not a list", post("/rerank", {"query": "q", "documents": {"0": "d"}})),
        ("document objects without text", post("/v1/rerank", {"query": "q", "documents": [{"txt": "d"}]})),
        ("too many documents", post("/rerank", {"query": "q", "documents": ["d"] * 1001})),
        ("many documents x many windows", post("/rerank", {"query": "борщ", "windows": 8,
                                                           "documents": [" ".join(["суп"] * 2000)] * 20})),
        ("inference: a list of junk", post("/inference", [1, "x", None, {"query": "q"}])),
        ("inference: many long pairs", post("/inference", [{"query": "q " * 2000, "passage": "p " * 20000}] * 5)),
        ("duplicate keys", post("/rerank", b'{"query": "q", "query": 5, "documents": ["d"]}')),
        ("empty body", post("/rerank", b"")),
        ("whitespace body", post("/rerank", b"   \n\t  ")),
        ("not JSON", post("/rerank", b"query=q&documents=d")),
        ("JSON null", post("/rerank", b"null")),
        ("a large request with bad Unicode in chunk 3", post("/rerank", b'{"query": "q", "documents": ['
                                                             + b",".join([b'"' + b"x" * 1000 + b'"'] * 12
                                                                         + [b'"\\udc80"']) + b"]}")),
    ]


def raw_hostiles(port: int) -> list[tuple[str, bytes]]:
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    head = f"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return [
        ("header bytes that are not UTF-8", (head + "Authorization: Bearer ").encode() + b"\xff\xfe\xfd\r\n\r\n" + body),
        ("probe header not UTF-8", head.encode() + b"X-Reranker-Probe: \xc3\x28\r\n\r\n" + body),
        ("Content-Length not a number", b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n" + body),
        ("negative Content-Length", b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n" + body),
        ("two Content-Lengths", b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
                                + body),
        ("Content-Encoding gzip", (head + "Content-Encoding: gzip\r\n\r\n").encode() + body),
        ("a header line without a colon", head.encode() + b"NoColonHere\r\n\r\n" + body),
        ("an enormous header", head.encode() + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n" + body),
        ("a bad request line", b"GARBAGE\r\n\r\n"),
        ("HTTP/0.9", b"GET /\r\n"),
    ]


def send_hostiles(server) -> dict[str, object]:
    """Every hostile request once; name -> status (or the transport error)."""
    out: dict[str, object] = {}
    with httpx.Client(base_url=server.base, timeout=60) as c:
        for name, (path, raw, headers) in hostile_corpus():
            try:
                out[name] = c.post(path, content=raw, headers=headers).status_code
            except httpx.HTTPError as exc:
                out[name] = type(exc).__name__
    for name, data in raw_hostiles(server.port):
        out[name] = status_of(raw_http(server.port, data))
    # a client that leaves in the middle of its body
    head = b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    raw_http(server.port, head + b'{"query": "q", "documents": ["', read=False)
    out["client gone mid-body"] = "gone"
    return out


def test_hostile_requests_under_load_fail_alone_and_take_nothing_down(make_server):
    server = make_server(workers=2, **FAST)
    workers_before = sorted(server.processes()["score"])
    generation = json.loads((server.run_dir / "state.json").read_text())["mosec"]["generation"]
    rss_before = supervisor_rss(server)
    with HealthWatch(server) as health, Clients(server.base, FAST["request_timeout_s"], n=3) as clients:
        wait_until(lambda: sum(1 for *_, o in clients.records if o == 200) >= 5, 30, what="traffic flowing")
        results = {}
        for _round in range(2):  # twice: a hostile request must not do on its second try what it did not on its first
            results = send_hostiles(server)
        wait_until(lambda: health.seen >= 10, 30, what="health polled")
    rss_after = supervisor_rss(server)
    print("hostile corpus:", json.dumps(results, ensure_ascii=False))
    bad = {k: v for k, v in results.items() if not (v == "gone" or v == 200 or (isinstance(v, int) and 400 <= v < 500))}
    # raw malformed HTTP may be refused by the parser with a 400 or closed without an answer (status 0)
    bad = {k: v for k, v in bad.items() if not (v == 0 and k in dict(raw_hostiles(server.port)))}
    assert bad == {}, bad
    assert results["stride panic"] == 200 and results["lone surrogate"] == 422
    assert results["header bytes that are not UTF-8"] == 200  # no key is set: the header means nothing here
    outcomes = [o for *_, o in clients.records]
    assert outcomes and set(outcomes) == {200}, {o: outcomes.count(o) for o in set(outcomes)}
    assert health.bad == [], health.bad[:5]
    assert_nothing_went_down(server, workers_before)
    assert json.loads((server.run_dir / "state.json").read_text())["mosec"]["generation"] == generation
    growth = (rss_after - rss_before) / 2**20
    print(f"supervisor RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB (+{growth:.1f})")
    assert growth <= 64


@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_that_kills_its_worker_fails_alone_and_spends_no_restart_budget(make_server, workers):
    """20 poison requests in a row among normal traffic: 10 different ones (each kills at most two workers:
    once with the others of its envelope or alone, then alone) and the same one 10 times (after its two kills
    it is quarantined: refused at once, no worker touched). Each gets its own 500; nothing else fails; MOSEC is
    never restarted (it replaces the worker, the last one too) and the restart budget is never touched."""
    server = make_server(start=False, workers=workers, restart_budget=1, **FAST)
    server.inject_faults()
    server.env["RERANKER_TEST_POISON_MARKER"] = MARKER
    server.start()
    generation = json.loads((server.run_dir / "state.json").read_text())["mosec"]["generation"]
    states: list[str] = []
    poison_answers = []
    with Clients(server.base, FAST["request_timeout_s"], n=3) as clients, httpx.Client(timeout=60) as c:
        wait_until(lambda: sum(1 for *_, o in clients.records if o == 200) >= 5, 30, what="traffic flowing")
        for i in range(20):
            doc = f"{MARKER} {i if i < 10 else 'same'}"
            r = c.post(server.base + "/rerank", json={"query": QUERY, "documents": [DOCS[0], doc, DOCS[1]]})
            poison_answers.append((r.status_code, r.json().get("message", "")))
            states.append(server.status()["state"])
        wait_until(lambda: server.status().get("healthy"), 60, 0.2, what="healthy after the poison")
    print("poison answers:", poison_answers[:3], "...", "states seen:", sorted(set(states)))
    assert all(status == 500 for status, _ in poison_answers), poison_answers
    assert all("worker died" in m or "die before" in m for _, m in poison_answers), poison_answers
    outcomes = [o for *_, o in clients.records]
    assert set(outcomes) == {200}, {o: outcomes.count(o) for o in set(outcomes)}
    st = server.status()
    assert st["state"] == "running" and not {"failed", "restarting", "stopping"} & set(states), states
    assert st["restarts"]["server"] == 0
    assert json.loads((server.run_dir / "state.json").read_text())["mosec"]["generation"] == generation
    deaths = st["worker_deaths"]
    assert 11 <= deaths <= 2 * 11, deaths  # each distinct poison at least once, at most twice; the repeats never
    assert metric(server, "reranker_poisoned_requests_total", '{reason="worker_died"}') == 11
    assert metric(server, "reranker_poisoned_requests_total", '{reason="quarantined"}') == 9


def test_odd_authorization_headers_are_401_never_500(make_server):
    server = make_server(api_key="k3y")
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    head = f"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
    for value in (b"Bearer \xff\xfe", b"\xc3\x28", b"Bearer k3y\x80", b"bearer  k3y ", b"Basic k3y", b""):
        answer = raw_http(server.port, head + b"Authorization: " + value + b"\r\n\r\n" + body)
        assert status_of(answer) == (200 if value == b"bearer  k3y " else 401), (value, answer[:200])
    answer = raw_http(server.port, head + b"X-Reranker-Probe: \xc3\x28\r\nAuthorization: Bearer k3y\r\n\r\n" + body)
    assert status_of(answer) == 200
    log = (server.run_dir / "rerankctl.log").read_text()
    assert "Traceback" not in log and "gate error" not in log
