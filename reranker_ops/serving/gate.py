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
- batching: the requests that wait for a free worker go to MOSEC together, as one envelope
  (``scheduler.py``, ``schema``'s envelope), and each gets its own answer and status back; a request that
  kills the worker scoring it is isolated, then quarantined (``scheduler``'s ``worker_lost``);
- JSON errors for every status (404 and 405 included), per-route metrics, and draining on stop.

The gate parses no JSON of a small request: the score worker validates it, and a request that fails its
checks comes back as ``Failed`` in its part of the envelope's answer, answered with its own status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config import Settings
from ..metrics import Metrics
from .frontdoor import FrontDoor
from .openapi import openapi_document
from .scheduler import Dropped, FairScheduler, Poisoned, Unit
from .schema import (
    CHUNK,
    PART_HEAD_LEN,
    ROUTE_TAGS,
    ROUTES,
    EnvelopeError,
    Job,
    Limits,
    RequestError,
    Untrusted,
    build_response,
    chunk_body,
    open_answer,
    parse_job,
    part_head,
    read_answers,
    seal,
)
from .upstream import Refused, Upstream, UpstreamClient, UpstreamError, listener_is_ours

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
    499: "client_closed",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}


def _raw(header_value: str) -> bytes:
    """A header value's bytes as the client sent them (aiohttp decodes them as UTF-8 with surrogateescape)."""
    return header_value.encode("utf-8", "surrogateescape")


def limits_of(settings: Settings) -> Limits:
    return Limits(max_documents=settings.max_documents, max_document_chars=settings.max_document_chars,
                  windows=settings.windows, max_windows=settings.max_windows, max_query_chars=settings.max_query_chars)


def error_response(status: int, message: str, headers: Optional[dict] = None) -> web.Response:
    body = json.dumps({"error": ERROR_KINDS.get(status, "error"), "message": message, "status": status},
                      ensure_ascii=False)
    return web.Response(status=status, text=body, content_type=JSON, headers=headers)


def unavailable() -> web.Response:
    return error_response(503, "the model server is unavailable; retry shortly", {"Retry-After": "2"})


def unauthorized() -> web.Response:
    return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                          {"WWW-Authenticate": "Bearer"})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]  # method, path, handler


def _clean_mosec_message(text: str) -> str:
    # MOSEC prefixes the kind ("request validation error: ..."); the JSON 'error' field carries it instead.
    for prefix in ("request validation error: ", "bad request: ", "validation error: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


RESTART_POLL_S = 0.05
RETRY_PAUSE_S = 0.05  # after a cut connection: then 0.1, 0.15, ... up to RETRY_PAUSE_MAX_S
RETRY_PAUSE_MAX_S = 0.25
PORT_WAIT_S = 0.25  # a refused port is waited for this long, then the current generation is asked again
CUT_RETRIES = 2  # an envelope whose connection MOSEC cut mid-exchange is sent again at most this often
GONE_CHECK_S = 0.25  # how often a request waiting for its units looks whether its client is still there
DEFAULT_WINDOW = 512  # tokens of a model window, when no generation says (only for the scheduler's costs)
# A request that killed a score worker twice, the second time alone in its envelope, is "poison": its body's
# digest is kept this long (at most QUARANTINE_SIZE of them), and an identical body is answered at once.
QUARANTINE_S = 600.0
QUARANTINE_SIZE = 1024
POISONED = ("the model server's worker died twice while scoring this request, the second time alone: it is not"
            " retried, and the same request is refused for a while; check its input")
QUARANTINED = ("this request (byte for byte) made the model server's worker die before: it is refused without"
               " being scored; check its input")


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
        self.session: Optional[aiohttp.ClientSession] = None  # the supervisor's own calls: canary, metrics
        self.client: Optional[UpstreamClient] = None  # requests to MOSEC
        self.door: Optional[FrontDoor] = None
        self.draining = False
        self.in_flight = 0  # user requests admitted (their bodies read) and not yet answered
        self.taken = 0  # user requests the gate took and has not answered, bodies still being read included
        self.probes_in_flight = 0
        self.buffered = 0  # body bytes reserved by admitted requests
        self.upstream_in_flight: dict[int, int] = {}  # requests sent to each MOSEC generation, not answered
        self.max_in_flight = settings.effective_max_in_flight()
        self.scheduler = FairScheduler(settings.effective_schedule_budget(), self._send_group, slots=settings.workers,
                                       max_group=settings.max_batch_requests, linger_s=settings.batch_wait_ms / 1000,
                                       on_drop=self._dropped)
        self.limits = limits_of(settings)
        self.quarantine: OrderedDict[bytes, float] = OrderedDict()  # body digest -> monotonic time it ends
        self._foreign_ports: set[int] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._key = key.encode("utf-8") if key else b""

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, force_close=False),
            auto_decompress=False,
        )
        self.client = UpstreamClient(verify=listener_is_ours, on_foreign=self._foreign)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.session is not None:
            await self.session.close()

    def app(self, extra_routes: list[Route]) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes + 1, middlewares=[self._middleware])
        for route in ROUTES:
            app.router.add_route("*", route, self.handle_api)
        app.router.add_get("/", self.handle_index)
        app.router.add_get("/openapi.json", self.handle_openapi)
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

    async def _read_body(self, request: web.Request, prefix: bytes) -> bytearray | web.Response:
        """The body after ``prefix``, in one buffer (no second copy), or the error to answer. Its bytes count
        against RERANKER_MAX_BUFFERED_BYTES as they arrive, not as declared: a client that declares a large
        body and trickles it holds only what it sent, and the body deadline ends it."""
        limit = self.settings.max_body_bytes
        too_large = (
            f"request body over the limit of {limit} bytes (RERANKER_MAX_BODY_BYTES); send fewer or shorter documents"
        )
        if request.content_length is not None and request.content_length > limit:
            return error_response(413, too_large, {"Connection": "close"})
        buf = bytearray(prefix)
        start = len(buf)
        door = self.door
        began = time.monotonic()
        if door is not None:  # the front door's sweeper enforces the body deadline (no task per request)
            door.reading(request.protocol, self.settings.body_timeout_s)
        try:
            async for chunk in request.content.iter_chunked(1 << 16):
                if len(buf) - start + len(chunk) > limit:
                    return error_response(413, too_large, {"Connection": "close"})
                if self.buffered + len(chunk) > self.settings.max_buffered_bytes:
                    return error_response(429, f"server busy: {self.buffered} bytes of request bodies held (limit"
                                               f" {self.settings.max_buffered_bytes}, RERANKER_MAX_BUFFERED_BYTES);"
                                               " retry shortly", {"Retry-After": "1", "Connection": "close"})
                buf.extend(chunk)
                self.buffered += len(chunk)
                request["reserved"] = request.get("reserved", 0) + len(chunk)
        except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError,
                HttpProcessingError):
            # cut off by the body deadline (the door answered 408 and closed), or the client went away: either
            # way nobody reads what is answered here; it is counted, and logged in one line
            if time.monotonic() - began >= self.settings.body_timeout_s:
                return error_response(408, "the request body did not arrive in time (RERANKER_BODY_TIMEOUT_S)")
            self.log.info("a client went away in the middle of its request body (%d of %s bytes)",
                          len(buf) - start, request.content_length)
            return error_response(499, "the client went away before sending its whole body")
        finally:
            if door is not None:
                door.read_done(request.protocol)
        return buf

    def _busy(self) -> web.Response:
        return error_response(429, f"server busy: {self.in_flight} requests in flight (limit {self.max_in_flight},"
                                   " RERANKER_MAX_IN_FLIGHT); retry shortly", {"Retry-After": "1"})

    def _admit(self, request: web.Request, probe: bool) -> Optional[web.Response]:
        """Take a slot for a request whose body has arrived, or say why not. Reading a body takes no slot: a
        slow client holds a connection (bounded, with a deadline), never a place in the queue."""
        if probe:
            if self.probes_in_flight >= 1:
                return error_response(429, "a canary request is already in flight", {"Retry-After": "1"})
            self.probes_in_flight += 1
            request["admitted"] = True
            return None
        if self.in_flight >= self.max_in_flight:
            return self._busy()
        self.in_flight += 1
        request["admitted"] = True
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
        t0 = time.perf_counter()
        probe = self._is_probe(request)
        resp = self._refuse_early(request, route)
        if resp is None and not probe and self.in_flight >= self.max_in_flight:
            resp = self._busy()  # full: said before a byte of the body is read
        if resp is None:
            if not probe:
                self.taken += 1
                self.idle.clear()
            try:
                resp = await self._answer(request, route, probe)
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
            return unauthorized()
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            resp = error_response(415, f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed",
                                  {"Accept-Encoding": "identity"})
            resp.force_close()
            return resp
        return None

    # --- answering: through the fair scheduler ----------------------------------------------------------
    def _foreign(self, port: int) -> None:
        """Another process listens on the generation's internal port: nothing is sent to it."""
        self.metrics.count_untrusted("listener")
        if port not in self._foreign_ports:
            self._foreign_ports.add(port)
            self.log.error("a process that is not MOSEC's listens on the internal port %d: no request is sent"
                           " there (the generation cannot bind it and will be replaced)", port)

    def _dropped(self, unit: Unit) -> None:
        self.metrics.count_dropped(unit.lane, unit.pairs)

    @staticmethod
    def _alive(request: web.Request, deadline_at: float) -> bool:
        """Still worth scoring: the client is connected and the deadline has not passed."""
        transport = request.transport
        return (time.monotonic() < deadline_at and not request.get("dead")
                and transport is not None and not transport.is_closing())

    async def _upstream_by(self, deadline_at: float) -> Optional[Upstream]:
        """The current generation, waiting (until the deadline) while MOSEC is being restarted: a request
        that arrives during a restart is answered by the new generation instead of failing at once."""
        while True:
            up = self.upstream()
            if up is not None:
                return up
            if time.monotonic() + RESTART_POLL_S >= deadline_at or self.draining:
                return None
            await asyncio.sleep(RESTART_POLL_S)

    async def _send_group(self, units: list[Unit], envelope_id: int) -> list[tuple[int, bytes, str]]:
        """One envelope of ``units``: each unit's (status, answer, model). A unit whose body was quarantined is
        answered here, without being sent; the others go in the envelope."""
        parts, results = [], []
        for unit in units:
            buf, tag = self._body_of(unit)
            if unit.strikes or self.quarantine:
                unit.digest = hashlib.sha256(memoryview(buf)[PART_HEAD_LEN:]).digest()
                if self.quarantine.get(unit.digest, 0) > time.monotonic():
                    self.metrics.count_poisoned("quarantined")
                    results.append((500, QUARANTINED.encode(), ""))
                    continue
            parts.append((buf, tag))
            results.append(None)
        if parts:
            answers = iter(await self._post(parts, envelope_id, max(u.deadline_at for u in units)))
            results = [next(answers) if r is None else r for r in results]
        return results

    def _body_of(self, unit: Unit) -> tuple[bytearray, str]:
        """A unit's body behind room for its part head, and its route tag: a small request's body as read, a
        chunk's built now from its request (so only the chunks being sent exist at once)."""
        payload = unit.payload
        if isinstance(payload, _ChunkOf):
            return bytearray(PART_HEAD_LEN) + chunk_body(payload.job, payload.start, payload.end), CHUNK
        return payload

    async def _post(self, parts: list[tuple[bytearray, str]], envelope_id: int, deadline_at: float
                    ) -> list[tuple[int, bytes, str]]:
        """POST one envelope (each part: its body behind a part head's room, and its route) to the current
        generation, decided at each try (a reload or a restart may have replaced it); each part's status,
        answer and model, in order. A refused connection (nothing was sent) is tried again within the
        deadline; a connection cut mid-exchange (MOSEC died) at most ``CUT_RETRIES`` times: a generation that
        just died is replaced by the supervisor, and scoring is idempotent, but an envelope that takes every
        generation down with it must not go on doing so."""
        cuts = 0
        while True:
            up = await self._upstream_by(deadline_at)
            if up is None or self.client is None:
                raise UpstreamError("no MOSEC generation")
            try:
                return await self._post_to(up, parts, envelope_id, deadline_at)
            except Refused:
                # nothing listens: MOSEC is booting (its controller binds once its workers are ready) or being
                # restarted. Go on the moment the port listens, or ask for the current generation again.
                left = deadline_at - time.monotonic()
                if self.draining or left <= 0:
                    raise
                self.metrics.count_resend("connection")
                await self.client.wait_listening(up.port, min(PORT_WAIT_S, left), up.pid)
            except UpstreamError:
                # cut: MOSEC died mid-answer (or resets connections). Try again, pausing longer each time, a few
                # times within the deadline.
                cuts += 1
                pause = min(RETRY_PAUSE_S * cuts, RETRY_PAUSE_MAX_S)
                if self.draining or cuts > CUT_RETRIES or time.monotonic() + pause >= deadline_at:
                    raise
                self.metrics.count_resend("connection")
                await asyncio.sleep(pause)

    async def _post_to(self, up: Upstream, parts: list[tuple[bytearray, str]], envelope_id: int,
                       deadline_at: float) -> list[tuple[int, bytes, str]]:
        for buf, tag in parts:  # each body was read behind room for its head: no copy of a lone request
            buf[:PART_HEAD_LEN] = part_head(ROUTE_TAGS[tag], len(buf) - PART_HEAD_LEN)  # the same bytes each time
        bodies = [buf for buf, _tag in parts]
        payload = [seal(up.secret, envelope_id, bodies), *bodies]
        self.upstream_in_flight[up.generation] = self.upstream_in_flight.get(up.generation, 0) + 1
        try:
            # MOSEC's own timeout is above ours: only the gate's deadline fails a request, and it fails alone
            remaining = max(0.001, deadline_at - time.monotonic())
            status, data = await self.client.post(up.port, "/score", payload, remaining, up.pid)
        finally:
            left = self.upstream_in_flight.get(up.generation, 1) - 1
            if left:
                self.upstream_in_flight[up.generation] = left
            else:
                self.upstream_in_flight.pop(up.generation, None)
        if status != 200:
            return [(status, data, up.model_name)] * len(parts)  # MOSEC's own error: the whole envelope's
        try:
            answers = read_answers(open_answer(up.secret, envelope_id, data), len(parts))
        except Untrusted:
            self.metrics.count_untrusted("answer")
            self.log.error("an answer on MOSEC's port %d did not prove generation %d's secret: refused", up.port,
                           up.generation)
            return [(502, b"an answer from the model server could not be trusted", up.model_name)] * len(parts)
        except EnvelopeError as exc:
            self.log.error("an envelope's answer could not be read: %s", exc)
            return [(502, b"unreadable answer from the score worker", up.model_name)] * len(parts)
        return [(st, answer, up.model_name) for st, answer in answers]

    async def _wait_units(self, request: web.Request, units: list[Unit], deadline_at: float) -> list | web.Response:
        """Every unit's result, in order, or the answer to give when there is none: 504 past the deadline, 499
        when the client left, 503 when no generation answers, 500 for a unit that kills workers. Whichever way
        it ends without results, every unit of the request still queued is dropped at once."""
        futures = [self.scheduler.submit(u) for u in units]
        gathered = asyncio.gather(*(asyncio.shield(f) for f in futures))
        try:
            while True:
                left = deadline_at - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                done, _ = await asyncio.wait([gathered], timeout=min(left, GONE_CHECK_S))
                if done:
                    return gathered.result()
                if not self._alive(request, deadline_at):
                    raise Dropped()  # the client left while its units wait: not one more of them is scored
        except (asyncio.TimeoutError, Dropped) as failure:
            # A unit is Dropped, not sent, when its deadline passed or its client left while it queued. With the
            # loop busy past the deadline, that drop can land before the timer: still a 504.
            if isinstance(failure, Dropped) and time.monotonic() < deadline_at:
                return error_response(499, "the client went away before scoring")  # nobody reads this
            return self._past_deadline()
        except Poisoned:
            return self._poisoned(units)
        except UpstreamError:
            return unavailable()
        finally:
            if not gathered.done():
                gathered.cancel()
            if not all(f.done() for f in futures):
                request["dead"] = True  # what is still queued for it is dropped, nobody else's work is touched
                self.scheduler.cancel(id(request))
            elif gathered.done() and not gathered.cancelled():
                gathered.exception()  # retrieved
            done = time.monotonic()
            for u in units:
                if u.dispatched is not None:
                    self.metrics.observe_schedule(u.lane, u.dispatched - u.enqueued, done - u.dispatched)
        return gathered.result()

    def _poisoned(self, units: list[Unit]) -> web.Response:
        """A unit of this request was alone in its envelope when a worker died, after a worker had died with it
        before: its body is quarantined (an identical one is answered at once, without a worker), and the
        request is answered 500 now."""
        now = time.monotonic()
        for unit in units:
            if unit.future.done() and not unit.future.cancelled() and isinstance(unit.future.exception(), Poisoned):
                if unit.digest:
                    self.quarantine[unit.digest] = now + QUARANTINE_S
                    self.quarantine.move_to_end(unit.digest)
                    while len(self.quarantine) > QUARANTINE_SIZE:
                        self.quarantine.popitem(last=False)
                self.metrics.count_poisoned("worker_died")
                self.log.warning("a request killed a score worker twice, the second time alone: quarantined for"
                                 " %.0fs and answered 500", QUARANTINE_S)
        return error_response(500, POISONED)

    def _past_deadline(self) -> web.Response:
        return error_response(504, f"no answer within the deadline of {self.settings.request_timeout_s:g}s"
                                   " (RERANKER_REQUEST_TIMEOUT_S)")

    async def _answer(self, request: web.Request, route: str, probe: bool) -> web.StreamResponse:
        t_start = time.monotonic()
        deadline_at = t_start + self.settings.request_timeout_s
        if self.client is None:
            return error_response(503, "the model server is starting; retry shortly", {"Retry-After": "2"})
        body = await self._read_body(request, b"\0" * PART_HEAD_LEN)
        if isinstance(body, web.Response):
            return body
        refused = self._admit(request, probe)
        if refused is not None:
            return refused
        size = len(body) - PART_HEAD_LEN
        if size <= 64 and not bytes(body[PART_HEAD_LEN:]).strip():
            return error_response(400, "empty body: send a JSON request")
        split = self.settings.split_bytes
        if split and size > split:
            return await self._answer_split(request, route, body, deadline_at)
        cost = size
        if self._windows_asked(body):
            # windows multiply a request's work: its cost is counted from its parsed pairs (a small body: cheap)
            try:
                job = parse_job(route, memoryview(body)[PART_HEAD_LEN:], self.limits)
            except RequestError as exc:
                return error_response(exc.status, exc.message)
            cost = max(size, self._job_cost(job, 0, len(job.passages)))
        unit = Unit(cost=cost, lane="small", owner=id(request), payload=(body, route), deadline_at=deadline_at,
                    alive=lambda: self._alive(request, deadline_at))
        ticket = self.scheduler.enter_now(cost)
        if ticket is not None:  # a worker is free and nothing waits: sent now, in this task
            t_sent = time.monotonic()
            try:
                status, data, _model = await self.scheduler.send_now(unit, ticket)
            except asyncio.TimeoutError:
                return self._past_deadline()
            except Poisoned:
                unit.future.set_exception(Poisoned())
                return self._poisoned([unit])
            except UpstreamError:
                return unavailable()
            finally:
                self.metrics.observe_schedule("small", 0.0, time.monotonic() - t_sent)
        else:
            results = await self._wait_units(request, [unit], deadline_at)
            if isinstance(results, web.Response):
                return results
            status, data, _model = results[0]
        if status == 200:
            return web.Response(status=200, body=data, content_type=JSON)
        return self._upstream_error(status, data)

    def _windows_asked(self, body: bytearray) -> bool:
        return self.limits.default_windows > 1 or b'"windows"' in body

    def _job_cost(self, job: Job, start: int, end: int) -> int:
        """The work of pairs ``start:end`` of ``job`` in the scheduler's unit (characters of text), with each
        pair counted once per window it can take (see ``window_count``)."""
        up = self.upstream()
        window = up.max_length if up is not None and up.max_length else DEFAULT_WINDOW
        total = 0
        for q, p in zip(job.queries[start:end], job.passages[start:end]):
            n = 1 if job.windows <= 1 else window_count(len(q.encode("utf-8", "replace")),
                                                          len(p.encode("utf-8", "replace")), job.windows, window,
                                                          self.settings.window_stride)
            total += pair_chars(q, p, window) * n
        return total

    async def _answer_split(self, request: web.Request, route: str, body: bytearray, deadline_at: float
                            ) -> web.StreamResponse:
        """A large request: validated here (the same schema code as the score worker), scored in chunks
        that the scheduler interleaves with everyone else's work, merged in input order. A chunk's body is
        built when it is sent, from the one parsed request: the query is never copied once per chunk."""
        try:
            job = parse_job(route, memoryview(body)[PART_HEAD_LEN:], self.limits)
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        self._hold(request, job_bytes(job))  # what the gate holds now is the parsed request, not the body
        del body
        units = []
        up = self.upstream()
        window = up.max_length if up is not None and up.max_length else DEFAULT_WINDOW
        for start, end in plan_chunks(job, self.settings.chunk_chars, window=window):
            units.append(Unit(cost=self._job_cost(job, start, end), lane="chunk", owner=id(request),
                              pairs=end - start, payload=_ChunkOf(job, start, end), deadline_at=deadline_at,
                              alive=lambda: self._alive(request, deadline_at)))
        results = await self._wait_units(request, units, deadline_at)
        if isinstance(results, web.Response):
            return results
        logits: list[float] = []
        tokens = windows = 0
        model = ""
        for status, data, model in results:
            if status != 200:
                return self._upstream_error(status, data)
            part = json.loads(data)
            logits.extend(part["logits"])
            tokens += int(part["tokens"])
            windows += int(part["windows"])
        answer = build_response(job, logits, tokens, model, windows)
        return web.Response(status=200, body=json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode(),
                            content_type=JSON)

    def _upstream_error(self, status: int, data: bytes) -> web.Response:
        """The answer to a request that MOSEC or the score worker did not score. A score worker's own refusal
        (a ``Failed`` part, inside an answer sealed with the generation's secret) keeps its message; MOSEC's
        own error pages are mapped to the gate's messages, never passed on as they are."""
        deadline = self.settings.request_timeout_s
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


@dataclass(frozen=True)
class _ChunkOf:
    """A chunk of a parsed request, by reference: its body is built only when it is sent."""

    job: Job
    start: int
    end: int


def job_bytes(job: Job) -> int:
    """The memory a parsed request holds: its distinct strings (a query shared by every pair counts once)."""
    seen: set[int] = set()
    total = 0
    for text in (*job.queries, *job.passages):
        if id(text) not in seen:
            seen.add(id(text))
            total += sys.getsizeof(text)
    return total + 8 * (len(job.queries) + len(job.passages))


def window_count(query_bytes: int, passage_bytes: int, windows: int, max_length: int, stride: int) -> int:
    """At most how many windows of at most ``windows`` a pair can take, from its text's UTF-8 bytes: never fewer
    than the worker builds (``Tokenizer.window_plan``). A token is at least one byte (WordPiece, byte-level
    BPE), so the query's tokens are at most its bytes and the passage's room per window is at least
    ``max_length - query_bytes - 4`` (4 special tokens at most); the step between windows is the room less the
    stride, or half the room when the stride does not fit, and its least value over the rooms the query's
    real length allows bounds the count."""
    if windows <= 1:
        return 1
    room_hi = max_length - 2
    if room_hi <= 0:
        return 1
    room_lo = max(1, max_length - query_bytes - 4)  # where there is no room at all the pair is one window
    if room_lo <= stride + 1 <= room_hi:
        step = 1  # a room just above the stride: windows one token apart
    elif room_lo > stride:
        step = room_lo - stride
    else:  # every room possible is within the stride: it shrinks to half the room
        step = -(-room_lo // 2)
    return min(windows, 1 + -(-max(0, passage_bytes - room_lo) // step))

def pair_chars(query: str, passage: str, window: int = DEFAULT_WINDOW) -> int:
    """A pair's work in the scheduler's unit, characters of text: a query counts at most a model window's worth
    (a token is at least one character, and a pair is cut to the window), so a huge query does not make every
    pair a chunk of its own, each tokenizing the query again."""
    return min(len(query), window) + len(passage)


def plan_chunks(job: Job, chunk_chars: int, max_pairs: int = 64, window: int = DEFAULT_WINDOW) -> list[tuple[int, int]]:
    """Consecutive runs of pairs with at most ``chunk_chars`` characters of text (``pair_chars``; at least one
    pair each)."""
    out, start, size = [], 0, 0
    for i, (q, p) in enumerate(zip(job.queries, job.passages)):
        n = pair_chars(q, p, window)
        if i > start and (size + n > chunk_chars or i - start >= max_pairs):
            out.append((start, i))
            start, size = i, 0
        size += n
    if start < len(job.passages):
        out.append((start, len(job.passages)))
    return out
