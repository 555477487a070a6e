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
- every request that reaches MOSEC carries this instance's secret, which the score worker checks, so a
  request sent straight to MOSEC's internal port is refused;
- batching: the requests that wait for a free worker go to MOSEC together, as one envelope
  (``scheduler.py``, ``schema``'s envelope), and each gets its own answer and status back;
- JSON errors for every status (404 and 405 included), per-route metrics, and draining on stop.

The gate parses no JSON of a small request: the score worker validates it, and a request that fails its
checks comes back as ``Failed`` in its part of the envelope's answer, answered with its own status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Awaitable, Callable, Optional

import aiohttp
from aiohttp import web

from ..config import Settings
from ..metrics import Metrics
from .frontdoor import FrontDoor
from .scheduler import Dropped, FairScheduler, Unit
from .schema import (
    CHUNK,
    PART_HEAD_LEN,
    ROUTE_TAGS,
    ROUTES,
    EnvelopeError,
    Job,
    Limits,
    RequestError,
    build_response,
    parse_job,
    part_head,
    read_answers,
)
from .upstream import Refused, Upstream, UpstreamClient, UpstreamError

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
        self.in_flight = 0  # user requests admitted and not yet answered
        self.probes_in_flight = 0
        self.buffered = 0  # body bytes reserved by admitted requests
        self.upstream_in_flight: dict[int, int] = {}  # requests sent to each MOSEC generation, not answered
        self.max_in_flight = settings.effective_max_in_flight()
        self.scheduler = FairScheduler(settings.effective_schedule_budget(), self._send_group, slots=settings.workers,
                                       max_group=settings.max_batch_requests, linger_s=settings.batch_wait_ms / 1000,
                                       on_drop=self._dropped)
        self.limits = Limits(max_documents=settings.max_documents, max_document_chars=settings.max_document_chars,
                             windows=settings.windows, max_windows=settings.max_windows)
        self.idle = asyncio.Event()
        self.idle.set()
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._key = key.encode("utf-8") if key else b""

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, force_close=False),
            auto_decompress=False,
        )
        self.client = UpstreamClient()

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
        for method, path, handler in extra_routes:
            app.router.add_route(method, path, handler)
        return app

    def ops_routes(self, routes: list[Route]) -> list[Route]:
        """The health port's routes as the API port offers them (``api_port_ops``): as they are (open), only
        with the API key (key), or not at all, answered with a JSON 404 that names the health port (off).
        The health port itself always serves them, for probes and scrapers on the private network."""
        mode = self.settings.api_port_ops
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
        door = self.door
        if door is not None:  # the front door's sweeper enforces the body deadline (no task per request)
            door.reading(request.protocol, self.settings.body_timeout_s)
        try:
            async for chunk in request.content.iter_chunked(1 << 16):
                if len(buf) - start + len(chunk) > limit:
                    return error_response(413, too_large, {"Connection": "close"})
                buf.extend(chunk)
        except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError) as exc:
            # cut off by the body deadline (the door answered 408 and closed), or the client went away
            raise web.HTTPRequestTimeout(text="body deadline") from exc
        finally:
            if door is not None:
                door.read_done(request.protocol)
        return buf

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
            return unauthorized()
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            resp = error_response(415, f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed",
                                  {"Accept-Encoding": "identity"})
            resp.force_close()
            return resp
        return None

    # --- answering: through the fair scheduler ----------------------------------------------------------
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

    async def _send_group(self, units: list[Unit]) -> list[tuple[int, bytes, str]]:
        return await self._post([u.payload for u in units], max(u.deadline_at for u in units))

    async def _post(self, parts: list[tuple[bytearray, str]], deadline_at: float) -> list[tuple[int, bytes, str]]:
        """POST one envelope (each part: its body behind a part head's room, and its route) to the current
        generation, decided at each try (a reload or a restart may have replaced it); each part's status,
        answer and model, in order. A refused or broken connection is tried again within the deadline: a
        generation that just died is replaced by the supervisor, and scoring is idempotent."""
        tries = 0
        while True:
            up = await self._upstream_by(deadline_at)
            if up is None or self.client is None:
                raise UpstreamError("no MOSEC generation")
            try:
                return await self._post_to(up, parts, deadline_at)
            except Refused:
                # nothing listens: MOSEC is booting (its controller binds once its workers are ready) or being
                # restarted. Go on the moment the port listens, or ask for the current generation again.
                left = deadline_at - time.monotonic()
                if self.draining or left <= 0:
                    raise
                self.metrics.count_resend("connection")
                await self.client.wait_listening(up.port, min(PORT_WAIT_S, left))
            except UpstreamError:
                # cut: MOSEC died mid-answer (or resets connections). Try again, pausing longer each time,
                # until the deadline: the deadline is what the client agreed to wait.
                tries += 1
                pause = min(RETRY_PAUSE_S * tries, RETRY_PAUSE_MAX_S)
                if self.draining or time.monotonic() + pause >= deadline_at:
                    raise
                self.metrics.count_resend("connection")
                await asyncio.sleep(pause)

    async def _post_to(self, up: Upstream, parts: list[tuple[bytearray, str]], deadline_at: float
                       ) -> list[tuple[int, bytes, str]]:
        for buf, tag in parts:  # each body was read behind room for its head: no copy of a lone request
            buf[:PART_HEAD_LEN] = part_head(up.secret, ROUTE_TAGS[tag], len(buf) - PART_HEAD_LEN)
        payload = parts[0][0] if len(parts) == 1 else b"".join(buf for buf, _tag in parts)
        self.upstream_in_flight[up.generation] = self.upstream_in_flight.get(up.generation, 0) + 1
        try:
            # MOSEC's own timeout is above ours: only the gate's deadline fails a request, and it fails alone
            remaining = max(0.001, deadline_at - time.monotonic())
            status, data = await self.client.post(up.port, "/score", payload, remaining)
        finally:
            left = self.upstream_in_flight.get(up.generation, 1) - 1
            if left:
                self.upstream_in_flight[up.generation] = left
            else:
                self.upstream_in_flight.pop(up.generation, None)
        if status != 200:
            return [(status, data, up.model_name)] * len(parts)  # MOSEC's own error: the whole envelope's
        try:
            answers = read_answers(data, len(parts))  # a request that failed its checks fails alone
        except EnvelopeError as exc:
            self.log.error("an envelope's answer could not be read: %s", exc)
            return [(502, b"unreadable answer from the score worker", up.model_name)] * len(parts)
        return [(st, answer, up.model_name) for st, answer in answers]

    async def _wait_units(self, request: web.Request, units: list[Unit], deadline_at: float) -> list | web.Response:
        futures = [self.scheduler.submit(u) for u in units]
        try:
            results = await asyncio.wait_for(asyncio.gather(*(asyncio.shield(f) for f in futures)),
                                             timeout=max(0.001, deadline_at - time.monotonic()))
        except (asyncio.TimeoutError, Dropped) as failure:
            request["dead"] = True  # what is still queued for it is dropped, nobody else's work is touched
            # A unit is Dropped, not sent, when its deadline passed or its client left while it queued. With the
            # loop busy past the deadline, that drop can land before wait_for's own timer: still a 504.
            if isinstance(failure, Dropped) and time.monotonic() < deadline_at:
                return error_response(499, "the client went away before scoring")  # nobody reads this
            return self._past_deadline()
        except UpstreamError:
            request["dead"] = True
            return unavailable()
        finally:
            done = time.monotonic()
            for u in units:
                if u.dispatched is not None:
                    self.metrics.observe_schedule(u.lane, u.dispatched - u.enqueued, done - u.dispatched)
        return results

    def _past_deadline(self) -> web.Response:
        return error_response(504, f"no answer within the deadline of {self.settings.request_timeout_s:g}s"
                                   " (RERANKER_REQUEST_TIMEOUT_S)")

    async def _answer(self, request: web.Request, route: str) -> web.StreamResponse:
        t_start = time.monotonic()
        deadline_at = t_start + self.settings.request_timeout_s
        if self.client is None:
            return error_response(503, "the model server is starting; retry shortly", {"Retry-After": "2"})
        body = await self._read_body(request, b"\0" * PART_HEAD_LEN)
        if isinstance(body, web.Response):
            return body
        size = len(body) - PART_HEAD_LEN
        if size <= 64 and not bytes(body[PART_HEAD_LEN:]).strip():
            return error_response(400, "empty body: send a JSON request")
        split = self.settings.split_bytes
        if split and size > split:
            return await self._answer_split(request, route, bytes(body[PART_HEAD_LEN:]), deadline_at)
        unit = Unit(cost=size, lane="small", owner=id(request), payload=(body, route), deadline_at=deadline_at,
                    alive=lambda: self._alive(request, deadline_at))
        ticket = self.scheduler.enter_now(size)
        if ticket is not None:  # a worker is free and nothing waits: sent now, in this task
            t_sent = time.monotonic()
            try:
                status, data, _model = await self.scheduler.send_now(unit, ticket)
            except asyncio.TimeoutError:
                return self._past_deadline()
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

    async def _answer_split(self, request: web.Request, route: str, raw: bytes, deadline_at: float
                            ) -> web.StreamResponse:
        """A large request: validated here (the same schema code as the score worker), scored in chunks
        that the scheduler interleaves with everyone else's work, merged in input order."""
        try:
            job = parse_job(route, raw, self.limits)
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        units = []
        for start, end in plan_chunks(job, self.settings.chunk_chars):
            chunk = json.dumps({"q": job.queries[start:end], "p": job.passages[start:end],
                                "truncate": job.truncate, "windows": job.windows, "offset": start},
                               ensure_ascii=False).encode("utf-8")
            units.append(Unit(cost=len(chunk), lane="chunk", owner=id(request), pairs=end - start,
                              payload=(bytearray(PART_HEAD_LEN) + chunk, CHUNK), deadline_at=deadline_at,
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


def plan_chunks(job: Job, chunk_chars: int, max_pairs: int = 64) -> list[tuple[int, int]]:
    """Consecutive runs of pairs with at most ``chunk_chars`` characters of text (at least one pair each)."""
    out, start, size = [], 0, 0
    for i, (q, p) in enumerate(zip(job.queries, job.passages)):
        n = len(q) + len(p)
        if i > start and (size + n > chunk_chars or i - start >= max_pairs):
            out.append((start, i))
            start, size = i, 0
        size += n
    if start < len(job.passages):
        out.append((start, len(job.passages)))
    return out
