"""The public API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Built from the same limits the schema code enforces (documents per request, characters per text, windows),
so a client generator or a fuzzer sees exactly what the server accepts; ``tests/test_openapi.py`` checks it
against the real routes and fuzzes a real server with it (schemathesis). Standard library only.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from .api import Limits

JSON = "application/json"
ERRORS = {
    400: "The body is not JSON, not UTF-8, or empty.",
    401: "Missing or wrong API key (when one is set).",
    413: "The body is over RERANKER_MAX_BODY_BYTES.",
    415: "A Content-Encoding other than identity.",
    422: "A field is missing, of the wrong type, or over a limit; the message names it.",
    429: "Too many requests or connections at once; retry after Retry-After.",
    500: "A request that killed a scoring worker twice (it is not retried, and refused for a while).",
    503: "The server is stopping or the model server is unavailable; retry after Retry-After.",
    504: "No answer within RERANKER_REQUEST_TIMEOUT_S.",
}


# Text the schema code accepts: something besides white space, no NUL character (and, beyond what JSON Schema can
# say, no lone UTF-16 surrogate).
TEXT_PATTERN = "^[^\\x00]*[^\\s\\x00][^\\x00]*$"


def _text(limit: int, what: str) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": limit, "pattern": TEXT_PATTERN, "description": what}


def _error_responses(*statuses: int) -> dict:
    return {str(s): {"description": ERRORS[s], "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for s in statuses}


API_ERRORS = (400, 401, 413, 415, 422, 429, 500, 503, 504)


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
        {"type": "object", "required": ["text"],
         "properties": {"text": _text(limits.max_document_chars, "A document.")}}]})
    query = _text(limits.max_query_chars, "The query (RERANKER_MAX_QUERY_CHARS).")
    score = {"type": "number"}
    schemas = {
        "Error": {"type": "object", "required": ["error", "message", "status"], "properties": {
            "error": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"}}},
        "RerankRequest": {"type": "object", "required": ["query", "documents"], "properties": {
            "query": query, "documents": documents, "top_k": count, "top_n": count,
            "return_documents": {"type": "boolean"}, "raw_scores": {"type": "boolean"},
            "truncate": {"type": "boolean"}, "windows": windows, "model": {"type": "string"}}},
        "RerankResult": {"type": "object", "required": ["index", "relevance_score"], "properties": {
            "index": {"type": "integer", "minimum": 0}, "relevance_score": score, "document": {"type": "string"}}},
        "RerankResponse": {"type": "object", "required": ["scores", "results", "model", "usage"], "properties": {
            "scores": {"type": "array", "items": score},
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/RerankResult"}},
            "model": {"type": "string"}, "id": {"type": "string"}, "object": {"type": "string"},
            "created": {"type": "integer"},
            "usage": {"type": "object", "required": ["total_tokens"], "properties": {
                "total_tokens": {"type": "integer"}, "prompt_tokens": {"type": "integer"},
                "windows": {"type": "integer"}}}}},
        "CohereRequest": {"type": "object", "required": ["query", "documents"], "properties": {
            "query": query, "documents": cohere_documents, "top_n": count, "return_documents": {"type": "boolean"},
            "truncate": {"type": "boolean"}, "windows": windows, "model": {"type": "string"}}},
        "CohereResponse": {"type": "object", "required": ["id", "results", "meta"], "properties": {
            "id": {"type": "string"}, "model": {"type": "string"},
            "results": {"type": "array", "items": {"type": "object", "required": ["index", "relevance_score"],
                                                   "properties": {
                "index": {"type": "integer", "minimum": 0}, "relevance_score": score,
                "document": {"type": "object", "properties": {"text": {"type": "string"}}}}}},
            "meta": {"type": "object"}, "usage": {"type": "object"}}},
        "InferenceRequest": {"type": "array", "minItems": 1, "maxItems": limits.max_documents, "items": {
            "type": "object", "required": ["query", "passage"], "properties": {
                "query": query, "passage": _text(limits.max_document_chars, "A document.")}}},
        "InferenceResponse": {"type": "array", "items": score},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"enum": ["healthy", "degraded", "unhealthy"]}, "reason": {"type": "string"},
            "state": {"type": "string"}, "model": {"type": "string"}}},
    }

    def post(summary: str, request: str, response: str) -> dict:
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{request}"}}}},
            "responses": {"200": {"description": "Scored.", "content": {
                JSON: {"schema": {"$ref": f"#/components/schemas/{response}"}}}}, **_error_responses(*API_ERRORS)},
        }}

    paths: dict[str, Any] = {
        "/rerank": post("Rerank documents for a query (infinity_emb's shape).", "RerankRequest", "RerankResponse"),
        "/v1/rerank": post("Rerank, Cohere v1's shape.", "CohereRequest", "CohereResponse"),
        "/v2/rerank": post("Rerank, Cohere v2's shape.", "CohereRequest", "CohereResponse"),
        "/inference": post("Score query/passage pairs.", "InferenceRequest", "InferenceResponse"),
        "/": {"get": {"summary": "What this server is.", "responses": {"200": {"description": "Its name, model"
                      " and routes.", "content": {JSON: {"schema": {"type": "object"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": {
            "description": "OpenAPI 3.1.", "content": {JSON: {"schema": {"type": "object"}}}}}}},
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
