"""Answering a request once the gate took it: the request path from the body to MOSEC and back.

The gate (``gate.py``) read the body and gave the request a place in flight; from here:

1. a small request is one unit of work; a large one is parsed here and split into chunks of the same query,
   each its own unit, whose bodies are built only when they are sent (``plan_chunks``, ``_ChunkOf``);
2. units go through the fair scheduler (``scheduler.py``), which sends them as envelopes, at most one out per
   worker: a lone request on a free worker goes at once, in its own task (the fast path);
3. each envelope is sealed with the current generation's secret and POSTed to MOSEC's port (``_post_to``,
   through ``upstream.py``, which first checks who listens there); a refused port is waited for, a cut
   connection retried a bounded number of times;
4. the sealed answer is opened, and each part's answer goes back to its request: a split request's chunks are
   merged in input order;
5. a worker that died took its envelope along: the supervisor says which (``worker_lost``), and its requests
   are sent again alone; one that kills a worker alone twice is answered 500 and its body quarantined.

Every failure on the way is answered with its own status (503, 504, 499, 500) and never fails a request that
was scored beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from aiohttp import web

from ..protocol.api import (CHUNK, ROUTE_TAGS, Job, Limits, RequestError, asks_for_windows, build_response,
                                chunk_body, parse_job)
from ..protocol.envelope import (NO_TIMING, PART_HEAD_LEN, EnvelopeError, Untrusted, open_answer,
                                 part_head, read_answers, seal)
from ..settings import Settings
from .metrics import Metrics
from .responses import JSON, error_response, timing_headers, unavailable
from .scheduler import Dropped, FairScheduler, Poisoned, Unit
from .upstream import Refused, Upstream, UpstreamClient, UpstreamError, listener_is_ours

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


Result = tuple  # (status, answer, model, Timing) of one unit


def _clean_mosec_message(text: str) -> str:
    # MOSEC prefixes the kind ("request validation error: ..."); the JSON 'error' field carries it instead.
    for prefix in ("request validation error: ", "bad request: ", "validation error: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


class Dispatch:
    """The request path after the gate: the scheduler, the client to MOSEC, the quarantine."""

    def __init__(self, settings: Settings, metrics: Metrics, log: logging.Logger,
                 upstream: Callable[[], Optional[Upstream]], limits: Limits) -> None:
        self.settings = settings
        self.metrics = metrics
        self.log = log
        self.upstream = upstream
        self.limits = limits
        self.client: Optional[UpstreamClient] = None
        self.draining = False
        self.upstream_in_flight: dict[int, int] = {}  # requests sent to each MOSEC generation, not answered
        self.scheduler = FairScheduler(settings.effective_schedule_budget(), self._send_group, slots=settings.workers,
                                       max_group=settings.max_batch_requests, linger_s=settings.batch_wait_ms / 1000,
                                       on_drop=self._dropped, quiet_s=settings.quiet_batch_ms / 1000)
        self.quarantine: OrderedDict[bytes, float] = OrderedDict()  # body digest -> monotonic time it ends
        self._foreign_ports: set[int] = set()

    async def start(self) -> None:
        self.client = UpstreamClient(verify=listener_is_ours, on_foreign=self._foreign)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def worker_lost(self, held: set[int]) -> tuple[int, int]:
        """Workers died scoring the envelopes ``held``: see ``FairScheduler.worker_lost``."""
        return self.scheduler.worker_lost(held)

    def forgive(self) -> int:
        """A worker died and which envelope it held is not known: see ``FairScheduler.forgive``."""
        return self.scheduler.forgive()

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


    async def _send_group(self, units: list[Unit], envelope_id: int) -> list[Result]:
        """One envelope of ``units``: each unit's (status, answer, model, timing). A unit whose body was
        quarantined is answered here, without being sent; the others go in the envelope."""
        parts, results = [], []
        for unit in units:
            buf, tag = self._body_of(unit)
            if unit.strikes or self.quarantine:
                unit.digest = hashlib.sha256(memoryview(buf)[PART_HEAD_LEN:]).digest()
                if self.quarantine.get(unit.digest, 0) > time.monotonic():
                    self.metrics.count_poisoned("quarantined")
                    results.append((500, QUARANTINED.encode(), "", NO_TIMING))
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
                    ) -> list[Result]:
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
                       deadline_at: float) -> list[Result]:
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
            return [(status, data, up.model_name, NO_TIMING)] * len(parts)  # MOSEC's own error: the envelope's
        try:
            answers = read_answers(open_answer(up.secret, envelope_id, data), len(parts))
        except Untrusted:
            self.metrics.count_untrusted("answer")
            self.log.error("an answer on MOSEC's port %d did not prove generation %d's secret: refused", up.port,
                           up.generation)
            return [(502, b"an answer from the model server could not be trusted", up.model_name,
                     NO_TIMING)] * len(parts)
        except EnvelopeError as exc:
            self.log.error("an envelope's answer could not be read: %s", exc)
            return [(502, b"unreadable answer from the score worker", up.model_name, NO_TIMING)] * len(parts)
        return [(st, answer, up.model_name, timing) for st, answer, timing in answers]


    async def _wait_units(self, request: web.Request, units: list[Unit], deadline_at: float) -> list | web.Response:
        """Every unit's result, in order, or the answer to give when there is none: 504 past the deadline, 499
        when the client left, 503 when no generation answers, 500 for a unit that kills workers. Whichever way
        it ends without results, every unit of the request still queued is dropped at once."""
        futures = self.scheduler.submit_all(units)  # together: a free worker gets all of them, not the first alone
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


    def _limits(self) -> Limits:
        """The limits a request is parsed with here: the served model's names are the current generation's."""
        up = self.upstream()
        if up is None or not up.model_name:
            return self.limits
        names = (up.model_name, *(a for a in self.settings.served_models if a != up.model_name))
        if self.limits.served_models != names:
            self.limits = dataclasses.replace(self.limits, served_models=names)
        return self.limits

    def _windows_asked(self, body: bytearray) -> bool:
        return self.limits.default_windows > 1 or asks_for_windows(body)


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


    async def _answer_split(self, request: web.Request, route: str, body: bytearray, deadline_at: float,
                            hold: Callable[[web.Request, int], None]) -> web.StreamResponse:
        """A large request: validated here (the same schema code as the score worker), scored in chunks
        that the scheduler interleaves with everyone else's work, merged in input order. A chunk's body is
        built when it is sent, from the one parsed request: the query is never copied once per chunk."""
        try:
            job = parse_job(route, memoryview(body)[PART_HEAD_LEN:], self._limits())
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        hold(request, job_bytes(job))  # what the gate holds now is the parsed request, not the body
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
        tokens = windows = truncated = 0
        model = ""
        timing = NO_TIMING
        for status, data, model, part_timing in results:
            if status != 200:
                return self._upstream_error(status, data)
            part = json.loads(data)
            logits.extend(part["logits"])
            tokens += int(part["tokens"])
            windows += int(part["windows"])
            truncated += int(part.get("truncated", 0))
            timing = timing + part_timing
        answer = build_response(job, logits, tokens, model, windows, truncated)
        first = min(units, key=lambda u: u.enqueued)
        queued = max((u.dispatched or 0.0) - u.enqueued for u in units)
        request["timing"] = timing
        request["queue"] = (first.enqueued, first.enqueued + max(0.0, queued))
        return web.Response(status=200, body=json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode(),
                            content_type=JSON, headers=timing_headers(request, timing, max(0.0, queued)))


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



    async def answer(self, request: web.Request, route: str, body: bytearray, deadline_at: float,
                     hold: Callable[[web.Request, int], None]) -> web.StreamResponse:
        """The answer to a request whose body (behind room for its part head) the gate has read and admitted;
        ``hold`` tells the gate how much memory the request holds once it is parsed."""
        if self.client is None:
            return error_response(503, "the model server is starting; retry shortly", {"Retry-After": "2"})
        size = len(body) - PART_HEAD_LEN
        if size <= 64 and not bytes(body[PART_HEAD_LEN:]).strip():
            return error_response(400, "empty body: send a JSON request")
        split = self.settings.split_bytes
        if split and size > split:
            return await self._answer_split(request, route, body, deadline_at, hold)
        cost = size
        if self._windows_asked(body):
            # windows multiply a request's work: its cost is counted from its parsed pairs (a small body: cheap)
            try:
                job = parse_job(route, memoryview(body)[PART_HEAD_LEN:], self._limits())
            except RequestError as exc:
                return error_response(exc.status, exc.message)
            cost = max(size, self._job_cost(job, 0, len(job.passages)))
        unit = Unit(cost=cost, lane="small", owner=id(request), payload=(body, route), deadline_at=deadline_at,
                    alive=lambda: self._alive(request, deadline_at), probe=bool(request.get("probe")))
        ticket = self.scheduler.enter_now(cost, probe=unit.probe)
        if ticket is not None:  # a worker is free and nothing waits: sent now, in this task
            t_sent = time.monotonic()
            try:
                status, data, _model, timing = await self.scheduler.send_now(unit, ticket)
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
            status, data, _model, timing = results[0]
        if status == 200:
            queued = 0.0 if unit.dispatched is None else max(0.0, unit.dispatched - unit.enqueued)
            request["timing"] = timing
            request["queue"] = (unit.enqueued, unit.enqueued + queued)
            return web.Response(status=200, body=data, content_type=JSON,
                                headers=timing_headers(request, timing, queued))
        return self._upstream_error(status, data)



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
