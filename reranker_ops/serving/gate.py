"""The API gate: the only door of the service, in the supervisor, in front of MOSEC's Rust controller.

MOSEC cannot see headers (so no API key), answers an empty body with 200, and answers errors in plain
text without naming the limit that was hit. The gate closes those gaps and owns what only it can know:

- admission before the body is read: at most ``max_in_flight`` requests (sized so MOSEC's own queue can
  never overflow), at most ``max_buffered_bytes`` of bodies held, else ``429`` + ``Retry-After``; one
  slot is kept for the supervisor's canary, which is known by a per-instance token, so a flood cannot
  starve the probe that ``/health`` follows, and the canary still takes the same path as every user;
- a deadline on reading the body (``408`` and close) and on the answer (``504``), which hold even if the
  controller itself stops answering;
- ``Content-Encoding`` other than identity is refused (``415``): nothing is ever inflated;
- every request that reaches MOSEC carries this instance's secret, which the validate stage checks, so a
  request sent straight to MOSEC's internal port is refused;
- JSON errors for every status (404 and 405 included), per-route metrics, and draining on stop.

The gate parses no JSON: validation happens in MOSEC's validate stage.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import aiohttp
from aiohttp import web

from ..config import Settings
from ..metrics import Metrics
from .frontdoor import FrontDoor
from .schema import ROUTE_TAGS, ROUTES

JSON = "application/json"
PROBE_HEADER = "X-Reranker-Probe"
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


@dataclass(frozen=True)
class Upstream:
    """Where the current MOSEC generation listens, and the secret its validate stage expects."""

    url: str
    secret: bytes
    generation: int = 0


class BodyTimeout(Exception):
    pass


class Gate:
    def __init__(self, settings: Settings, metrics: Metrics, log: logging.Logger,
                 upstream: Callable[[], Optional[Upstream]], probe_token: str,
                 index: Callable[[], dict]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.log = log
        self.upstream = upstream
        self.index = index
        self.probe_token = probe_token
        self.session: Optional[aiohttp.ClientSession] = None
        self.door: Optional[FrontDoor] = None
        self.draining = False
        self.in_flight = 0  # user requests admitted and not yet answered
        self.probes_in_flight = 0
        self.buffered = 0  # body bytes reserved by admitted requests
        self.upstream_in_flight: dict[int, int] = {}  # requests sent to each MOSEC generation, not answered
        self.max_in_flight = settings.effective_max_in_flight()
        self.idle = asyncio.Event()
        self.idle.set()
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._key = key.encode("utf-8") if key else b""

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, force_close=False),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def app(self, extra_routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]
            ) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes + 1, middlewares=[self._middleware])
        for route in ROUTES:
            app.router.add_route("*", route, self.handle_api)
        app.router.add_get("/", self.handle_index)
        for method, path, handler in extra_routes:
            app.router.add_route(method, path, handler)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """JSON for every error aiohttp raises itself (404, 405, ...); the connection's deadline paused."""
        door = self.door
        if door is not None:
            door.begin(request.protocol)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {404: f"no route {request.path}; the API is POST " + ", ".join(ROUTES),
                       405: f"{request.path} does not take {request.method}"}.get(exc.status, exc.reason)
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            resp = error_response(exc.status, message, headers)
            self.metrics.observe_request("other", resp.status, 0.0)
            return resp
        finally:
            if door is not None:
                door.end(request.protocol)

    async def handle_index(self, request: web.Request) -> web.Response:
        return web.json_response(self.index())

    def _authorized(self, request: web.Request) -> bool:
        if not self._key:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self._key)

    def _is_probe(self, request: web.Request) -> bool:
        token = request.headers.get(PROBE_HEADER, "")
        return bool(token) and hmac.compare_digest(token.encode("utf-8"), self.probe_token.encode("utf-8"))

    async def _read_body(self, request: web.Request, prefix: bytes) -> bytearray | web.Response:
        """The body after ``prefix``, in one buffer (no second copy), or the error to answer."""
        limit = self.settings.max_body_bytes
        too_large = (
            f"request body over the limit of {limit} bytes (RERANKER_MAX_BODY_BYTES); send fewer or shorter documents"
        )
        if request.content_length is not None and request.content_length > limit:
            return error_response(413, too_large, {"Connection": "close"})
        buf = bytearray(prefix)
        start = len(buf)

        async def read() -> Optional[web.Response]:
            async for chunk in request.content.iter_chunked(1 << 16):
                if len(buf) - start + len(chunk) > limit:
                    return error_response(413, too_large, {"Connection": "close"})
                buf.extend(chunk)
            return None

        try:
            err = await asyncio.wait_for(read(), timeout=self.settings.body_timeout_s)
        except asyncio.TimeoutError:
            resp = error_response(408, f"the request body did not arrive within {self.settings.body_timeout_s:g}s"
                                  " (RERANKER_BODY_TIMEOUT_S)", {"Connection": "close"})
            # answer, then close at once: aiohttp would otherwise linger, reading the rest of a slow body
            await resp.prepare(request)
            await resp.write_eof()
            request.protocol.force_close()
            return resp
        return err if err is not None else buf

    def _admit(self, request: web.Request, probe: bool) -> Optional[web.Response]:
        """Reserve a slot (and the body's bytes) before anything is read, or say why not."""
        if probe:
            if self.probes_in_flight >= 1:
                return error_response(429, "a canary request is already in flight", {"Retry-After": "1"})
            self.probes_in_flight += 1
            return None
        size = request.content_length if request.content_length is not None else self.settings.max_body_bytes
        size = min(size, self.settings.max_body_bytes)
        if self.in_flight >= self.max_in_flight or (
            self.buffered and self.buffered + size > self.settings.max_buffered_bytes
        ):
            return error_response(
                429, f"server busy: {self.in_flight} requests in flight (limit {self.max_in_flight},"
                     " RERANKER_MAX_IN_FLIGHT); retry shortly", {"Retry-After": "1"})
        self.in_flight += 1
        self.buffered += size
        request["reserved"] = size
        self.idle.clear()
        self.metrics.in_flight = self.in_flight
        return None

    def _release(self, request: web.Request, probe: bool) -> None:
        if probe:
            self.probes_in_flight -= 1
            return
        self.in_flight -= 1
        self.buffered -= request.get("reserved", 0)
        self.metrics.in_flight = self.in_flight
        if self.in_flight == 0:
            self.idle.set()

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        t0 = time.perf_counter()
        probe = self._is_probe(request)
        resp = self._refuse_early(request, route)
        if resp is None:
            resp = self._admit(request, probe)
            if resp is None:
                try:
                    resp = await self._answer(request, route)
                except asyncio.CancelledError:  # the client went away
                    raise
                except Exception as exc:  # noqa: BLE001 - never a dropped connection for a gate bug
                    self.log.exception("gate error on %s", route)
                    resp = error_response(500, f"internal error in the gate: {type(exc).__name__}")
                finally:
                    self._release(request, probe)
        if not probe:
            self.metrics.observe_request(route, resp.status, time.perf_counter() - t0)
        return resp

    def _refuse_early(self, request: web.Request, route: str) -> Optional[web.Response]:
        """Everything decided from the request line and headers alone."""
        if request.method != "POST":
            return error_response(405, f"{route} takes POST", {"Allow": "POST"})
        if self.draining:
            return error_response(503, "the server is shutting down; retry on another instance",
                                  {"Retry-After": "5", "Connection": "close"})
        if not self._authorized(request):
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  {"WWW-Authenticate": "Bearer"})
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            resp = error_response(415, f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed",
                                  {"Accept-Encoding": "identity"})
            resp.force_close()
            return resp
        return None

    async def _answer(self, request: web.Request, route: str) -> web.StreamResponse:
        up = self.upstream()
        if up is None or self.session is None:
            return error_response(503, "the model server is (re)starting; retry shortly", {"Retry-After": "2"})
        prefix = up.secret + b" " + ROUTE_TAGS[route].encode() + b"\n"
        body = await self._read_body(request, prefix)
        if isinstance(body, web.Response):
            return body
        if len(body) - len(prefix) <= 64 and not bytes(body[len(prefix):]).strip():
            return error_response(400, "empty body: send a JSON request")
        deadline = self.settings.request_timeout_s
        self.upstream_in_flight[up.generation] = self.upstream_in_flight.get(up.generation, 0) + 1
        try:
            async with self.session.post(
                up.url, data=body, timeout=aiohttp.ClientTimeout(total=deadline + 1.0)
            ) as answer:
                data = await answer.read()
                status = answer.status
        except asyncio.TimeoutError:
            return error_response(504, f"no answer within the deadline of {deadline:g}s (RERANKER_REQUEST_TIMEOUT_S)")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            return error_response(503, "the model server is unavailable; retry shortly", {"Retry-After": "2"})
        finally:
            left = self.upstream_in_flight.get(up.generation, 1) - 1
            if left:
                self.upstream_in_flight[up.generation] = left
            else:
                self.upstream_in_flight.pop(up.generation, None)
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
