"""The public API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Built from the same limits the schema code enforces (documents per request, characters per text, windows),
so a client generator or a fuzzer sees exactly what the server accepts; ``tests/test_openapi.py`` checks it
against the real routes and fuzzes a real server with it (schemathesis). Standard library only.
"""

from __future__ import annotations

import json

from typing import Any

from .. import __version__
from .api import Limits

JSON = "application/json"
ERRORS = {
    400: "The body is not JSON, not UTF-8, or empty.",
    401: "Missing or wrong API key (when one is set).",
    404: "The request's model is not one this server serves (the message lists the names it takes).",
    413: "The body is over RERANKER_MAX_BODY_BYTES.",
    415: "A Content-Encoding other than identity.",
    422: "A field is missing, of the wrong type, or over a limit; the message names it.",
    429: "Too many requests or connections at once; retry after Retry-After.",
    424: "TEI's shape only: the model failed on this request (the other shapes answer 500).",
    500: "A request that killed a scoring worker twice (it is not retried, and refused for a while).",
    503: "The server is stopping or the model server is unavailable; retry after Retry-After.",
    504: "No answer within RERANKER_REQUEST_TIMEOUT_S.",
}


# Text the schema code accepts: something besides white space, no NUL character (and, beyond what JSON Schema can
# say, no lone UTF-16 surrogate).
TEXT_PATTERN = "^[^\\x00]*[^\\s\\x00][^\\x00]*$"


def _text(limit: int, what: str) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": limit, "pattern": TEXT_PATTERN, "description": what}


def _error_responses(*statuses: int, schema: str = "Error") -> dict:
    return {str(s): {"description": ERRORS[s], "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
            for s in statuses}


API_ERRORS = (400, 401, 404, 413, 415, 422, 429, 500, 503, 504)
TEI_ERRORS = (400, 401, 404, 413, 415, 422, 424, 429, 503, 504)


def openapi_document(limits: Limits, *, model: str = "", ops_on_api_port: bool = True) -> dict[str, Any]:
    """The document for a server with ``limits``; ``ops_on_api_port``: /health, /ready, /live and /metrics are
    answered on this port too (RERANKER_API_PORT_OPS is not ``off``)."""
    windows = {"type": "integer", "minimum": 1, "maximum": limits.max_windows,
               "description": "Score up to this many overlapping windows of each long document and keep the best"
                              " (1: truncate at the model's window)."}
    count = {"type": "integer", "minimum": 1}
    documents = {"type": "array", "minItems": 1, "maxItems": limits.max_documents,
                 "items": _text(limits.max_document_chars, "A document.")}
    cohere_documents = dict(documents, items={"oneOf": [
        _text(limits.max_document_chars, "A document."),
        {"type": "object", "required": ["text"], "description": "Its other fields (an id, metadata) come back as"
         " sent; with rank_fields, the fields scored, as 'name: value' lines (the text when it has none of them).",
         "properties": {"text": _text(limits.max_document_chars, "A document.")}}]})
    side = {"enum": ["right", "left"], "description": "Which end of a too-long text is cut (default right)."}
    cut = {"type": "integer", "minimum": 1, "description": "Tokens a text is cut to (at most the model's window)."}
    long_docs = {  # the long-document options, under the names the clients send (README: "Long documents")
        "truncation_side": side, "truncate_prompt_tokens": {"anyOf": [{"const": -1}, {"type": "integer", "minimum": 1}],
        "description": "vLLM: the pair cut to this many tokens (-1: the model's window)."}, "max_tokens_per_doc": dict(cut, description=
        "Cohere v2: each document cut to this many tokens."), "max_chunks_per_doc": dict(count, description="Cohere"
        " v1: windows per document (at most RERANKER_MAX_WINDOWS)."), "rank_fields": {"type": "array", "minItems": 1,
        "items": {"type": "string", "minLength": 1}, "description": "Cohere v1: the fields of object documents"
        " that are scored."}}
    query = _text(limits.max_query_chars, "The query (RERANKER_MAX_QUERY_CHARS).")
    score = {"type": "number"}
    schemas = {
        "Error": {"type": "object", "required": ["error", "message", "status"], "properties": {
            "error": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"}}},
        "TeiError": {"type": "object", "required": ["error", "error_type"], "properties": {
            "error": {"type": "string"}, "error_type": {"enum": ["Empty", "Validation", "Backend", "Overloaded",
                                                                 "Unhealthy", "Tokenizer"]}}},
        "AnyError": {"oneOf": [{"$ref": "#/components/schemas/Error"}, {"$ref": "#/components/schemas/TeiError"}]},
        "TeiRequest": {"type": "object", "required": ["query", "texts"], "description": "text-embeddings-inference's"
                       " /rerank: a body with texts and no documents.", "properties": {
            "query": query, "texts": dict(documents, description="The texts to rank."),
            "truncate": {"type": ["boolean", "null"], "description": "Unset: /info's auto_truncate (true)."},
            "truncation_direction": {"enum": ["right", "left", "Right", "Left"]},
            "raw_scores": {"type": "boolean"}, "return_text": {"type": "boolean"}, "model": {"type": "string"},
            "windows": windows}},
        "TeiResponse": {"type": "array", "items": {"type": "object", "required": ["index", "score"], "properties": {
            "index": {"type": "integer", "minimum": 0}, "score": score, "text": {"type": "string"}}}},
        "RerankRequest": {"type": "object", "required": ["query", "documents"], "properties": {
            "query": query, "documents": documents, "top_k": count, "top_n": count,
            "return_documents": {"type": "boolean"}, "raw_scores": {"type": "boolean"},
            "truncate": {"type": "boolean"}, "windows": windows, "model": {"type": "string"},
            "truncation_side": side, "truncate_prompt_tokens": long_docs["truncate_prompt_tokens"]}},
        "RerankResult": {"type": "object", "required": ["index", "relevance_score"], "properties": {
            "index": {"type": "integer", "minimum": 0}, "relevance_score": score, "document": {"type": "string"}}},
        "RerankResponse": {"type": "object", "required": ["scores", "results", "model", "usage"], "properties": {
            "scores": {"type": "array", "items": score},
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/RerankResult"}},
            "model": {"type": "string"}, "id": {"type": "string"}, "object": {"type": "string"},
            "created": {"type": "integer"},
            "usage": {"type": "object", "required": ["total_tokens"], "properties": {
                "total_tokens": {"type": "integer"}, "prompt_tokens": {"type": "integer"},
                "windows": {"type": "integer"}, "truncated_documents": {"type": "integer"}}}}},
        "CohereRequest": {"type": "object", "required": ["query", "documents"], "properties": {
            "query": query, "documents": cohere_documents, "top_n": count, "return_documents": {"type": "boolean"},
            "truncate": {"type": "boolean"}, "windows": windows, "model": {"type": "string"}, **long_docs}},
        "CohereResponse": {"type": "object", "required": ["id", "results", "meta"], "properties": {
            "id": {"type": "string"}, "model": {"type": "string"},
            "results": {"type": "array", "items": {"type": "object", "required": ["index", "relevance_score"],
                                                   "properties": {
                "index": {"type": "integer", "minimum": 0}, "relevance_score": score,
                "document": {"type": "object"}}}},
            "meta": {"type": "object"}, "usage": {"type": "object"}}},
        "InferenceRequest": {"type": "array", "minItems": 1, "maxItems": limits.max_documents, "items": {
            "type": "object", "required": ["query", "passage"], "properties": {
                "query": query, "passage": _text(limits.max_document_chars, "A document.")}}},
        "InferenceResponse": {"type": "array", "items": score},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"enum": ["healthy", "degraded", "unhealthy"]}, "reason": {"type": "string"},
            "state": {"type": "string"}, "model": {"type": "string"}}},
    }

    # null is "not given" for every optional field (Python clients send None for what they leave unset)
    for name in ("RerankRequest", "TeiRequest", "CohereRequest"):
        props, required = schemas[name]["properties"], schemas[name]["required"]
        for key, prop in props.items():
            if key not in required and "null" not in json.dumps(prop):
                props[key] = {"anyOf": [prop, {"type": "null"}]}

    def post(summary: str, request: str, response: str, errors: str = "Error") -> dict:
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{request}"}}}},
            "responses": {"200": {"description": "Scored.", "content": {
                JSON: {"schema": {"$ref": f"#/components/schemas/{response}"}}}},
                **_error_responses(*sorted(set(API_ERRORS) | (set(TEI_ERRORS) if errors != "Error" else set())),
                                   schema=errors)},
        }}

    def get(summary: str, schema: dict) -> dict:
        return {"get": {"summary": summary, "responses": {"200": {"description": summary, "content": {
            JSON: {"schema": schema}}}, **_error_responses(401)}}}

    schemas["RerankOrTei"] = {"oneOf": [{"$ref": "#/components/schemas/RerankRequest"},
                                        {"$ref": "#/components/schemas/TeiRequest"}]}
    schemas["RerankOrTeiResponse"] = {"oneOf": [{"$ref": "#/components/schemas/RerankResponse"},
                                                {"$ref": "#/components/schemas/TeiResponse"}]}
    paths: dict[str, Any] = {
        "/rerank": post("Rerank documents for a query: infinity_emb's shape, or text-embeddings-inference's (texts,"
                        " no documents), answered in the shape asked.", "RerankOrTei", "RerankOrTeiResponse",
                        errors="AnyError"),
        "/v1/rerank": post("Rerank, Cohere v1's shape.", "CohereRequest", "CohereResponse"),
        "/v2/rerank": post("Rerank, Cohere v2's shape.", "CohereRequest", "CohereResponse"),
        "/inference": post("Score query/passage pairs.", "InferenceRequest", "InferenceResponse"),
        "/": {"get": {"summary": "What this server is.", "responses": {"200": {"description": "Its name, model"
                      " and routes.", "content": {JSON: {"schema": {"type": "object"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": {
            "description": "OpenAPI 3.1.", "content": {JSON: {"schema": {"type": "object"}}}}}}},
        "/info": get("The model and the limits (text-embeddings-inference's fields, then rerankctl's).", {
            "type": "object", "required": ["model_id", "max_input_length", "max_client_batch_size", "auto_truncate"]}),
        "/v1/models": get("The names a request's model may give (OpenAI's list).", {
            "type": "object", "required": ["object", "data"], "properties": {"data": {"type": "array", "items": {
                "type": "object", "required": ["id", "object"]}}}}),
    }
    if ops_on_api_port:
        health = {"description": "Healthy, or why not.", "content": {JSON: {"schema": {"$ref": "#/components/schemas/Health"}}}}
        simple = {"content": {JSON: {"schema": {"type": "object"}}}}
        paths["/health"] = {"get": {"summary": "200 only while a real rerank succeeded recently and every worker is"
                                               " there.", "responses": {"200": health, "503": health}}}
        paths["/ready"] = {"get": {"summary": "Answering correctly now.", "responses": {
            "200": {"description": "Ready.", **simple}, "503": {"description": "Not ready.", **simple}}}}
        paths["/live"] = {"get": {"summary": "The supervisor's loop turns.", "responses": {
            "200": {"description": "Live.", **simple}, "503": {"description": "Stuck.", **simple}}}}
        paths["/metrics"] = {"get": {"summary": "Prometheus metrics.", "responses": {"200": {
            "description": "Text exposition.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "rerankctl", "version": __version__,
                 "description": f"Cross-encoder reranking{f' with {model}' if model else ''}."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
