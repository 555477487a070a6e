"""The Python client against answers a server should not give (issue 33): a Retry-After it cannot use, an index
outside the documents sent. Each crashed or misread before; now each is a typed error or a sane wait. The
server side is httpx's MockTransport: what is tested is how the client reads answers."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from reranker_ops.client import (
    RerankerClient,
    RerankerClientError,
    RerankerUnavailable,
    retry_after_seconds,
)

DOCS = ["a", "b", "c"]


def scripted(*answers: httpx.Response):
    queue = list(answers)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0) if queue else httpx.Response(500)

    return httpx.MockTransport(handler), seen


def ok(results) -> httpx.Response:
    return httpx.Response(200, json={"results": results, "scores": [0.1, 0.2, 0.3]})


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "1e309", "soon", "", "  "])
def test_an_unusable_retry_after_falls_back_to_backoff(value):
    transport, seen = scripted(httpx.Response(429, headers={"Retry-After": value}),
                               ok([{"index": 2, "relevance_score": 0.9}]))
    t0 = time.monotonic()
    with RerankerClient("http://x", transport=transport, backoff=0.01, max_backoff=0.05) as client:
        ranked = client.rerank("q", DOCS)
    assert len(seen) == 2 and ranked[0].index == 2 and ranked[0].document == "c"
    assert time.monotonic() - t0 < 2
    assert retry_after_seconds(value) is None


def test_a_retry_after_date_is_honoured_and_capped():
    now = email.utils.formatdate(time.time(), usegmt=True)
    assert retry_after_seconds(now) == pytest.approx(0, abs=1.5)
    assert retry_after_seconds(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0  # a date passed: now
    assert retry_after_seconds("2.5") == 2.5 and retry_after_seconds("0") == 0
    far = email.utils.formatdate(time.time() + 3600, usegmt=True)
    transport, seen = scripted(httpx.Response(503, headers={"Retry-After": far}), ok([]))
    t0 = time.monotonic()
    with RerankerClient("http://x", transport=transport, max_backoff=0.2) as client:
        client.rerank("q", DOCS)
    assert 0.15 <= time.monotonic() - t0 < 2  # an hour away, capped at max_backoff


@pytest.mark.parametrize("index", [-1, 3, 99, "0", 1.0, None, True])
def test_an_index_outside_the_documents_sent_is_an_error_not_another_document(index):
    transport, _ = scripted(ok([{"index": index, "relevance_score": 0.9}]))
    with RerankerClient("http://x", transport=transport) as client:
        with pytest.raises(RerankerClientError, match="index"):
            client.rerank("q", DOCS)


def test_scores_that_do_not_match_the_documents_are_an_error():
    transport, _ = scripted(httpx.Response(200, json={"scores": [0.1, 0.2]}))
    with RerankerClient("http://x", transport=transport) as client:
        with pytest.raises(RerankerClientError):
            client.rerank("q", DOCS)
    transport, _ = scripted(httpx.Response(200, content=b"not json"))
    with RerankerClient("http://x", transport=transport) as client:
        with pytest.raises(RerankerClientError):
            client.rerank("q", DOCS)


def test_unavailable_after_the_retries_still_typed():
    transport, seen = scripted(*[httpx.Response(503, headers={"Retry-After": "nan"})] * 3)
    with RerankerClient("http://x", transport=transport, max_retries=2, backoff=0.01) as client:
        with pytest.raises(RerankerUnavailable):
            client.rerank("q", DOCS)
    assert len(seen) == 3
