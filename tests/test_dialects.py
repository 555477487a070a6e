"""Every reranking client's language, against a real server: text-embeddings-inference's ``/rerank`` and
``/info`` (as TEI's router answers them), the long-document options under the names Cohere and vLLM clients
send, ``model`` names and ``/v1/models``, and the real client libraries (the cohere SDK, llama-index's TEI
reranker) getting the reference's ranking."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import MIXED_DOCS, ServerHandle

import reranker_ops

pytestmark = pytest.mark.timeout(300)

QUERY = "Как приготовить борщ?"
DOCS = MIXED_DOCS
# well over the tiny model's 512 tokens, its two ends unlike over a hundred tokens: even a random model scores
# a window of its start apart from a window of its end (with the end a few words long, a tokenizer trained anew,
# whose ties fall differently from run to run, once put the two 0.0015 apart)
LONG = "борщ суп свёкла капуста " * 300 + "финал текста о погоде и дожде " * 30
ALIASES = "rerank-v3.5,rerank-multilingual-v3.0"
TIMING_HEADERS = ("x-compute-type", "x-compute-time", "x-total-time", "x-compute-tokens", "x-compute-characters",
                  "x-tokenization-time", "x-queue-time", "x-inference-time")


@pytest.fixture(scope="module")
def server(tiny_fp32, tmp_path_factory):
    """One server with aliases (what an operator sets for a client that hard-codes a Cohere model name)."""
    h = ServerHandle(tiny_fp32.parent, tmp_path_factory.mktemp("dialects-run"), model_aliases=ALIASES)
    h.start()
    yield h
    h.cleanup()


@pytest.fixture(scope="module")
def served_name(server) -> str:
    return httpx.get(server.base + "/info", timeout=10).json()["model_id"]


@pytest.fixture(scope="module")
def reference(tiny_fp32):
    """The transformers model scoring token ids we build here: ``ids(query, passage, side, max_length,
    doc_tokens)`` cuts as the HF tokenizer does (longest first, from ``side``), then the model scores them."""
    import torch

    from reranker_ops.models.reference import load_reference, model_max_length

    source = Path(json.loads((tiny_fp32 / "manifest.json").read_text())["source"]["path"])
    tok, model = load_reference(source)
    limit = model_max_length(tok, model)

    def score(query: str, passages: list[str], side: str = "right", max_length: int | None = None,
              doc_tokens: int | None = None, raw: bool = False) -> list[float]:
        out = []
        for p in passages:
            if doc_tokens is not None:  # Cohere's max_tokens_per_doc: the document alone, cut first
                ids = tok(p, add_special_tokens=False)["input_ids"]
                p = tok.decode(ids[:doc_tokens] if side == "right" else ids[-doc_tokens:])
            tok.truncation_side = side
            enc = tok(query, p, truncation=True, max_length=max_length or limit, return_tensors="pt",
                      return_token_type_ids=True)
            with torch.no_grad():
                logits = model(**enc).logits.float().numpy()
            x = float(logits[0, 0] if logits.shape[-1] == 1 else logits[0, 1] - logits[0, 0])
            out.append(x if raw else 1 / (1 + np.exp(-x)))
        tok.truncation_side = "right"
        return out

    return score


def post(server, route: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(server.base + route, content=body, timeout=60, **kw)
    return httpx.post(server.base + route, json=body, timeout=60, **kw)


# --------------------------------------------------------------------------------------------------------
# text-embeddings-inference
# --------------------------------------------------------------------------------------------------------
def test_tei_rerank_answers_a_bare_list_best_first_with_every_field(server, reference):
    expected = reference(QUERY, DOCS)
    r = post(server, "/rerank", {"query": QUERY, "texts": DOCS})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert isinstance(ranks, list) and len(ranks) == len(DOCS)
    assert [x["index"] for x in ranks] == sorted(range(len(DOCS)), key=lambda i: -expected[i])
    assert all(set(x) == {"index", "score"} for x in ranks)  # no text unless return_text
    for x in ranks:
        assert x["score"] == pytest.approx(expected[x["index"]], abs=1e-4)
    # return_text: each text beside its score; raw_scores: the logit, before the sigmoid
    ranks = post(server, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True, "raw_scores": True}).json()
    raw = reference(QUERY, DOCS, raw=True)
    for x in ranks:
        assert x["text"] == DOCS[x["index"]]
        assert x["score"] == pytest.approx(raw[x["index"]], abs=1e-3)
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)


def test_tei_timing_headers_say_what_the_request_cost(server):
    body = {"query": QUERY, "texts": DOCS}
    r = post(server, "/rerank", body)
    h = r.headers
    assert all(name in h for name in TIMING_HEADERS), dict(h)
    assert h["x-compute-type"] == "cpu"
    assert all(h[name].isdigit() for name in TIMING_HEADERS[1:])
    # characters as TEI counts them: the query once per text, plus every text
    assert int(h["x-compute-characters"]) == len(QUERY) * len(DOCS) + sum(map(len, DOCS))
    # tokens: what the same pairs cost in our own shape's usage
    usage = post(server, "/rerank", {"query": QUERY, "documents": DOCS}).json()["usage"]
    assert int(h["x-compute-tokens"]) == usage["total_tokens"] > 0
    assert int(h["x-total-time"]) >= int(h["x-inference-time"])
    # every rerank route carries them, in every shape
    for route, b in (("/v1/rerank", {"query": QUERY, "documents": DOCS}),
                     ("/inference", [{"query": QUERY, "passage": d} for d in DOCS])):
        got = post(server, route, b).headers
        assert got["x-compute-characters"] == h["x-compute-characters"] and "x-queue-time" in got


def test_tei_truncation_and_its_direction(server, reference):
    # truncate unset: the server's auto_truncate (on), cut at the right end like TEI's default
    r = post(server, "/rerank", {"query": QUERY, "texts": [LONG, DOCS[0]]})
    assert r.status_code == 200, r.text
    by_index = {x["index"]: x["score"] for x in r.json()}
    assert by_index[0] == pytest.approx(reference(QUERY, [LONG])[0], abs=1e-4)
    # left: the end of the text is kept (raw logits: the random tiny model's probabilities all sit near 0)
    left = {x["index"]: x["score"] for x in post(server, "/rerank", {"query": QUERY, "texts": [LONG, DOCS[0]],
                                                                       "truncation_direction": "Left",
                                                                       "raw_scores": True}).json()}
    want_left, want_right = reference(QUERY, [LONG], side="left", raw=True)[0], reference(QUERY, [LONG], raw=True)[0]
    assert abs(want_left - want_right) > 2e-3  # the two ends differ enough for the check below to tell them apart
    assert left[0] == pytest.approx(want_left, abs=5e-4)
    assert left[1] == pytest.approx(reference(QUERY, [DOCS[0]], raw=True)[0], abs=5e-4)  # a short text is not cut
    # truncate false: refused, as TEI refuses it (422, Validation)
    r = post(server, "/rerank", {"query": QUERY, "texts": [LONG], "truncate": False})
    assert r.status_code == 422
    err = r.json()
    assert err["error_type"] == "Validation" and set(err) == {"error", "error_type"}
    assert err["error"].startswith("Input validation error: `inputs` must have less than 512 tokens. Given: ")


@pytest.mark.parametrize("body, status, kind, message", [
    ({"query": QUERY, "texts": []}, 400, "Empty", "`texts` cannot be empty"),
    ({"query": QUERY, "texts": ["x"] * 1001}, 422, "Validation", "batch size 1001 > maximum allowed batch size 1000"),
    ({"query": QUERY, "texts": "just one"}, 422, "Validation", "texts"),
    ({"query": QUERY, "texts": [1, 2]}, 422, "Validation", "texts[0]"),
    ({"texts": DOCS}, 422, "Validation", "query"),
    ({"query": QUERY, "texts": DOCS, "truncation_direction": "middle"}, 422, "Validation", "truncation_direction"),
    ({"query": QUERY, "texts": DOCS, "raw_scores": "yes"}, 422, "Validation", "raw_scores"),
    ('{"query": "q", "texts": ["a"', 400, "Validation", "JSON"),
    ({"query": QUERY, "texts": DOCS, "model": "gpt-4"}, 404, "Validation", "gpt-4"),
])
def test_tei_errors_have_tei_status_and_shape(server, body, status, kind, message):
    r = post(server, "/rerank", body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()
    assert set(err) == {"error", "error_type"}, err
    assert err["error_type"] == kind and message in err["error"], err
    assert r.headers["x-request-id"]


def test_tei_info_reports_the_model_and_our_limits(server, served_name):
    info = httpx.get(server.base + "/info", timeout=10).json()
    for field in ("model_id", "model_sha", "model_dtype", "model_type", "max_concurrent_requests",
                  "max_input_length", "max_batch_tokens", "max_client_batch_size", "auto_truncate", "version"):
        assert field in info, field
    assert info["model_type"] == {"reranker": info["model_type"]["reranker"]} and "id2label" in info["model_type"]["reranker"]
    assert info["model_dtype"] == "float32" and info["max_input_length"] == 512
    assert info["max_client_batch_size"] == 1000 and info["auto_truncate"] is True
    assert info["version"] == reranker_ops.__version__
    ours = info["rerankctl"]
    assert ours["long_documents"] == "truncate" and ours["windows"] == 1 and ours["max_windows"] == 8
    assert ours["aliases"] == ALIASES.split(",") and info["model_id"] == served_name
    # what /info says a client may send is what the server takes
    assert post(server, "/rerank", {"query": QUERY, "texts": ["x"] * info["max_client_batch_size"]}).status_code == 200


def test_info_says_windows_when_the_server_scores_long_documents_whole(make_server):
    info = httpx.get(make_server(windows=3).base + "/info", timeout=10).json()
    assert info["rerankctl"]["long_documents"] == "windows" and info["rerankctl"]["windows"] == 3


# --------------------------------------------------------------------------------------------------------
# long documents under the names clients send
# --------------------------------------------------------------------------------------------------------
def test_long_document_options_map_onto_windows_and_truncation(server, reference):
    docs = [LONG, DOCS[0]]
    windows3 = post(server, "/rerank", {"query": QUERY, "documents": docs, "windows": 3}).json()
    # Cohere v1's max_chunks_per_doc is windows under Cohere's name; above the server's cap it gets the cap
    v1 = post(server, "/v1/rerank", {"query": QUERY, "documents": docs, "max_chunks_per_doc": 3}).json()
    assert {x["index"]: x["relevance_score"] for x in v1["results"]} == pytest.approx(
        dict(enumerate(windows3["scores"])), abs=1e-6)
    assert v1["usage"]["windows"] == windows3["usage"]["windows"] > 2
    capped = post(server, "/v1/rerank", {"query": QUERY, "documents": docs, "max_chunks_per_doc": 500})
    assert capped.status_code == 200 and capped.json()["usage"]["windows"] <= 8 + 1
    # the default truncates, and the answer says so (usage, and Cohere's meta.warnings)
    v2 = post(server, "/v2/rerank", {"query": QUERY, "documents": docs}).json()
    assert v2["usage"]["truncated_documents"] == 1 and any("truncat" in w for w in v2["meta"]["warnings"])
    assert "warnings" not in post(server, "/v2/rerank", {"query": QUERY, "documents": DOCS}).json()["meta"]
    # Cohere v2's max_tokens_per_doc: each document cut to that many tokens before it meets the query
    cut = post(server, "/v2/rerank", {"query": QUERY, "documents": docs, "max_tokens_per_doc": 20}).json()
    scores = {x["index"]: x["relevance_score"] for x in cut["results"]}
    assert scores == pytest.approx(dict(enumerate(reference(QUERY, docs, doc_tokens=20))), abs=1e-4)
    # vLLM's truncate_prompt_tokens (the pair's tokens) and truncation_side
    vllm = post(server, "/rerank", {"query": QUERY, "documents": docs, "truncate_prompt_tokens": 40,
                                    "truncation_side": "left"}).json()
    assert vllm["scores"] == pytest.approx(reference(QUERY, docs, side="left", max_length=40), abs=1e-4)
    whole = post(server, "/rerank", {"query": QUERY, "documents": docs, "truncate_prompt_tokens": -1}).json()
    assert whole["scores"] == pytest.approx(reference(QUERY, docs), abs=1e-4)  # -1: the model's maximum
    for bad in ({"truncate_prompt_tokens": 0}, {"truncation_side": "up"}, {"max_tokens_per_doc": -5},
                {"max_chunks_per_doc": "many"}):
        r = post(server, "/v2/rerank", {"query": QUERY, "documents": docs, **bad})
        assert r.status_code == 422, (bad, r.text)


def test_rank_fields_and_object_documents_come_back_as_sent(server, reference):
    docs = [{"id": "a1", "title": "Погода", "text": DOCS[1], "meta": {"n": 1}},
            {"id": "b2", "title": "Борщ", "text": DOCS[0]}]
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": docs, "rank_fields": ["title", "text"],
                                    "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert {x["index"]: x["document"] for x in results} == dict(enumerate(docs))  # ids and metadata kept
    # the fields ranked are "name: value" lines, in rank_fields' order
    texts = [f"title: {d['title']}\ntext: {d['text']}" for d in docs]
    expected = reference(QUERY, texts)
    assert {x["index"]: x["relevance_score"] for x in results} == pytest.approx(dict(enumerate(expected)), abs=1e-4)
    # a document with none of the rank_fields is scored by its text; one without either is refused
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": docs, "rank_fields": ["summary"]})
    assert r.status_code == 200, r.text
    assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(
        dict(enumerate(reference(QUERY, [d["text"] for d in docs]))), abs=1e-4)
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": [{"id": 1, "title": "x"}], "rank_fields": ["summary"]})
    assert r.status_code == 422 and "summary" in r.json()["message"] and "text" in r.json()["message"]
    # a field that is not text is ranked as its JSON
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": [{"text": "t", "n": [1, 2]}], "rank_fields": ["n"]})
    assert r.json()["results"][0]["relevance_score"] == pytest.approx(reference(QUERY, ["n: [1, 2]"])[0], abs=1e-4)


# --------------------------------------------------------------------------------------------------------
# model names
# --------------------------------------------------------------------------------------------------------
def test_model_names_are_checked_and_listed(server, served_name):
    body = {"query": QUERY, "documents": DOCS}
    for name in [served_name, *ALIASES.split(",")]:
        for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r = post(server, route, {**body, "model": name})
            assert r.status_code == 200, (route, name, r.text)
    assert post(server, "/v2/rerank", body).status_code == 200  # no model: the served one
    r = post(server, "/v2/rerank", {**body, "model": "rerank-english-v2.0"})
    assert r.status_code == 404
    message = r.json()["message"]
    assert "rerank-english-v2.0" in message and served_name in message and "RERANKER_MODEL_ALIASES" in message
    assert post(server, "/v1/rerank", {**body, "model": 7}).status_code == 422
    models = httpx.get(server.base + "/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [served_name, *ALIASES.split(",")]
    assert all(m["object"] == "model" and m["owned_by"] == "rerankctl" for m in models["data"])
    assert [m.get("root") for m in models["data"][1:]] == [served_name] * 2


def test_models_and_info_need_the_key_when_there_is_one(make_server):
    s = make_server(api_key="s3cret-key-of-the-test")
    for path in ("/v1/models", "/info"):
        assert httpx.get(s.base + path, timeout=10).status_code == 401
        r = httpx.get(s.base + path, headers={"Authorization": "Bearer s3cret-key-of-the-test"}, timeout=10)
        assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------------------
# real clients
# --------------------------------------------------------------------------------------------------------
def test_cohere_sdk_ranks_like_the_reference(server, reference):
    import cohere

    expected = reference(QUERY, DOCS)
    best = sorted(range(len(DOCS)), key=lambda i: -expected[i])
    v2 = cohere.ClientV2(api_key="not-checked-here", base_url=server.base)
    res = v2.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3)
    assert [x.index for x in res.results] == best[:3]
    assert [x.relevance_score for x in res.results] == pytest.approx([expected[i] for i in best[:3]], abs=1e-4)
    v1 = cohere.Client(api_key="not-checked-here", base_url=server.base)
    res = v1.rerank(model="rerank-multilingual-v3.0", query=QUERY, documents=DOCS, return_documents=True)
    assert [x.index for x in res.results] == best
    assert [x.document.text for x in res.results] == [DOCS[i] for i in best]
    with pytest.raises(cohere.errors.NotFoundError):
        v2.rerank(model="rerank-english-v2.0", query=QUERY, documents=DOCS)


def test_llama_index_tei_reranker_ranks_like_the_reference(server, reference):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    expected = reference(QUERY, DOCS)
    best = sorted(range(len(DOCS)), key=lambda i: -expected[i])
    nodes = [NodeWithScore(node=TextNode(text=d, id_=f"n{i}"), score=0.0) for i, d in enumerate(DOCS)]
    reranker = TextEmbeddingInference(base_url=server.base, top_n=3, timeout=60)
    out = reranker.postprocess_nodes(nodes, QueryBundle(QUERY))
    assert [n.node.node_id for n in out] == [f"n{i}" for i in best[:3]]
    assert [n.score for n in out] == pytest.approx([expected[i] for i in best[:3]], abs=1e-4)
