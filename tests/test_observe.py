"""Following one request end to end: its id (taken from the client, bounded and cleaned, or made) in the answer
and in its log lines, JSON logs, and OpenTelemetry traces received by a real OTLP/HTTP receiver."""

from __future__ import annotations

import gzip
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import wait_until

pytestmark = pytest.mark.timeout(240)

QUERY = "Как приготовить борщ?"
DOCS = ["Борщ — суп из свёклы.", "Завтра дождь.", "Нейронные сети."]
STAGES = {"admission", "queue", "tokenize", "inference"}


class OtlpReceiver:
    """A small OTLP/HTTP collector: decodes every ``POST /v1/traces`` (protobuf, as the exporter sends it) with
    OpenTelemetry's own message classes and keeps the spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[dict] = []
        self.resources: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                with outer.lock:
                    for rs in msg.resource_spans:
                        outer.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                outer.spans.append({
                                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                    "parent": s.parent_span_id.hex(), "name": s.name, "kind": s.kind,
                                    "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                                    "attrs": {a.key: (a.value.string_value or a.value.int_value)
                                              for a in s.attributes},
                                })
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "OtlpReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


def json_lines(server) -> list[dict]:
    return [json.loads(line) for line in (server.run_dir / "rerankctl.log").read_text().splitlines() if line]


def rerank(server, headers: dict | None = None, body: dict | None = None) -> httpx.Response:
    return httpx.post(server.base + "/rerank", json=body or {"query": QUERY, "documents": DOCS},
                      headers=headers or {}, timeout=60)


def test_request_ids_are_taken_bounded_and_cleaned_or_made(make_server):
    server = make_server()
    r = rerank(server, {"X-Request-Id": "rag-7f3a.2:retry@1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "rag-7f3a.2:retry@1"
    made = rerank(server).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made) and made != rerank(server).headers["x-request-id"]
    # what cannot be part of an id is dropped (no forged log line, no header injection); long ones are cut
    assert rerank(server, {"X-Request-Id": 'a b"c<d>\te'}).headers["x-request-id"] == "abcde"
    assert rerank(server, {"X-Request-Id": "x" * 5000}).headers["x-request-id"] == "x" * 128
    assert re.fullmatch(r"[0-9a-f]{32}", rerank(server, {"X-Request-Id": "\"<>"}).headers["x-request-id"])
    # every answer carries one: errors, refusals and the other routes too
    for resp in (httpx.post(server.base + "/rerank", content=b"{", headers={"X-Request-Id": "bad-1"}, timeout=30),
                 httpx.get(server.base + "/rerank", headers={"X-Request-Id": "bad-2"}, timeout=30),
                 httpx.post(server.base + "/v2/rerank", json={"query": "q", "documents": ["d"], "model": "nope"},
                            headers={"X-Request-Id": "bad-3"}, timeout=30)):
        assert resp.status_code >= 400 and resp.headers["x-request-id"].startswith("bad-")
    # the default text log: the request's line ends with its id
    text = (server.run_dir / "rerankctl.log").read_text()
    assert re.search(r"POST /rerank 200 [\d.]+ms \d+ bytes \[request rag-7f3a\.2:retry@1\]", text), text[-2000:]


def test_json_logs_carry_the_request_id_of_every_line_of_a_request(make_server):
    server = make_server(log_format="json")
    ids = [f"req-{i}-{secrets.token_hex(4)}" for i in range(3)]
    for rid in ids:
        assert rerank(server, {"X-Request-Id": rid}).status_code == 200
    failing = "req-failing-" + secrets.token_hex(4)
    r = rerank(server, {"X-Request-Id": failing}, {"query": QUERY, "documents": ["слово " * 3000], "truncate": False})
    assert r.status_code == 422
    # the access line is written right after the answer has gone (off the client's path): wait for it, bounded
    wait_until(lambda: failing in (server.run_dir / "rerankctl.log").read_text(), 10, 0.05,
               what="the last request's access line")
    lines = json_lines(server)  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "pid"} <= set(x) for x in lines)
    for rid in ids:
        mine = [x for x in lines if x.get("request_id") == rid]
        assert len(mine) == 1 and re.match(r"POST /rerank 200 ", mine[0]["message"]), mine
    mine = [x for x in lines if x.get("request_id") == failing]
    assert mine and mine[-1]["message"].startswith("POST /rerank 422 ")
    # lines that belong to no request (start-up, the supervisor's own) carry none
    assert any("request_id" not in x for x in lines)
    assert not any(x.get("request_id") in ids for x in lines if not x["message"].startswith("POST "))


@pytest.mark.parametrize("workers", [1, 2])
def test_one_trace_per_request_with_its_stages_continuing_the_clients_trace(make_server, workers):
    with OtlpReceiver() as otlp:
        server = make_server(start=False, workers=workers)
        server.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url, OTEL_BSP_SCHEDULE_DELAY="100")
        server.start()
        assert f"tracing: OpenTelemetry spans go to {otlp.url}" in (server.run_dir / "rerankctl.log").read_text()
        sent = []
        for i in range(4):
            trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
            r = rerank(server, {"traceparent": f"00-{trace_id}-{parent}-01", "X-Request-Id": f"traced-{i}"})
            assert r.status_code == 200, r.text
            sent.append((trace_id, parent, r.headers["x-request-id"]))
        lone = rerank(server)  # no traceparent: a trace of its own
        for trace_id, parent, rid in sent:
            spans = wait_until(lambda: len(otlp.trace(trace_id)) >= 5 and otlp.trace(trace_id), timeout=30,
                               what=f"the spans of trace {trace_id}")
            servers = [s for s in spans if s["name"] == "POST /rerank"]
            assert len(servers) == 1, spans  # one span per request
            root = servers[0]
            assert root["parent"] == parent and root["kind"] == 2  # SPAN_KIND_SERVER, under the client's span
            assert root["attrs"]["rerankctl.request_id"] == rid
            assert root["attrs"]["http.response.status_code"] == 200
            children = {s["name"]: s for s in spans if s["parent"] == root["span_id"]}
            assert set(children) == STAGES and len(spans) == 5, [s["name"] for s in spans]
            for s in children.values():
                assert root["start"] <= s["start"] <= s["end"] <= root["end"] + 5_000_000, (s, root)
            order = [children[n] for n in ("admission", "queue", "tokenize", "inference")]
            assert all(a["end"] <= b["start"] + 1_000_000 for a, b in zip(order, order[1:]))
            assert children["inference"]["attrs"]["rerankctl.tokens"] > 0
        # the request without a traceparent got a new trace, found by its request id
        rid = lone.headers["x-request-id"]
        wait_until(lambda: [s for s in otlp.spans if s["attrs"].get("rerankctl.request_id") == rid], timeout=30,
                   what="the untraced request's span")
        root = next(s for s in otlp.spans if s["attrs"].get("rerankctl.request_id") == rid)
        assert root["parent"] == "" and root["trace_id"] not in {t for t, _, _ in sent}
        assert {"service.name": "rerankctl"}.items() <= otlp.resources[0].items()
        # health probes and the canary are not traced: every server span is one of our requests
        assert len([s for s in otlp.spans if s["kind"] == 2]) == len(sent) + 1


def test_tracing_is_off_unless_configured_and_off_when_disabled(make_server):
    with OtlpReceiver() as otlp:
        server = make_server(start=False)
        server.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url, OTEL_BSP_SCHEDULE_DELAY="100",
                          OTEL_SDK_DISABLED="true")
        server.start()
        assert rerank(server).status_code == 200
        assert "tracing: OpenTelemetry" not in (server.run_dir / "rerankctl.log").read_text()
        untraced = make_server()  # no OTEL_* at all
        assert rerank(untraced).status_code == 200
        server.cli("stop", "--timeout", "10")  # a stop exports what is batched: nothing may arrive
        assert otlp.spans == []
