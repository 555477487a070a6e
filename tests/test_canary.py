"""The canary's judgement of an answer: right only when the known-relevant passage wins."""

from __future__ import annotations

import pytest

from reranker_ops.supervise.canary import CANARY, judge

pytestmark = pytest.mark.timeout(60)


def test_canary_judge():
    ok = {"scores": [0.9, 0.1], "results": [{"index": 0}, {"index": 1}]}
    assert judge(200, ok) is None
    assert "HTTP 500" in judge(500, "boom")
    assert judge(200, {"scores": [0.9, float("nan")], "results": ok["results"]})
    assert judge(200, {"scores": [1.5, 0.1], "results": ok["results"]})
    assert len(CANARY["documents"]) == 2
    # every start waits for it and every probe runs it: the smallest real rerank of two documents
    assert len(CANARY["query"]) + sum(len(d) for d in CANARY["documents"]) <= 24
