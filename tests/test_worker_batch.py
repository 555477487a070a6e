"""The score worker's envelope, run by the real worker class on the tiny model (no MOSEC process: the envelope
is what the gate sends and MOSEC hands it). MOSEC answers a request with one status, so a request of an
envelope that fails its checks must be answered in its part and never cost the others their answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DOCS, QUERY
from mosec import ClientError

from reranker_ops.protocol.api import ROUTE_TAGS, Limits
from reranker_ops.protocol.envelope import (
    REFUSED,
    NO_TIMING,
    EnvelopeError,
    Failed,
    Timing,
    Untrusted,
    open_answer,
    open_envelope,
    pack_answers,
    part_head,
    read_answers,
    seal,
    seal_answer,
    split_answers,
)
from reranker_ops.protocol.genconfig import GenerationConfig, MosecArgs
from reranker_ops.worker.score import CONFIG_ENV, Score

pytestmark = pytest.mark.timeout(120)
SECRET = "0123456789abcdef" * 2


@pytest.fixture()
def worker(tiny_fp32, tmp_path, monkeypatch) -> Score:
    """The worker reads the file the supervisor writes: built with the same class, so the two cannot drift."""
    (tmp_path / "workers").mkdir()
    cfg = GenerationConfig(
        generation=1, variant_dir=str(tiny_fp32), model_name="tiny", secret=SECRET,
        worker_dir=str(tmp_path / "workers"), workers=1, threads=1, pin_threads=False,
        token_budget=2048, attention_budget=512 * 512, max_length=0, window_stride=64,
        limits=Limits(max_documents=1000, max_document_chars=100_000, windows=1, max_windows=8),
        mosec=MosecArgs(address="127.0.0.1", port=1, timeout_ms=1000, capacity=16,
                        path=str(tmp_path / "ipc"), max_request_size=1 << 20),
    )
    path = tmp_path / "config.json"
    cfg.write(path)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    return Score()


def sent(route: str, body: bytes | dict) -> bytes:
    """One part of an envelope, framed as the gate frames it."""
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return part_head(ROUTE_TAGS.get(route, route), len(raw)) + raw


ENVELOPE_ID = 0x1234


def envelope(parts: list[bytes], secret: str = SECRET, envelope_id: int = ENVELOPE_ID) -> bytes:
    """Parts sealed into an envelope, as the gate seals them."""
    return seal(secret.encode(), envelope_id, parts) + b"".join(parts)


def answered(worker: Score, parts: list[bytes]) -> list[tuple[bytes, Timing]]:
    answer = worker.serialize(worker.forward(envelope(parts)))
    return split_answers(open_answer(SECRET.encode(), ENVELOPE_ID, answer), len(parts))


def answers_of(worker: Score, parts: list[bytes]) -> list[bytes]:
    return [a for a, _ in answered(worker, parts)]


def test_a_request_that_fails_its_checks_fails_alone_in_its_envelope(worker, reference_scorer):
    good = {"query": QUERY, "documents": DOCS}
    parts = [
        sent("/rerank", good),
        sent("/rerank", b'{"query": "q", "docu'),  # undecodable: 400
        sent("/rerank", {"query": QUERY, "documents": ["слово " * 3000], "truncate": False}),  # too long: 422
        sent("9", good),  # a route tag nobody sends: 400
        sent("/v1/rerank", {"query": QUERY, "documents": DOCS[:2], "top_n": 1}),
    ]
    timed = answered(worker, parts)
    answers = [a for a, _ in timed]
    failures = [Failed.decode(a) for a in answers]
    assert failures[0] is None and failures[4] is None
    assert failures[1].status == 400
    assert failures[2].status == 422 and "truncate" in failures[2].message
    assert failures[3] == Failed(400, "unknown route tag")
    scores = json.loads(answers[0])["scores"]
    np.testing.assert_allclose(scores, reference_scorer(QUERY, DOCS), atol=1e-4)
    # the same request alone gets the same answer as in the envelope with the failures
    alone = json.loads(answers_of(worker, parts[:1])[0])
    np.testing.assert_allclose(alone["scores"], scores, atol=1e-6)
    assert len(json.loads(answers[4])["results"]) == 1
    # each scored request says what it cost: its tokens, its characters, and the time of the model call
    first, last = timed[0][1], timed[4][1]
    assert first.tokens == json.loads(answers[0])["usage"]["total_tokens"] > 0
    assert first.chars == len(QUERY) * len(DOCS) + sum(map(len, DOCS))
    assert first.inference_us > 0 and first.inference_us == last.inference_us  # one model call for both
    assert timed[1][1].tokens == timed[1][1].inference_us == 0  # an undecodable request was never scored
    d = worker.hb.data
    assert d["requests"] == 6 and d["errors"] == 3 and d["batches"] == 2


def test_an_envelope_not_sealed_by_the_gate_is_refused_whole_before_any_work(worker):
    good = sent("/rerank", {"query": QUERY, "documents": DOCS})
    body = json.dumps({"query": "q", "documents": ["d"]}).encode()
    sealed = envelope([good])
    for stranger in (
        envelope([good], secret="f" * 32),  # sealed with another secret
        sealed + sent("/rerank", body),  # a part added after the seal
        sealed[:-3],  # cut short
        sealed[:-5] + bytes([sealed[-5] ^ 1]) + sealed[-4:],  # one bit of a body changed after the seal
        body,  # a bare request
        good,  # a part without an envelope
        b"",
    ):
        with pytest.raises(ClientError, match=REFUSED):
            worker.forward(stranger)
    assert worker.hb.data["pairs"] == 0  # nothing was scored
    assert Failed.decode(answers_of(worker, [good])[0]) is None


def test_envelope_framing_round_trips_and_refuses_what_it_cannot_frame():
    parts = [sent("/rerank", b'{"a": 1}'), sent("chunk", "б".encode() * 5), sent("/inference", b"")]
    secret = SECRET.encode()
    assert open_envelope(secret, envelope(parts)) == (ENVELOPE_ID, [(b"0", b'{"a": 1}'), (b"C", "б".encode() * 5),
                                                                    (b"3", b"")])
    for bad in (b"", envelope([parts[0][:-1]]), envelope([parts[0] + b"x"]), b"x" * 120, envelope([])):
        with pytest.raises(EnvelopeError):
            open_envelope(secret, bad)
    with pytest.raises(Untrusted):
        open_envelope(secret, envelope(parts, secret="e" * 32))
    answers = [b'{"scores":[0.5]}', Failed(422, "too long").encode(), b""]
    timings = [Timing(1, 2, 3, 4), NO_TIMING, Timing(10**9, 0, 7, 0)]
    packed = pack_answers(list(zip(answers, timings)))
    sealed = seal_answer(secret, 7, packed)
    assert split_answers(open_answer(secret, 7, sealed), 3) == list(zip(answers, timings))
    for other_secret, other_id in ((b"e" * 32, 7), (secret, 8)):  # another generation's, another envelope's
        with pytest.raises(Untrusted):
            open_answer(other_secret, other_id, sealed)
    with pytest.raises(Untrusted):
        open_answer(secret, 7, sealed[:-1] + b"x")  # a changed answer
    assert read_answers(packed, 3) == [(200, answers[0], timings[0]), (422, b"too long", NO_TIMING),
                                       (200, b"", timings[2])]
    assert Timing(1, 2, 3, 4) + Timing(1, 1, 1, 1) == Timing(2, 3, 4, 5)
    for bad, n in ((packed, 2), (packed, 4), (packed.replace(b"0 1000000000", b"9 1000000000"), 3), (packed.replace(b"1,2,3,4", b"1,2,3"), 3),
                   (packed.replace(b"1,2,3,4", b"1,-2,3,4"), 3)):
        with pytest.raises(EnvelopeError):
            split_answers(bad, n)


def test_failed_round_trips_and_json_is_not_a_failure():
    f = Failed(422, "pair 3 is longer than … (RERANKER_MAX_WINDOWS)")
    assert Failed.decode(f.encode()) == f
    assert Failed.decode(b'{"scores": [0.5]}') is None
    assert Failed.decode(b"!oops") == Failed(500, "")
