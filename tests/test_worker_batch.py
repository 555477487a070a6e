"""The score worker's batch, run by the real worker class on the tiny model (no MOSEC process: the batch is
what MOSEC would hand it). MOSEC answers a batch with one status, so a request that fails its checks must be
answered in the body and never cost the others of its batch their answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mosec import ClientError

from conftest import DOCS, QUERY
from reranker_ops.serving.schema import REFUSED, ROUTE_TAGS, Failed
from reranker_ops.serving.workers import CONFIG_ENV, Score

pytestmark = pytest.mark.timeout(120)
SECRET = "0123456789abcdef" * 2


@pytest.fixture()
def worker(tiny_fp32, tmp_path, monkeypatch) -> Score:
    cfg = {
        "variant_dir": str(tiny_fp32), "model_name": "tiny", "threads": 1, "pin_threads": False,
        "token_budget": 2048, "attention_budget": 512 * 512, "max_length": 0,
        "limits": {"max_documents": 1000, "max_document_chars": 100_000, "windows": 1, "max_windows": 8},
        "window_stride": 64, "worker_dir": str(tmp_path / "workers"), "generation": 1, "gate_secret": SECRET,
    }
    (tmp_path / "workers").mkdir()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    return Score()


def sent(route: str, body: bytes | dict, secret: str = SECRET) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return f"{secret} {ROUTE_TAGS.get(route, route)}\n".encode() + raw


def test_a_request_that_fails_its_checks_fails_alone_in_its_batch(worker, reference_scorer):
    good = {"query": QUERY, "documents": DOCS}
    batch = [
        sent("/rerank", good),
        sent("/rerank", b'{"query": "q", "docu'),  # undecodable: 400
        sent("/rerank", {"query": QUERY, "documents": ["слово " * 3000], "truncate": False}),  # too long: 422
        sent("9", good),  # a route tag nobody sends: 400
        sent("/v1/rerank", {"query": QUERY, "documents": DOCS[:2], "top_n": 1}),
    ]
    answers = [worker.serialize(x) for x in worker.forward(batch)]
    assert len(answers) == len(batch)
    failures = [Failed.decode(a) for a in answers]
    assert failures[0] is None and failures[4] is None
    assert failures[1].status == 400
    assert failures[2].status == 422 and "truncate" in failures[2].message
    assert failures[3] == Failed(400, "unknown route tag")
    scores = json.loads(answers[0])["scores"]
    np.testing.assert_allclose(scores, reference_scorer(QUERY, DOCS), atol=1e-4)
    # the same request alone gets the same answer as in the batch with the failures
    alone = json.loads(worker.serialize(worker.forward(batch[0])))  # MOSEC passes a bare item at batch size 1
    np.testing.assert_allclose(alone["scores"], scores, atol=1e-6)
    assert len(json.loads(answers[4])["results"]) == 1
    d = worker.hb.data
    assert d["requests"] == 6 and d["errors"] == 3 and d["batches"] == 2


def test_a_request_without_the_gates_secret_fails_its_whole_batch_before_any_work(worker):
    good = sent("/rerank", {"query": QUERY, "documents": DOCS})
    for stranger in (b"0\n" + good.partition(b"\n")[2], sent("/rerank", {"query": "q", "documents": ["d"]}, "f" * 32)):
        with pytest.raises(ClientError, match=REFUSED):
            worker.forward([good, stranger])
    assert worker.hb.data["pairs"] == 0  # nothing was scored
    assert Failed.decode(worker.serialize(worker.forward([good])[0])) is None


def test_failed_round_trips_and_json_is_not_a_failure():
    f = Failed(422, "pair 3 is longer than … (RERANKER_MAX_WINDOWS)")
    assert Failed.decode(f.encode()) == f
    assert Failed.decode(b'{"scores": [0.5]}') is None
    assert Failed.decode(b"!oops") == Failed(500, "")
