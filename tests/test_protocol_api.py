"""The public API's parsing (``protocol/api.py``): the shapes and aliases clients send, what is refused and
how, and the answers' order and cut."""

from __future__ import annotations

import json

import pytest

from reranker_ops.protocol.api import Limits, RequestError, build_response, parse_job
from reranker_ops.supervise.canary import judge

pytestmark = pytest.mark.timeout(60)

LIM = Limits(max_documents=3, max_document_chars=10)


def test_rerank_parsing_and_aliases():
    job = parse_job("/rerank", json.dumps({"query": "q", "documents": ["a", "b"], "top_n": 1}).encode(), LIM)
    assert job.queries == ["q", "q"] and job.passages == ["a", "b"] and job.top_n == 1
    job = parse_job("/rerank", json.dumps({"query": "q", "documents": ["a"], "top_k": 2, "extra": 1}).encode(), LIM)
    assert job.top_n == 2  # unknown fields are ignored, top_k is an alias
    job = parse_job("/v1/rerank", json.dumps({"query": "q", "documents": [{"text": "a"}, "b"]}).encode(), LIM)
    assert job.passages == ["a", "b"]


@pytest.mark.parametrize("body,status,fragment", [
    (b"", 400, "empty body"),
    (b"\xff", 400, "UTF-8"),
    (b"{", 400, "malformed JSON"),
    (b"[" * 50000, 400, "nested too deeply"),
    (b'{"documents": ["a"]}', 422, "query is required"),
    (b'{"query": "q"}', 422, "documents is required"),
    (b'{"query": "q", "documents": ["a", "b", "c", "d"]}', 422, "RERANKER_MAX_DOCUMENTS"),
    (b'{"query": "q", "documents": ["aaaaaaaaaaaaaaa"]}', 422, "RERANKER_MAX_DOCUMENT_CHARS"),
    (b'{"query": "q", "documents": ["a"], "top_k": 1.5}', 422, "top_k must be an integer"),
    (b'{"query": "q", "documents": [" "]}', 422, "documents[0] must not be empty"),
])
def test_rerank_rejections(body, status, fragment):
    with pytest.raises(RequestError) as err:
        parse_job("/rerank", body, LIM)
    assert err.value.status == status and fragment in err.value.message


def test_inference_parsing():
    job = parse_job("/inference", b'[{"query": "q1", "passage": "p1"}, {"query": "q2", "passage": "p2"}]', LIM)
    assert job.queries == ["q1", "q2"] and job.passages == ["p1", "p2"]
    with pytest.raises(RequestError, match=r"\[1\]\.passage is required"):
        parse_job("/inference", b'[{"query": "q", "passage": "p"}, {"query": "q"}]', LIM)
    with pytest.raises(RequestError, match="must be a list"):
        parse_job("/inference", b'{"query": "q"}', LIM)


def test_responses_order_and_cut():
    job = parse_job("/rerank", b'{"query": "q", "documents": ["a", "b", "c"], "top_k": 2, "return_documents": true}', LIM)
    job.passages = ["a", "b", "c"]
    out = build_response(job, [0.0, 2.0, 2.0], tokens=9, model_name="m")
    assert [r["index"] for r in out["results"]] == [1, 2]  # ties keep input order
    assert out["results"][0]["document"] == "b" and len(out["scores"]) == 3
    assert judge(200, out) is not None  # three scores: not the canary's shape
    job = parse_job("/v2/rerank", b'{"query": "q", "documents": ["a", "b"]}', LIM)
    out = build_response(job, [-1.0, 1.0], tokens=4, model_name="m")
    assert out["results"][0] == {"index": 1, "relevance_score": pytest.approx(0.7310585786)}
    assert out["meta"]["api_version"]["version"] == "2"


def test_the_gates_byte_rules_agree_with_the_parser():
    """The gate reads two things from a body's bytes before (or without) parsing it: whether it is TEI's shape
    (its errors are then TEI's) and whether it may ask for windows (it is then costed from its parsed pairs).
    Both must say what parse_job decides, and read from an offset without a copy of the body."""
    from reranker_ops.protocol.api import TEI, asks_for_windows, tei_shaped

    head = b"\0" * 16
    bodies = [{"query": "q", "texts": ["a"]}, {"query": "q", "documents": ["a"]},
              {"query": "q", "documents": ["texts"], "texts": ["b"]}, {"query": "q", "texts": ["a"], "windows": 2},
              {"query": "q", "documents": ["a"], "max_chunks_per_doc": 3}]
    for body in bodies:
        raw = bytearray(head + json.dumps(body).encode())
        job = parse_job("/rerank", raw[len(head):], Limits())
        assert tei_shaped("/rerank", raw, len(head)) == (job.style == TEI), body
        assert asks_for_windows(raw) == (job.windows > 1), body
    assert not tei_shaped("/v1/rerank", b'{"query": "q", "texts": ["a"]}')
    before = b'"documents"'  # bytes before the offset (the gate's room for a part head) are not read
    assert tei_shaped("/rerank", before + b'{"query": "q", "texts": ["a"]}', len(before))
    assert not tei_shaped("/rerank", before + b'{"query": "q", "texts": ["a"]}')
