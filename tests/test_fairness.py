"""Fair scheduling: large requests are split into chunks that interleave with everyone else's work, a late
request fails alone, and work for a client that went away is dropped."""

from __future__ import annotations

import concurrent.futures as cf
import re
import time

import httpx
import numpy as np
import pytest
from conftest import DOCS, QUERY, wait_until

pytestmark = pytest.mark.timeout(300)


def metric(server, name: str) -> float:
    text = httpx.get(server.health + "/metrics", timeout=5).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_split_request_scores_like_the_unsplit_reference(make_server, reference_scorer):
    server = make_server(split_bytes=300, chunk_chars=200)
    docs = [f"{DOCS[i % 3]} номер {i} " + "слово " * (i % 7) for i in range(40)]
    r = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": docs, "top_k": 5,
                                                   "return_documents": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["scores"], reference_scorer(QUERY, docs), atol=1e-5)
    order = sorted(range(len(docs)), key=lambda i: (-body["scores"][i], i))[:5]
    assert [x["index"] for x in body["results"]] == order
    assert [x["document"] for x in body["results"]] == [docs[i] for i in order]
    assert body["usage"]["total_tokens"] > 0 and body["model"]
    # the Cohere route and /inference go the same way
    r = httpx.post(server.base + "/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in docs]})
    assert r.status_code == 200 and len(r.json()["results"]) == 40
    r = httpx.post(server.base + "/inference", json=[{"query": QUERY, "passage": d} for d in docs])
    np.testing.assert_allclose(r.json(), reference_scorer(QUERY, docs), atol=1e-5)
    # errors name the original position, not the chunk's
    bad = docs[:30] + [7] + docs[31:]
    r = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": bad})
    assert r.status_code == 422 and "documents[30]" in r.json()["message"]
    long_one = docs[:25] + ["борщ " * 2000] + docs[26:]
    r = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": long_one, "truncate": False})
    assert r.status_code == 422 and "pair 25 is longer" in r.json()["message"], r.text
    chunks = metric(server, 'reranker_schedule_service_seconds_count{class="chunk"}')
    assert chunks >= 5  # it really was split


LONG_DOC = "Борщ варят из свёклы и капусты. " * 20
ROOMY = {"max_documents": 50_000, "max_body_bytes": 256 * 1024 * 1024}  # limits that the long request fits in


def long_request_for(server, seconds: float) -> dict:
    """A request of LONG_DOCs that this machine needs about ``seconds`` to score alone (at least 600
    documents): a fixed size would be scored within a deadline on a CPU fast enough (seen: 600 documents
    in under 1.5 s on AVX-512), and the test would no longer have a late request."""
    sample = 50
    t0 = time.monotonic()
    r = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": [LONG_DOC] * sample}, timeout=60)
    assert r.status_code == 200, r.text
    per_doc = (time.monotonic() - t0) / sample
    return {"query": QUERY, "documents": [LONG_DOC] * max(600, min(40_000, int(seconds / per_doc)))}


def test_a_late_request_fails_alone_while_a_short_one_succeeds(make_server):
    server = make_server(request_timeout_s=1.5, split_bytes=1000, chunk_chars=800, **ROOMY)
    big = long_request_for(server, 4 * 1.5)  # four deadlines' worth

    def long_request():
        return httpx.post(server.base + "/rerank", json=big, timeout=30)

    with cf.ThreadPoolExecutor(2) as pool:
        late = pool.submit(long_request)
        wait_until(lambda: metric(server, 'reranker_schedule_service_seconds_count{class="chunk"}') >= 3, 10, 0.05,
                   what="the long request being scored")
        t0 = time.monotonic()
        short = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
        short_took = time.monotonic() - t0
        late_r = late.result(timeout=60)
    assert late_r.status_code in (408, 504), late_r.text
    assert short.status_code == 200 and len(short.json()["scores"]) == 3
    print(f"short request answered in {short_took * 1000:.0f} ms beside a long one that timed out")
    assert short_took < 1.5
    # the server is fine afterwards, and what was left of the late request was never scored
    assert httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}).status_code == 200
    assert metric(server, 'reranker_dropped_units_total{class="chunk"}') > 0


def test_a_client_that_goes_away_has_its_remaining_work_dropped(make_server):
    server = make_server(request_timeout_s=60, split_bytes=1000, chunk_chars=800, **ROOMY)
    big = long_request_for(server, 4 * 0.7)  # four times what the client waits
    n = len(big["documents"])
    before = metric(server, "reranker_dropped_pairs_total")
    scored_before = metric(server, "reranker_pairs_scored_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base + "/rerank", json=big, timeout=0.7)  # the client gives up and disconnects
    wait_until(lambda: metric(server, "reranker_dropped_pairs_total") > before, 30, 0.2,
               what="the rest of its work dropped")
    dropped = metric(server, "reranker_dropped_pairs_total") - before
    scored = metric(server, "reranker_pairs_scored_total") - scored_before
    print(f"client gone: {dropped:.0f} of {n} pairs dropped, {scored:.0f} scored")
    assert dropped > 100 and scored < n
    assert httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}).status_code == 200


def test_with_the_defaults_a_split_request_with_nobody_small_around_goes_in_large_envelopes(make_server,
                                                                                          reference_scorer):
    """Quiet batching is on by default (RERANKER_QUIET_BATCH_MS=1000, with the token budget that keeps its memory
    as before): while no short request is around, a split request's chunks go to the worker in envelopes larger
    than the schedule budget's share. With it off, no envelope holds more than the share, 9000 characters of
    text at the default chunk size: at most three chunks."""
    server = make_server()  # the defaults, one worker
    docs = [f"{DOCS[i % 3]} номер {i}. " + "Свёкла, капуста, морковь и лук. " * 14 for i in range(120)]
    assert all(450 < len(d) < 600 for d in docs)  # a chunk (3000 characters) holds five or six of them

    def split_and_scored(query: str) -> tuple[float, float]:
        """(envelopes, chunks) the request went to the worker in."""
        batches = metric(server, "reranker_batches_total")
        units = metric(server, "reranker_batched_requests_total")
        r = httpx.post(server.base + "/rerank", json={"query": query, "documents": docs}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], reference_scorer(query, docs), atol=1e-5)
        return (metric(server, "reranker_batches_total") - batches,
                metric(server, "reranker_batched_requests_total") - units)

    split_and_scored(QUERY)  # the gate learns the worker's speed from its envelopes of chunks
    envelopes, chunks = split_and_scored(f"{QUERY} снова")
    print(f"{chunks:.0f} chunks in {envelopes:.0f} envelopes")
    # its first chunk goes alone (the worker is free when it comes), the rest together; the watchdog's canary
    # may add an envelope of one. With envelopes of at most three chunks it would be ten or more.
    assert chunks >= 20 and envelopes <= 4
