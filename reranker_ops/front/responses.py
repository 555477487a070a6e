"""The answers the front door gives itself: JSON errors with a kind, a status and a message that names the rule."""

from __future__ import annotations

import json
import time
from typing import Optional

from aiohttp import web

from ..protocol.api import EMPTY_TEXTS
from ..protocol.envelope import Timing

JSON = "application/json"
ERROR_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "overloaded",
    499: "client_closed",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
    505: "http_version_not_supported",
}


def error_response(status: int, message: str, headers: Optional[dict] = None) -> web.Response:
    body = json.dumps({"error": ERROR_KINDS.get(status, "error"), "message": message, "status": status},
                      ensure_ascii=False)
    return web.Response(status=status, text=body, content_type=JSON, headers=headers)


def unavailable() -> web.Response:
    return error_response(503, "the model server is unavailable; retry shortly", {"Retry-After": "2"})


def unauthorized() -> web.Response:
    return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                          {"WWW-Authenticate": "Bearer"})


# text-embeddings-inference's error kinds, by the status it answers them with (its router's ErrorType)
_TEI_TYPES = {400: "Validation", 413: "Validation", 422: "Validation", 424: "Backend", 429: "Overloaded",
              503: "Unhealthy"}


def tei_error(resp: web.Response) -> web.Response:
    """An error answer in text-embeddings-inference's shape, ``{"error", "error_type"}``, with TEI's status for
    it: the model failing is its 424 (Backend); the rest keep their status. The headers (Retry-After, Allow,
    WWW-Authenticate) stay."""
    try:
        message = json.loads(resp.text or "{}").get("message") or resp.reason
    except ValueError:
        message = resp.text or resp.reason
    status = 424 if resp.status in (500, 502) else resp.status
    kind = "Empty" if message == EMPTY_TEXTS else _TEI_TYPES.get(status, "Backend" if status >= 500 else "Validation")
    body = json.dumps({"error": message, "error_type": kind}, ensure_ascii=False)
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-type", "content-length")}
    out = web.Response(status=status, text=body, content_type=JSON, headers=headers)
    if resp.keep_alive is False:
        out.force_close()
    return out


def timing_headers(request: web.Request, timing: Timing, queued_s: float) -> dict:
    """TEI's timing headers (milliseconds), on every rerank answer: the whole time since the request came,
    its time queued in the gate, tokenizing it and in the model call its pairs were in (the score worker
    measured those), and the tokens and characters scored."""
    total_ms = int((time.monotonic() - request.get("t0", time.monotonic())) * 1000)
    return {"x-compute-type": "cpu", "x-compute-time": str(total_ms), "x-total-time": str(total_ms),
            "x-compute-tokens": str(timing.tokens), "x-compute-characters": str(timing.chars),
            "x-tokenization-time": str(timing.tokenize_us // 1000), "x-queue-time": str(int(queued_s * 1000)),
            "x-inference-time": str(timing.inference_us // 1000)}
