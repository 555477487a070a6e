"""The API gate: the only door of the service, in the supervisor, in front of MOSEC's Rust controller.

MOSEC cannot see headers (so no API key), answers an empty body with 200, and answers errors in plain
text without naming the limit that was hit. The gate closes those gaps and owns what only it can know:

- admission: at most ``max_in_flight`` requests (sized so MOSEC's own queue can never overflow), said
  before the body is read when the server is full and taken once it has arrived (a slow body holds a
  connection, never a slot), and at most ``max_buffered_bytes`` of bodies held, counted as they arrive; else
  ``429`` + ``Retry-After``. One slot is kept for the supervisor's canary, which is known by a per-instance
  token, so a flood cannot starve the probe that ``/health`` follows, and the canary still takes the same path
  as every user;
- a deadline on reading the body (``408`` and close) and on the answer (``504``), which hold even if the
  controller itself stops answering;
- ``Content-Encoding`` other than identity is refused (``415``): nothing is ever inflated;
- every envelope that reaches MOSEC is sealed with the generation's secret (an HMAC; the secret itself never
  travels), which the score worker checks, so a request sent straight to MOSEC's internal port is refused;
  and the worker's answer is sealed too, so the gate takes scores only from the generation it started;
- JSON errors for every status (404 and 405 included), per-route metrics, and draining on stop.

What happens to a request once it is admitted, up to MOSEC and back, is ``dispatch.py``'s. The gate parses no
JSON of a small request: the score worker validates it, and a request that fails its checks comes back as
``Failed`` in its part of the envelope's answer, answered with its own status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable, Optional

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..protocol.api import ROUTES, Limits, tei_shaped
from ..protocol.envelope import PART_HEAD_LEN
from ..protocol.openapi import openapi_document
from ..settings import Settings
from ..observe import REQUEST_ID_HEADER, request_id, request_id_from
from .fastlane import GONE, OVER, FastRequest
from .listener import FrontDoor
from .metrics import Metrics
from .responses import error_response, tei_error, unauthorized
from .tracing import Tracing

PROBE_HEADER = "X-Reranker-Probe"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]  # method, path, handler


def _raw(header_value: str) -> bytes:
    """A header value's bytes as the client sent them (aiohttp decodes them as UTF-8 with surrogateescape)."""
    return header_value.encode("utf-8", "surrogateescape")


def limits_of(settings: Settings) -> Limits:
    return Limits(max_documents=settings.max_documents, max_document_chars=settings.max_document_chars,
                  windows=settings.windows, max_windows=settings.max_windows, max_query_chars=settings.max_query_chars)


class Gate:
    def __init__(self, settings: Settings, metrics: Metrics, log: logging.Logger, dispatch: Any,
                 probe_token: str, source: Any, tracing: Tracing) -> None:
        self.settings = settings
        self.metrics = metrics
        self.log = log
        self.dispatch = dispatch  # the router: each model's Dispatch (dispatch.py), by the request's model
        self.source = source  # the index, /info and the served names (front.health.HealthSource)
        self.index = source.index
        self.tracing = tracing
        self.probe_token = probe_token
        self.door: Optional[FrontDoor] = None
        self.in_flight = 0  # user requests admitted (their bodies read) and not yet answered
        self.taken = 0  # user requests the gate took and has not answered, bodies still being read included
        self.probes_in_flight = 0
        self.buffered = 0  # body bytes held by requests (as they arrive; then what their parsed form holds)
        self.max_in_flight = settings.effective_max_in_flight()
        self.limits = dispatch.limits
        self.idle = asyncio.Event()
        self.idle.set()
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._key = key.encode("utf-8") if key else b""

    @property
    def draining(self) -> bool:
        return self.dispatch.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.dispatch.draining = value

    def app(self, extra_routes: list[Route]) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes + 1, middlewares=[self._middleware])
        for route in ROUTES:
            app.router.add_route("*", route, self.handle_api)
        app.router.add_get("/", self.handle_index)
        app.router.add_get("/openapi.json", self.handle_openapi)
        app.router.add_get("/info", self.handle_info)
        app.router.add_get("/v1/models", self.handle_models)
        for method, path, handler in extra_routes:
            app.router.add_route(method, path, handler)
        return app


    def ops_routes(self, routes: list[Route]) -> list[Route]:
        """The health port's routes as the API port offers them (``api_port_ops``): as they are (open), only
        with the API key (key; by default whenever a key is set), or not at all, answered with a JSON 404 that
        names the health port (off). The health port itself always serves them, for probes and scrapers on the
        private network."""
        mode = "off" if self.settings.api_port_ops == "off" else ("key" if self.settings.ops_need_key else "open")
        if mode == "open":
            return routes
        hport = self.settings.health_port

        def guard(path: str, handler: Handler) -> Handler:
            async def guarded(request: web.Request) -> web.StreamResponse:
                if mode == "off":
                    return error_response(404, f"{path} is served on the health port {hport} only"
                                               " (RERANKER_API_PORT_OPS=off)")
                if not self._authorized(request):
                    return unauthorized()
                return await handler(request)
            return guarded

        return [("*" if mode == "off" else method, path, guard(path, handler)) for method, path, handler in routes]


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


    async def handle_info(self, request: web.Request) -> web.Response:
        """text-embeddings-inference's ``GET /info`` (what clients size their requests from), and ours."""
        if not self._authorized(request):
            return unauthorized()
        return web.json_response(self.source.info())

    async def handle_models(self, request: web.Request) -> web.Response:
        """OpenAI's model list: the served model, and each alias a request's ``model`` may use for it."""
        if not self._authorized(request):
            return unauthorized()
        names = self.source.served_names()
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "rerankctl",
                 **({"root": names[0]} if i else {})} for i, name in enumerate(names)]
        return web.json_response({"object": "list", "data": data})

    async def handle_openapi(self, request: web.Request) -> web.Response:
        doc = openapi_document(self.limits, model=str(self.index().get("model", "")),
                               ops_on_api_port=self.settings.api_port_ops != "off")
        return web.json_response(doc)


    def _authorized(self, request: web.Request) -> bool:
        if not self._key:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched. aiohttp decodes header
        # bytes that are not UTF-8 as surrogates: surrogateescape gives those bytes back instead of failing.
        return scheme.lower() == "bearer" and hmac.compare_digest(_raw(token.strip()), self._key)


    def _is_probe(self, request: web.Request) -> bool:
        token = request.headers.get(PROBE_HEADER, "")
        return bool(token) and hmac.compare_digest(_raw(token), self.probe_token.encode("utf-8"))


    def _too_large(self) -> web.Response:
        return error_response(413, f"request body over the limit of {self.settings.max_body_bytes} bytes"
                                   " (RERANKER_MAX_BODY_BYTES); send fewer or shorter documents", {"Connection": "close"})

    def _over_buffered(self) -> web.Response:
        return error_response(429, f"server busy: {self.buffered} bytes of request bodies held (limit"
                                   f" {self.settings.max_buffered_bytes}, RERANKER_MAX_BUFFERED_BYTES);"
                                   " retry shortly", {"Retry-After": "1", "Connection": "close"})

    def _cut_off(self, request: web.Request, began: float, got: int) -> web.Response:
        """The body stopped coming: cut off by the body deadline (the door answered 408 and closed), or the
        client went away. Either way nobody reads what is answered here; it is counted, and logged in one line."""
        if time.monotonic() - began >= self.settings.body_timeout_s:
            return error_response(408, "the request body did not arrive in time (RERANKER_BODY_TIMEOUT_S)")
        self.log.info("a client went away in the middle of its request body (%d of %s bytes)", got,
                      request.content_length)
        return error_response(499, "the client went away before sending its whole body")

    async def _read_body(self, request: web.Request, prefix: bytes) -> bytearray | web.Response:
        """The body after ``prefix``, in one buffer (no second copy), or the error to answer. Its bytes count
        against RERANKER_MAX_BUFFERED_BYTES as they arrive, not as declared: a client that declares a large
        body and trickles it holds only what it sent, and the body deadline ends it."""
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._too_large()
        buf = bytearray(prefix)
        start = len(buf)
        door = self.door
        began = time.monotonic()
        if door is not None:  # the front door's sweeper enforces the body deadline (no task per request)
            door.reading(request.protocol, self.settings.body_timeout_s)
        try:
            async for chunk in request.content.iter_chunked(1 << 16):
                if len(buf) - start + len(chunk) > limit:
                    return self._too_large()
                if self.buffered + len(chunk) > self.settings.max_buffered_bytes:
                    return self._over_buffered()
                buf.extend(chunk)
                self.buffered += len(chunk)
                request["reserved"] = request.get("reserved", 0) + len(chunk)
        except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError,
                HttpProcessingError):
            return self._cut_off(request, began, len(buf) - start)
        finally:
            if door is not None:
                door.read_done(request.protocol)
        return buf

    async def _fast_body(self, request: FastRequest) -> bytearray | web.Response:
        """The body the fast lane reads (fastlane.py: at most its bound, counted as it arrives, under the same
        body deadline), or the error to answer."""
        began = time.monotonic()
        outcome = await request.whole()
        if outcome == OVER:
            return self._over_buffered()
        if outcome == GONE:
            return self._cut_off(request, began, len(request.body) - PART_HEAD_LEN)
        return request.body


    def _busy(self) -> web.Response:
        return error_response(429, f"server busy: {self.in_flight} requests in flight (limit {self.max_in_flight},"
                                   " RERANKER_MAX_IN_FLIGHT); retry shortly", {"Retry-After": "1"})


    def _admit(self, request: web.Request, probe: bool) -> Optional[web.Response]:
        """Take a slot for a request whose body has arrived, or say why not. Reading a body takes no slot: a
        slow client holds a connection (bounded, with a deadline), never a place in the queue."""
        if probe:
            if self.probes_in_flight >= self.dispatch.count:  # one canary per model
                return error_response(429, "a canary request is already in flight", {"Retry-After": "1"})
            self.probes_in_flight += 1
            request["admitted"] = True
            return None
        if self.in_flight >= self.max_in_flight:
            return self._busy()
        self.in_flight += 1
        request["admitted"] = True
        request["admitted_at"] = time.monotonic()
        request["owner"] = id(request)
        self.metrics.in_flight = self.in_flight
        return None


    def _hold(self, request: web.Request, nbytes: int) -> None:
        """The request holds ``nbytes`` now (its parsed form, instead of its body): admission counts that."""
        self.buffered += nbytes - request.get("reserved", 0)
        request["reserved"] = nbytes


    def _release(self, request: web.Request, probe: bool) -> None:
        self.buffered -= request.get("reserved", 0)
        request["reserved"] = 0
        if probe:
            if request.get("admitted"):
                self.probes_in_flight -= 1
            return
        self.taken -= 1
        if request.get("admitted"):
            self.in_flight -= 1
            self.metrics.in_flight = self.in_flight
        if self.taken == 0:
            self.idle.set()

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        t0 = request["t0"] = time.monotonic()
        probe = self._is_probe(request)
        rid = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        bound = request_id.set(rid)  # every log line written for this request carries it (observe.py)
        span = None if probe else self.tracing.request_span(request, route, rid)
        resp: Optional[web.StreamResponse] = None
        try:
            resp = self._refuse_early(request, route)
            if resp is None and not probe and self.in_flight >= self.max_in_flight:
                resp = self._busy()  # full: said before a byte of the body is read
            if resp is None:
                if not probe:
                    self.taken += 1
                    self.idle.clear()
                try:
                    resp = await self._take(request, route, probe)
                except asyncio.CancelledError:  # the client went away
                    raise
                except Exception as exc:  # noqa: BLE001 - never a dropped connection for a gate bug
                    self.log.exception("gate error on %s", route)
                    resp = error_response(500, f"internal error in the gate: {type(exc).__name__}")
                finally:
                    self._release(request, probe)
            if request.get("tei") and resp.status >= 400:
                resp = tei_error(resp)  # text-embeddings-inference's status and body, for its clients
            resp.headers[REQUEST_ID_HEADER] = rid
            if not probe:
                took = time.monotonic() - t0
                self.metrics.observe_request(route, resp.status, took)
                if self.settings.access_log:
                    # written on the loop's next turn, once aiohttp has handed the answer to the kernel: the
                    # line's formatting, write and flush (and the rotating handler's checks) are off the
                    # client's path. call_soon runs it in a copy of this context: the line keeps the request id.
                    asyncio.get_running_loop().call_soon(
                        self.log.info, "%s %s %d %.1fms %d bytes", request.method, route, resp.status, took * 1000,
                        request.get("bytes", 0))
            return resp
        finally:
            if span is not None:
                self.tracing.end_request(span, request, resp.status if resp is not None else 499)
            request_id.reset(bound)

    async def _take(self, request: web.Request, route: str, probe: bool) -> web.StreamResponse:
        """The body, then a place in flight, then the dispatcher's answer."""
        deadline_at = time.monotonic() + self.settings.request_timeout_s
        if isinstance(request, FastRequest):
            body = await self._fast_body(request)
        else:
            body = await self._read_body(request, b"\0" * PART_HEAD_LEN)
        if isinstance(body, web.Response):
            return body
        request["tei"] = tei_shaped(route, body, PART_HEAD_LEN)
        request["bytes"] = len(body) - PART_HEAD_LEN
        request["probe"] = probe
        refused = self._admit(request, probe)
        if refused is not None:
            return refused
        return await self.dispatch.answer(request, route, body, deadline_at, self._hold)

    def _refuse_early(self, request: web.Request, route: str) -> Optional[web.Response]:
        """Everything decided from the request line and headers alone."""
        if request.method != "POST":
            return error_response(405, f"{route} takes POST", {"Allow": "POST"})
        if self.draining:
            return error_response(503, "the server is shutting down; retry on another instance",
                                  {"Retry-After": "5", "Connection": "close"})
        if not self._authorized(request):
            return unauthorized()
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            resp = error_response(415, f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed",
                                  {"Accept-Encoding": "identity"})
            resp.force_close()
            return resp
        return None

    # --- answering: through the fair scheduler ----------------------------------------------------------
