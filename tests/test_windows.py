"""Long passages scored by overlapping windows (issue 13): the best window's score, with the very windows
transformers makes, on both of the gate's paths (a small request straight through, a large one in chunks)."""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest
from modelkit.synthetic import EN_WORDS, RU_WORDS

from reranker_ops.worker.engine import Tokenizer

pytestmark = pytest.mark.timeout(300)

QUERY = "как приготовить борщ"
WINDOW, STRIDE = 48, 12
# A long passage of the words the tiny model's tokenizer was trained on, so that every window holds
# different known tokens (a random model has no notion of relevance: the windows just have to differ).
_rng = random.Random(7)
LATE = " ".join(_rng.choice(RU_WORDS + EN_WORDS) for _ in range(150))
SHORT = "борщ это суп"


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_windows_score_the_best_window_like_transformers(make_server, reference_windows):
    srv = make_server(max_length=WINDOW, window_stride=STRIDE, max_windows=16)
    ref = reference_windows(QUERY, [LATE, SHORT], WINDOW, STRIDE)
    assert 4 <= len(ref[0]) <= 16 and len(ref[1]) == 1, "the long passage must need several windows"
    best = int(np.argmax(ref[0]))
    assert best > 0 and logit(ref[0][best]) - logit(ref[0][0]) > 0.01, "a later window must score higher"

    for windows in (1, 3, best + 1, len(ref[0])):
        r = httpx.post(srv.base + "/rerank", json={"query": QUERY, "documents": [LATE, SHORT], "windows": windows,
                                                   "raw_scores": True}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        want = [logit(max(ref[0][:windows])), logit(ref[1][0])]
        np.testing.assert_allclose(body["scores"], want, atol=1e-3)
        assert body["usage"]["windows"] == min(windows, len(ref[0])) + 1

    # windows: 1 is plain truncation
    plain = httpx.post(srv.base + "/rerank", json={"query": QUERY, "documents": [LATE]}, timeout=60).json()
    np.testing.assert_allclose(plain["scores"], [ref[0][0]], atol=1e-4)
    assert plain["usage"]["windows"] == 1

    # A large request goes through the gate's chunks: the same scores, the windows summed over chunks.
    docs = [LATE, SHORT] * 20
    assert len(str(docs).encode()) > 4096
    r = httpx.post(srv.base + "/rerank", json={"query": QUERY, "documents": docs, "windows": 3}, timeout=120)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"], [max(ref[0][:3]), ref[1][0]] * 20, atol=1e-4)
    assert r.json()["usage"]["windows"] == 20 * (3 + 1)

    # Cohere's route and /inference take the server's default; a request can ask on the Cohere route.
    r = httpx.post(srv.base + "/v1/rerank", json={"query": QUERY, "documents": [LATE], "windows": 2}, timeout=60)
    np.testing.assert_allclose(r.json()["results"][0]["relevance_score"], max(ref[0][:2]), atol=1e-4)


def test_window_limits_are_clear_errors(make_server):
    srv = make_server(max_length=WINDOW, window_stride=STRIDE, max_windows=4)
    r = httpx.post(srv.base + "/rerank", json={"query": QUERY, "documents": [LATE], "windows": 5}, timeout=60)
    assert r.status_code == 422 and "RERANKER_MAX_WINDOWS" in r.json()["message"]
    r = httpx.post(srv.base + "/rerank", json={"query": QUERY, "documents": [SHORT, LATE], "windows": 2,
                                               "truncate": False}, timeout=60)
    assert r.status_code == 422 and "pair 1 needs more than 2 windows" in r.json()["message"], r.text
    r = httpx.post(srv.base + "/rerank", json={"query": QUERY, "documents": [LATE], "windows": 0}, timeout=60)
    assert r.status_code == 422
    # and the server keeps serving
    assert httpx.post(srv.base + "/rerank", json={"query": QUERY, "documents": [SHORT]}, timeout=60).status_code == 200


def test_server_wide_windows_default(make_server, reference_windows):
    srv = make_server(max_length=WINDOW, window_stride=STRIDE, windows=3)
    ref = reference_windows(QUERY, [LATE], WINDOW, STRIDE)
    r = httpx.post(srv.base + "/inference", json=[{"query": QUERY, "passage": LATE}], timeout=60)
    np.testing.assert_allclose(r.json(), [max(ref[0][:3])], atol=1e-4)


def test_windows_of_a_query_too_long_for_only_second(tiny_fp32):
    tok = Tokenizer(tiny_fp32 / "tokenizer.json", 16)
    encs, owners = tok.encode_windows([("слово " * 40, "борщ " * 40), ("борщ", "суп " * 40)], 3, 4)
    assert owners[0] == 0 and owners.count(0) == 1 and len(encs[0]) == 16  # one truncated window
    assert owners.count(1) == 3 and encs[-1].truncated
