"""The RAG side: client, async client, LangChain compressor, `rerankctl compare` between real servers."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import free_port

from reranker_ops.client import (
    AsyncRerankerClient,
    RerankerClient,
    RerankerConnectionError,
    RerankerTimeout,
    RerankerUnavailable,
    RerankerValidationError,
)

pytestmark = pytest.mark.timeout(300)

QUERY = "Как приготовить борщ?"
DOCS = ["Борщ — суп из свёклы.", "Завтра дождь.", "Нейронные сети учатся.", "Рецепт борща с капустой."]


class Scripted:
    """A loopback HTTP server that answers from a script, then forwards to a real server.

    A real server cannot be made to answer 429 or 503 or to stall on cue; this stands in for those
    moments. Each script entry is (status, headers) or "stall".
    """

    def __init__(self, script: list, upstream: str | None = None, port: int = 0) -> None:
        self.script = list(script)
        self.upstream = upstream
        self.hits: list[float] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.hits.append(time.monotonic())
                step = outer.script.pop(0) if outer.script else None
                if step == "stall":
                    time.sleep(5)  # longer than the client's timeout in the test
                    return
                if step is not None:
                    status, headers = step
                    payload = json.dumps({"error": "x", "message": f"scripted {status}", "status": status}).encode()
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                else:
                    r = httpx.post(outer.upstream + self.path, content=body, timeout=30)
                    payload = r.content
                    self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_client_results_equal_the_servers(shared_server):
    raw = httpx.post(shared_server.base + "/rerank", json={"query": QUERY, "documents": DOCS}).json()
    with RerankerClient(shared_server.base) as client:
        ranked = client.rerank(QUERY, DOCS)
        assert [(r.index, r.score) for r in ranked] == [(x["index"], x["relevance_score"]) for x in raw["results"]]
        assert [r.document for r in ranked] == [DOCS[x["index"]] for x in raw["results"]]
        assert client.attempts == 1
        top2 = client.rerank(QUERY, DOCS, top_k=2)
        assert top2 == ranked[:2]
    with RerankerClient(shared_server.base, api="cohere") as cohere:
        assert [(r.index, round(r.score, 9)) for r in cohere.rerank(QUERY, DOCS, top_k=3)] == \
               [(r.index, round(r.score, 9)) for r in ranked[:3]]


def test_async_client_results_equal_the_servers(shared_server):
    async def go():
        async with AsyncRerankerClient(shared_server.base) as client:
            return await asyncio.gather(*(client.rerank(QUERY, DOCS, top_k=2) for _ in range(5)))

    results = asyncio.run(go())
    with RerankerClient(shared_server.base) as client:
        expected = client.rerank(QUERY, DOCS, top_k=2)
    assert all(r == expected for r in results)


def test_retries_on_503_and_429_honouring_retry_after(shared_server):
    stub = Scripted([(503, {}), (429, {"Retry-After": "1"})], upstream=shared_server.base)
    try:
        with RerankerClient(stub.url, backoff=0.05) as client:
            ranked = client.rerank(QUERY, DOCS)
        assert client.attempts == 3 and len(ranked) == 4
        assert stub.hits[2] - stub.hits[1] >= 0.95  # waited as Retry-After said
    finally:
        stub.close()


def test_gives_up_after_max_retries_with_a_typed_error(shared_server):
    stub = Scripted([(503, {"Retry-After": "0"})] * 10, upstream=shared_server.base)
    try:
        with RerankerClient(stub.url, max_retries=2) as client:
            with pytest.raises(RerankerUnavailable) as err:
                client.rerank(QUERY, DOCS)
        assert client.attempts == 3 and err.value.status == 503 and "scripted 503" in err.value.message
    finally:
        stub.close()


def test_no_retry_on_422_and_the_servers_message(shared_server):
    with RerankerClient(shared_server.base) as client:
        with pytest.raises(RerankerValidationError) as err:
            client.rerank("", DOCS)
        assert client.attempts == 1
        assert err.value.status == 422 and "query must not be empty" in err.value.message


def test_retries_on_connection_refused_then_raises():
    port = free_port()
    with RerankerClient(f"http://127.0.0.1:{port}", max_retries=3, backoff=0.01) as client:
        t0 = time.monotonic()
        with pytest.raises(RerankerConnectionError):
            client.rerank(QUERY, DOCS)
        assert client.attempts == 4 and time.monotonic() - t0 < 5


def test_connection_refused_then_server_appears(shared_server):
    """Retries bridge a restart: the first attempts are refused, a later one reaches the server."""
    port = free_port()
    started: list[Scripted] = []

    def start_later():
        time.sleep(0.4)  # the fault being simulated: the server comes up while the client backs off
        started.append(Scripted([], upstream=shared_server.base, port=port))

    threading.Thread(target=start_later, daemon=True).start()
    try:
        with RerankerClient(f"http://127.0.0.1:{port}", max_retries=6, backoff=0.2, max_backoff=1.0) as client:
            ranked = client.rerank(QUERY, DOCS)
        assert len(ranked) == 4 and client.attempts >= 2
    finally:
        for stub in started:
            stub.close()


def test_timeout_is_raised_never_a_hang():
    stub = Scripted(["stall", "stall"])
    try:
        with RerankerClient(stub.url, timeout=0.5, max_retries=3) as client:
            t0 = time.monotonic()
            with pytest.raises(RerankerTimeout):
                client.rerank(QUERY, DOCS)
            assert time.monotonic() - t0 < 2.0
            assert client.attempts == 1  # a slow request is not re-sent

        async def go():
            async with AsyncRerankerClient(stub.url, timeout=0.5) as aclient:
                await aclient.rerank(QUERY, DOCS)

        with pytest.raises(RerankerTimeout):
            asyncio.run(go())
    finally:
        stub.close()


def test_api_key_sent(make_server):
    server = make_server(api_key="k3y")
    with RerankerClient(server.base, api_key="k3y") as client:
        assert len(client.rerank(QUERY, DOCS)) == 4
    from reranker_ops.client import RerankerAuthError

    with RerankerClient(server.base, api_key="wrong") as client:
        with pytest.raises(RerankerAuthError):
            client.rerank(QUERY, DOCS)
        assert client.attempts == 1


# --- LangChain --------------------------------------------------------------------------------------------
def test_langchain_compressor(shared_server, reference_scorer):
    from langchain_core.documents import Document

    from reranker_ops.integrations.langchain import RerankerCompressor

    docs = [Document(page_content=d, metadata={"source": f"doc{i}", "boost": 1.0}) for i, d in enumerate(DOCS)]
    comp = RerankerCompressor(base_url=shared_server.base, top_n=2)
    out = comp.compress_documents(docs, QUERY)
    with RerankerClient(shared_server.base) as client:
        expected = client.rerank(QUERY, DOCS, top_k=2)
    assert [d.page_content for d in out] == [r.document for r in expected]
    reference = reference_scorer(QUERY, DOCS)  # the ranking the transformers model gives
    assert [d.metadata["source"] for d in out] == [f"doc{i}" for i in sorted(range(len(DOCS)),
                                                                               key=lambda i: -reference[i])[:2]]
    for d, r in zip(out, expected):
        assert d.metadata["source"] == f"doc{r.index}" and d.metadata["relevance_score"] == pytest.approx(r.score)
    assert all("relevance_score" not in d.metadata for d in docs)  # inputs untouched

    # a boost hook: the RAG system's metadata boosts reorder after scoring
    worst = min(expected := RerankerClient(shared_server.base).rerank(QUERY, DOCS), key=lambda r: r.score)
    docs[worst.index].metadata["boost"] = 100.0
    boosted = RerankerCompressor(base_url=shared_server.base, top_n=1,
                                 adjust=lambda doc, score: score * doc.metadata["boost"])
    [top] = boosted.compress_documents(docs, QUERY)
    assert top.page_content == worst.document
    assert top.metadata["relevance_score"] == pytest.approx(worst.score * 100)
    assert top.metadata["rerank_score"] == pytest.approx(worst.score)
    assert asyncio.run(comp.acompress_documents(docs, QUERY))[0].page_content == out[0].page_content
    assert comp.compress_documents([], QUERY) == []


# --- compare ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_models(tiny_fp32, tmp_path_factory):
    """The tiny model at INT8 (same model, other precision) and a deliberately different model: the same
    network with its classifier negated, which ranks every list in reverse."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from reranker_ops.models.convert import convert
    from reranker_ops.settings import Settings

    base = tmp_path_factory.mktemp("others")
    int8_model = base / "tiny-fp16"
    shutil.copytree(tiny_fp32.parent, int8_model, ignore=shutil.ignore_patterns("openvino-*", "onnx-*"))
    # fp16 weights: close to fp32 on any CPU (a random model's INT8 error depends on the CPU kind: 0.03 with
    # AVX-512, 0.12 with AVX2 only, which is more than the parity limit; fidelity is judged elsewhere)
    convert(Settings(), str(int8_model), precision="fp16", bench_seconds=0)
    other = base / "reversed-model"
    shutil.copytree(tiny_fp32.parent, other, ignore=shutil.ignore_patterns("openvino-*", "onnx-*"))
    model = AutoModelForSequenceClassification.from_pretrained(str(other))
    with torch.no_grad():
        model.classifier.weight.neg_()
        model.classifier.bias.neg_()
    model.save_pretrained(str(other), safe_serialization=True)
    convert(Settings(), str(other), precision="fp32", bench_seconds=0)
    return int8_model, other


def test_compare_between_real_servers(shared_server, make_server, other_models, tmp_path):
    int8_model, other = other_models
    int8 = make_server(model_dir=int8_model, precision="fp16")
    different = make_server(model_dir=other)

    res = shared_server.cli("compare", shared_server.base, int8.base, "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    same = json.loads(res.stdout)
    assert same["compared"] == same["queries"] == 6 and same["errors"] == {"a": 0, "b": 0}
    assert same["mean_spearman"] >= 0.9 and same["top1_agreement"] >= 0.8
    assert 0 < same["max_abs_diff"] < 0.1

    res = shared_server.cli("compare", shared_server.base, different.base, "--api-b", "cohere", "--json", timeout=120)
    diff = json.loads(res.stdout)
    assert diff["mean_spearman"] <= -0.9 and diff["top1_agreement"] == 0.0
    assert diff["max_abs_diff"] > 0.1

    # itself: perfect agreement; a dead endpoint: counted errors, no hang; a queries file
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"query": QUERY, "documents": DOCS}) + "\n")
    res = shared_server.cli("compare", shared_server.base, shared_server.base, "--queries", str(qfile), "--json")
    out = json.loads(res.stdout)
    assert out["queries"] == 1 and out["mean_spearman"] == 1.0 and out["top1_agreement"] == 1.0
    res = shared_server.cli("compare", shared_server.base, f"http://127.0.0.1:{free_port()}", "--json",
                            "--timeout", "2", timeout=120)
    out = json.loads(res.stdout)
    assert out["errors"]["b"] == 6 and out["compared"] == 0
    res = shared_server.cli("compare", shared_server.base, shared_server.base)
    assert res.returncode == 0 and "mean Spearman 1.000" in res.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "documents": ["only one"]}\n')
    res = shared_server.cli("compare", shared_server.base, shared_server.base, "--queries", str(bad))
    assert res.returncode != 0 and "bad.jsonl:1" in res.stderr
