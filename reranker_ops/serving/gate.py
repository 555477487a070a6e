"""The API front: the port clients talk to, in the supervisor, in front of MOSEC's Rust controller.

MOSEC cannot see headers (so no API key), answers an empty body with 200, and answers errors in plain
text without naming the limit that was hit. The gate closes those gaps and owns what only it can know:
per-route request metrics, draining on stop (503 + Retry-After), and a hard deadline on every request
(504) that holds even if the controller itself stops answering. Everything else, validation included,
happens in MOSEC's workers; the gate parses no JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import TYPE_CHECKING, Optional

import aiohttp
from aiohttp import web

from .schema import ROUTE_TAGS, ROUTES

if TYPE_CHECKING:  # pragma: no cover
    from ..process.supervisor import Supervisor

JSON = "application/json"
ERROR_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "payload_too_large",
    422: "validation_error",
    429: "overloaded",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}


def error_response(status: int, message: str, headers: Optional[dict] = None) -> web.Response:
    body = json.dumps({"error": ERROR_KINDS.get(status, "error"), "message": message, "status": status},
                      ensure_ascii=False)
    return web.Response(status=status, text=body, content_type=JSON, headers=headers)


def _clean_mosec_message(text: str) -> str:
    # MOSEC prefixes the kind ("request validation error: ..."); the JSON 'error' field carries it instead.
    for prefix in ("request validation error: ", "bad request: ", "validation error: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


class Gate:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.settings = sup.settings
        self.session: Optional[aiohttp.ClientSession] = None
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        self._key = key.encode("utf-8") if key else b""

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, force_close=False),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes + 1)
        for route in ROUTES:
            app.router.add_route("*", route, self.handle_api)
        app.router.add_get("/", self.handle_index)
        health = self.sup.health
        app.router.add_get("/health", health.handle_health)
        app.router.add_get("/ready", health.handle_ready)
        app.router.add_get("/live", health.handle_live)
        app.router.add_get("/metrics", health.handle_metrics)
        return app

    async def handle_index(self, request: web.Request) -> web.Response:
        info = {
            "name": "rerankctl",
            "model": self.sup.model_name,
            "routes": list(ROUTES),
            "health": f"http://{self.settings.host}:{self.settings.health_port}/health",
        }
        return web.json_response(info)

    def _authorized(self, request: web.Request) -> bool:
        if not self._key:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self._key)

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        limit = self.settings.max_body_bytes
        too_large = (
            f"request body over the limit of {limit} bytes (RERANKER_MAX_BODY_BYTES); send fewer or shorter documents"
        )
        if request.content_length is not None and request.content_length > limit:
            return error_response(413, too_large, {"Connection": "close"})
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                return error_response(413, too_large, {"Connection": "close"})
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        probe = request.headers.get("X-Reranker-Probe") == "1"
        t0 = time.perf_counter()
        self.in_flight += 1
        self.idle.clear()
        self.sup.metrics.in_flight = self.in_flight
        resp: web.StreamResponse
        try:
            resp = await self._answer(request, route)
        except asyncio.CancelledError:  # the client went away
            raise
        except Exception as exc:  # noqa: BLE001 - never a dropped connection for a gate bug
            self.sup.log.exception("gate error on %s", route)
            resp = error_response(500, f"internal error in the gate: {type(exc).__name__}")
        finally:
            self.in_flight -= 1
            self.sup.metrics.in_flight = self.in_flight
            if self.in_flight == 0:
                self.idle.set()
        if not probe:
            self.sup.metrics.observe_request(route, resp.status, time.perf_counter() - t0)
        return resp

    async def _answer(self, request: web.Request, route: str) -> web.StreamResponse:
        if request.method != "POST":
            return error_response(405, f"{route} takes POST", {"Allow": "POST"})
        if self.draining:
            return error_response(503, "the server is shutting down; retry on another instance",
                                  {"Retry-After": "5", "Connection": "close"})
        if not self._authorized(request):
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  {"WWW-Authenticate": "Bearer"})
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        if not body.strip():
            return error_response(400, "empty body: send a JSON request")
        upstream = self.sup.upstream_url
        if upstream is None or self.session is None:
            return error_response(503, "the model server is (re)starting; retry shortly", {"Retry-After": "2"})
        deadline = self.settings.request_timeout_s
        payload = ROUTE_TAGS[route].encode() + b"\n" + body
        try:
            async with self.session.post(
                upstream, data=payload, timeout=aiohttp.ClientTimeout(total=deadline + 1.0)
            ) as up:
                data = await up.read()
                status = up.status
        except asyncio.TimeoutError:
            return error_response(504, f"no answer within the deadline of {deadline:g}s (RERANKER_REQUEST_TIMEOUT_S)")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            return error_response(503, "the model server is unavailable; retry shortly", {"Retry-After": "2"})
        if status == 200:
            return web.Response(status=200, body=data, content_type=JSON)
        text = _clean_mosec_message(data.decode("utf-8", "replace").strip())
        headers = None
        if status == 429:
            text = f"queue full ({self.settings.queue_capacity} requests, RERANKER_QUEUE_CAPACITY); retry shortly"
            headers = {"Retry-After": "1"}
        elif status == 408:
            text = f"not scored within the deadline of {deadline:g}s (RERANKER_REQUEST_TIMEOUT_S)"
        elif status == 413:
            text = f"request body over the limit of {self.settings.max_body_bytes} bytes (RERANKER_MAX_BODY_BYTES)"
        elif status == 503:
            headers = {"Retry-After": "2"}
        elif status >= 500:
            text = f"the model server failed on this request ({text})"
        return error_response(status, text, headers)
