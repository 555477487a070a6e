"""The API port's fast lane (reranker_ops/front/fastlane.py): a scoring POST of a known small length is read and
answered without aiohttp; anything else, and everything after it on its connection, is aiohttp's, byte for
byte. Which one answered is visible: aiohttp adds a ``Server`` header, the fast lane does not."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import DOCS, QUERY, wait_until

from reranker_ops.front.fastlane import serialize
from reranker_ops.front.responses import error_response

pytestmark = pytest.mark.timeout(300)

BODY = json.dumps({"query": QUERY, "documents": DOCS}).encode()


def post(path: str, body: bytes = BODY, extra: str = "", version: str = "1.1") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Answers:
    """Reads HTTP/1.1 answers (Content-Length framed) off one socket, in order, within a deadline."""

    def __init__(self, sock: socket.socket, deadline_s: float = 60) -> None:
        self.sock, self.buf = sock, b""
        self.deadline = time.monotonic() + deadline_s

    def _more(self) -> None:
        self.sock.settimeout(max(0.01, self.deadline - time.monotonic()))
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError(f"the server closed the connection; unread: {self.buf[:200]!r}")
        self.buf += data

    def next(self) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        if status == 100:
            return self.next()
        length = int(headers.get("content-length", 0))
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def test_pipelined_requests_are_answered_in_order_and_the_rest_of_the_connection_goes_to_aiohttp(shared_server):
    """Two scoring requests sent at once are the fast lane's; a GET after them is handed to aiohttp with the
    request after it (a chunked body), and aiohttp answers both, on the same connection."""
    chunked = (b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
               b"\r\n\r\n" + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n")
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=30) as s:
        s.sendall(post("/rerank") + post("/v1/rerank") + b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n" + chunked)
        answers = Answers(s)
        got = [answers.next() for _ in range(4)]
    assert [status for status, _h, _b in got] == [200, 200, 200, 200], got
    assert ["server" in h for _s, h, _b in got] == [False, False, True, True], [h for _s, h, _b in got]
    fast, aio = json.loads(got[0][2]), json.loads(got[3][2])
    assert [r["index"] for r in fast["results"]] == [r["index"] for r in aio["results"]]
    assert json.loads(got[2][2])["model_id"]  # /info, from aiohttp's app
    for _s, h, _b in got[:2]:  # the fast lane's answers carry what aiohttp's do
        assert h["content-type"].startswith("application/json") and h["date"] and h["x-request-id"]
        assert h["x-compute-type"] == "cpu" and "connection" not in h


def test_a_thousand_pipelined_requests_on_one_connection(shared_server):
    """Requests a client sends far ahead of reading (reading pauses past a bound, then goes on): every one is
    answered, in order, and the server serves others meanwhile."""
    n = 1000
    blank = post("/rerank", b" ")  # answered by the gate itself (400: empty body), without a worker
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=30) as s:
        s.sendall(blank * n)
        r = httpx.post(shared_server.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
        assert r.status_code == 200, r.text
        answers = Answers(s)
        got = [answers.next() for _ in range(n)]
    assert {status for status, _h, _b in got} == {400}
    assert all(b"empty body" in body for _s, _h, body in got)


@pytest.mark.parametrize("raw, status, server_header", [
    # HTTP/1.0: aiohttp's
    (post("/rerank", version="1.0"), 200, True),
    # Expect: 100-continue: aiohttp says 100 Continue, then answers
    (post("/rerank", extra="Expect: 100-continue\r\n"), 200, True),
    # two Content-Lengths that differ: llhttp refuses the head here; aiohttp answers its 400
    (post("/rerank", extra="Content-Length: 3\r\n"), 400, True),
    # a header line over aiohttp's bound: aiohttp's to refuse (the fast lane takes no head over it)
    (post("/rerank", extra="X-Big: " + "a" * 9000 + "\r\n"), 400, True),
    # found by the fuzz test: aiohttp answered a text head of another version as "HTTP/2.0 200 OK"
    (post("/rerank", version="2.0"), 505, False),
    (b"GET /info HTTP/2.0\r\nHost: x\r\n\r\n", 505, False),
    (b"GET /info HTTP/3.0\r\nHost: x\r\n\r\n", 400, True),  # a version neither parser knows: aiohttp's 400
    # a query string: the route as aiohttp routes it
    (post("/rerank?x=1"), 200, True),
    # the fast lane's own: a route with a body of a known length
    (post("/v2/rerank", json.dumps({"query": QUERY, "documents": DOCS, "model": "any"}).encode()), None, False),
])
def test_what_the_fast_lane_does_not_take_is_answered_by_aiohttp(shared_server, raw, status, server_header):
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=30) as s:
        s.sendall(raw)
        got_status, headers, body = Answers(s).next()
    if status is not None:
        assert got_status == status, body[:300]
    assert ("server" in headers) is server_header, headers
    if got_status != 400:  # a head aiohttp's parser refuses gets its own one-line text answer, as before
        assert headers["content-type"].startswith("application/json"), headers


def test_bodies_are_counted_as_they_arrive_and_released_however_they_end(make_server):
    """With RERANKER_MAX_BUFFERED_BYTES small: a body that would cross it is refused (429, the connection
    closed after the rest of the body was read and dropped), bodies cut off halfway and requests refused at
    their head leave nothing counted: every request after them is served."""
    server = make_server(max_buffered_bytes=4096, max_in_flight=4)
    big = json.dumps({"query": QUERY, "documents": ["слово " * 900]}).encode()  # ~10 KiB: crosses 4096
    assert 4096 < len(big) < 64 * 1024
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(post("/rerank", big))
        status, headers, body = Answers(s).next()
    assert status == 429 and b"RERANKER_MAX_BUFFERED_BYTES" in body and headers.get("connection") == "close", body
    for _ in range(10):  # 1000 bytes of a 6000-byte body, then the client leaves: four kept would fill the bound
        cut = post("/rerank", big[:6000])
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(cut[: len(cut) - 5000])
    for _ in range(10):  # refused at the head (the wrong method is aiohttp's; a bad key is not set here)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(post("/rerank", b"{", extra="Content-Encoding: gzip\r\n"))
            assert Answers(s).next()[0] == 415
    wait_until(lambda: all(httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS},
                                      timeout=30).status_code == 200 for _ in range(10)), 30,
               what="every request served after the cut and refused ones")


def test_an_answer_whose_header_would_end_its_line_is_refused():
    """The fast lane writes answers itself: no header name or value can add a line (aiohttp's writer refuses
    them too)."""
    resp = error_response(400, "x")
    resp.headers["X-Evil"] = "a\r\nSet-Cookie: b"
    with pytest.raises(ValueError):
        serialize(resp, False, b"now")
    ok = serialize(error_response(429, "busy", {"Retry-After": "1"}), True, b"now")
    head, body = ok.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n") and b"\r\nConnection: close" in head
    assert b"\r\nRetry-After: 1" in head and b"Content-Length: %d" % len(body) in head


def _fuzzed_requests():
    """A scoring request's bytes, taken apart: request line, header fields (odd Unicode, controls, CR/LF
    inside values, duplicated or wrong lengths, the fields that move a request out of the fast lane), body,
    and the points where the client splits its sends."""
    from hypothesis import strategies as st

    names = st.sampled_from(["Content-Length", "content-length", "Transfer-Encoding", "Expect", "Connection",
                             "Content-Encoding", "Authorization", "X-Request-Id", "Host", "Upgrade",
                             "X-Reranker-Probe", "traceparent"]) | st.text(min_size=1, max_size=12)
    values = st.sampled_from(["0", "5", "-1", "1e3", " 7", "99999999999999999999", "chunked", "100-continue",
                              "close", "keep-alive", "gzip", "identity", "Bearer x", "a\r\nX-Evil: 1", "\x00",
                              "я" * 300]) | st.text(max_size=40)
    return st.fixed_dictionaries({
        "method": st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "POSTX", "P OST"]),
        "path": st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank", "/inference", "/rerank?x=1", "/RERANK",
                                 "/rerank/", "//rerank", "*"]),
        "version": st.sampled_from(["1.1", "1.1", "1.0", "2.0", "1.1 x", "1"]),
        "fields": st.lists(st.tuples(names, values), max_size=4),
        "body": st.sampled_from([BODY, b"", b" ", b"{", b"[" * 300, "{\"query\": \"\udcff\"}".encode("utf-8",
                                "surrogatepass")]) | st.binary(max_size=64),
        "length": st.sampled_from(["exact", "exact", "exact", "none", "short", "twice"]),
        "cuts": st.lists(st.integers(min_value=0, max_value=2000), max_size=3),
    })


def _raw(case: dict) -> bytes:
    body = case["body"]
    head = f"{case['method']} {case['path']} HTTP/{case['version']}\r\nHost: x\r\n"
    for name, value in case["fields"]:
        head += f"{name}: {value}\r\n"
    if case["length"] == "exact":
        head += f"Content-Length: {len(body)}\r\n"
    elif case["length"] == "short":  # a length under the body: the rest is read as the next request
        head += f"Content-Length: {max(0, len(body) - 3)}\r\n"
    elif case["length"] == "twice":
        head += f"Content-Length: {len(body)}\r\nContent-Length: {len(body)}\r\n"
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + body


def test_fuzzed_requests_are_answered_or_refused_alone_and_nothing_restarts(shared_server):
    """Hostile and odd requests, sent raw and split at random points: each is answered with an HTTP/1.1 status
    the server gives on purpose (never a 500 of the gate's own) or its connection is closed, or it waits for
    the rest of a body it declared (the body deadline's, not tried here); the supervisor and MOSEC are the
    same processes after them, and scoring still works."""
    from hypothesis import HealthCheck, given, settings

    before = shared_server.processes()

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=_fuzzed_requests())
    def one(case):
        raw = _raw(case)
        with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as s:
            start = 0
            try:
                for cut in sorted(c % (len(raw) + 1) for c in case["cuts"]):
                    s.sendall(raw[start:cut])
                    start = cut
                s.sendall(raw[start:])
            except (BrokenPipeError, ConnectionResetError):
                # the server answered a head it refuses and closed before the client sent the rest: it may
                # (seen when the machine was busy); its answer, if it came, is read and judged below
                pass
            s.settimeout(2)  # a request whose declared body never comes gets no answer: that wait ends here
            got = b""
            try:
                while b"\r\n\r\n" not in got:
                    data = s.recv(65536)
                    if not data:
                        break
                    got += data
            except (socket.timeout, ConnectionResetError):
                pass
        if got:
            # aiohttp answers an HTTP/1.0 request, or a request line it cannot read, in HTTP/1.0
            assert got.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), got[:200]
            status = int(got[9:12])
            assert status != 500 or b"the model server failed" in got, got[:400]

    one()
    assert shared_server.processes() == before
    r = httpx.post(shared_server.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 200, r.text
