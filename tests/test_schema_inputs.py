"""What the schema code makes of hostile or unusual bodies (issue 31); each case was found by the fuzzers
(schemathesis against the published document, hypothesis against the parser) or by the review of the issue,
and stays here as a regression test. Pure functions: no server."""

from __future__ import annotations

import json

import pytest

from reranker_ops.protocol.api import Limits, RequestError, parse_job


def parse(body, route: str = "/rerank", **limits):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
    return parse_job(route, raw, Limits(**limits))


def refused(body, route: str = "/rerank", **limits) -> tuple[int, str]:
    with pytest.raises(RequestError) as info:
        parse(body, route, **limits)
    return info.value.status, info.value.message


def test_integral_floats_are_integers_as_json_schema_says():
    # schemathesis sent "top_k": 969.0 and "windows": 6.0, valid integers for the published document
    job = parse({"query": "q", "documents": ["a", "b"], "top_k": 1.0, "windows": 2.0})
    assert job.top_n == 1 and job.windows == 2
    assert refused({"query": "q", "documents": ["a"], "top_n": 1.5})[0] == 422
    assert refused(b'{"query": "q", "documents": ["a"], "top_n": 1e400}')[0] == 422  # infinity
    assert refused({"query": "q", "documents": ["a"], "windows": True})[0] == 422


def test_a_lone_surrogate_is_422_naming_where_it_is():
    status, message = refused(b'{"query": "ok", "documents": ["fine", "bad \\udc80 here"]}')
    assert status == 422 and "documents[1]" in message and "\\udc80" in message and "character 4" in message
    status, message = refused(b'{"query": "\\ud800"}', "/v1/rerank")
    assert status == 422 and "query" in message
    assert refused(b'[{"query": "q", "passage": "\\udfff"}]', "/inference")[0] == 422
    job = parse(b'{"query": "\\ud83d\\ude00", "documents": ["ok"]}')  # a pair spelled in escapes is text
    assert job.queries == ["\U0001f600"]


def test_the_query_has_its_own_lower_limit():
    status, message = refused({"query": "я" * 9000, "documents": ["d"]})
    assert status == 422 and "RERANKER_MAX_QUERY_CHARS" in message and "9000" in message
    assert parse({"query": "я" * 9000, "documents": ["d"]}, max_query_chars=10_000).queries[0] == "я" * 9000
    status, message = refused([{"query": "q" * 9000, "passage": "p"}], "/inference")
    assert status == 422 and "[0].query" in message
    # a document keeps the document limit
    assert parse({"query": "q", "documents": ["d" * 20_000]}).passages == ["d" * 20_000]


@pytest.mark.parametrize("raw, status", [
    (b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),  # nested too deep
    (b'{"query": "q", "documents": ["d"], "top_n": ' + b"9" * 5000 + b"}", 400),  # past Python's digit limit
    (b'{"query": "q", "documents": ["d"], "top_n": 99999999999999999999}', None),  # a large but legal integer
    (b"\xef\xbb\xbf" + b'{"query": "q", "documents": ["d"]}', 400),  # a byte order mark is not JSON
    (b'{"query": "q", "documents": ["d"]} trailing', 400),
    (b'{"query": NaN, "documents": ["d"]}', 422),
])
def test_odd_json_is_a_clear_4xx_or_a_job(raw, status):
    if status is None:
        assert parse(raw).top_n == 99999999999999999999
    else:
        assert refused(raw)[0] == status
