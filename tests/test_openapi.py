"""The published API (``GET /openapi.json``), checked against the real server's routes and fuzzed against a
real server with schemathesis: bounded examples, a fixed seed (issue 31). Whatever the fuzzer sends, the
answer is one the document promises (status, content type, body shape) and never a server error."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.timeout(900)

METHODS = ("get", "post", "put", "delete", "patch")


@pytest.fixture(scope="module")
def document(shared_server) -> dict:
    r = httpx.get(shared_server.base + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    return r.json()


def test_the_document_names_exactly_the_routes_the_server_answers(shared_server, document):
    paths = document["paths"]
    index = httpx.get(shared_server.base + "/", timeout=10).json()
    assert set(index["routes"]) <= set(paths)  # every API route the server lists is documented
    with httpx.Client(base_url=shared_server.base, timeout=30) as c:
        for path, ops in paths.items():
            for method in METHODS:
                r = c.request(method.upper(), path, json={"query": "q", "documents": ["d"]} if method == "post" else None)
                if method in ops:
                    assert r.status_code not in (404, 405), (method, path, r.text)
                    assert str(r.status_code) in ops[method]["responses"], (method, path, r.status_code)
                else:
                    assert r.status_code == 405, (method, path, r.status_code)
        for missing in ("/v3/rerank", "/rerank/", "/docs", "/score"):
            assert c.post(missing, json={}).status_code == 404
    # the limits in the document are the server's (defaults here)
    request = document["components"]["schemas"]["RerankRequest"]["properties"]
    windows = request["windows"]["anyOf"]  # an optional field: the bound, or null for "not given"
    assert request["documents"]["maxItems"] == 1000 and windows[0]["maximum"] == 8 and windows[1] == {"type": "null"}
    assert request["query"]["maxLength"] == 8192


def test_ops_routes_are_documented_only_where_they_are_answered(make_server):
    server = make_server(api_port_ops="off")
    doc = httpx.get(server.base + "/openapi.json", timeout=10).json()
    assert not {"/health", "/metrics", "/ready", "/live"} & set(doc["paths"])
    assert httpx.get(server.base + "/health", timeout=10).status_code == 404


# The text limits of the fuzzed server. Schemathesis folds a string's maxLength into its pattern (the document's
# ``^[^\x00]*[^\s\x00][^\x00]*$`` becomes ``^[^\x00]{0,49999}[^\s\x00][^\x00]{0,49999}$`` at the default
# 50 000 characters), and jsonschema_rs takes ~0.7 s to canonicalize that quantifier each time a strategy is
# built: 60 of the 77 s this test took at the defaults went there, not to the server (1.9 ms at 100 characters,
# 111 ms at 8191). The limits are checked by the same code whatever their value, and the document at the
# defaults is checked above (test_the_document_names_exactly_the_routes_the_server_answers); at these values
# the fuzzer's strings reach the limits and cross them more often than at 50 000.
FUZZ_LIMITS = {"max_query_chars": 200, "max_document_chars": 500}


def test_fuzzed_requests_get_documented_answers_and_never_a_server_error(make_server):
    """Every operation of the document, with the requests schemathesis makes of it (valid ones and, for the
    bodies, ones that break the schema): each answer must match the document, and none may be a 5xx."""
    server = make_server(**FUZZ_LIMITS)
    document = httpx.get(server.base + "/openapi.json", timeout=10).json()
    request = document["components"]["schemas"]["RerankRequest"]["properties"]
    assert request["query"]["maxLength"] == FUZZ_LIMITS["max_query_chars"]
    assert request["documents"]["items"]["maxLength"] == FUZZ_LIMITS["max_document_chars"]
    api = schemathesis.openapi.from_dict(document)
    api.config.update(base_url=server.base)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == sum(len(ops) for ops in document["paths"].values())
    runs = [(op, schemathesis.GenerationMode.POSITIVE) for op in operations]
    # bodies that break the schema, for the operations that take one (a GET without parameters has none)
    runs += [(op, schemathesis.GenerationMode.NEGATIVE) for op in operations if op.method.upper() == "POST"]
    for operation, mode in runs:
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=40, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            case.call_and_validate(base_url=server.base, timeout=60)

        fuzz()


def test_an_object_document_is_documented_as_the_server_takes_it():
    """Found by the fuzz above: the document allowed any object as a Cohere document, and the server refused one
    without ``text`` (422). An object needs its text; with rank_fields, the fields it has are scored instead."""
    from reranker_ops.protocol.api import Limits, RequestError, parse_job
    from reranker_ops.protocol.openapi import openapi_document

    doc = openapi_document(Limits())
    items = doc["components"]["schemas"]["CohereRequest"]["properties"]["documents"]["items"]["oneOf"]
    objects = [i for i in items if i.get("type") == "object"]
    assert objects and all(o.get("required") == ["text"] for o in objects)
    body = b'{"query": "q", "documents": [{"t": 1}]}'
    with pytest.raises(RequestError) as err:
        parse_job("/v1/rerank", body, Limits())
    assert err.value.status == 422 and "'text'" in err.value.message
    job = parse_job("/v1/rerank", b'{"query": "q", "documents": [{"text": "x", "t": 1}], "rank_fields": ["z"]}',
                    Limits())
    assert job.passages == ["x"]
