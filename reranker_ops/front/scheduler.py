"""Fair scheduling and batching in the gate: the unit of work is text to score, not a request.

MOSEC hands each worker one request at a time (its batcher is off), and the gate sends it envelopes: the
units that waited for a free worker, together (``schema``'s envelope). So the gate decides both the order
and the batches:

- a small request is one **unit**; a large one is split (by the gate) into **chunks** of at most
  ``chunk_chars`` characters of text, each its own unit;
- at most ``slots`` envelopes are out at once (one per worker), and at most ``budget`` of work in all,
  at most its share of it (``budget / slots``) in one envelope, so whatever enters MOSEC is scored within
  about one chunk's time; up to ``max_group`` units go in one envelope, all of one lane, so a short request
  is never answered only when a chunk batched with it is;
- the next units come from the small lane first, the chunks lane otherwise, round-robin across the large
  requests; a lane that waited while the other took a whole budget's worth goes next, so neither starves;
- when a worker frees up with fewer small units waiting than it just answered, the gate waits up to
  ``linger_s`` for those clients to come back, so closed-loop clients are batched together instead of
  splitting into a group of one and a group of the rest that take turns;
- a request's chunks enter the queue together (``submit_all``): a free worker is never sent a request's first
  chunk alone while its other chunks are still being queued (each went in with a ``submit`` of its own, and
  the first one took the free worker);
- when no small request has come for ``quiet_s`` and none waits, an envelope of chunks may hold up to
  ``quiet_s`` of work at the speed the workers were measured at (cost answered per second of an envelope's
  round trip) instead of its share of the budget: splitting a large request buys fairness only when someone
  waits behind it, and on fast silicon (bf16, INT8, AMX) whole RAG requests scored together pack their pairs
  into fuller, less padded calls than one request's chunks (benchmarks/HISTORY.md, issue 36). A short request
  that comes then waits for at most ``quiet_s`` of work, never more than the budget's own share takes on the
  slowest precision (the share is the floor: nothing grows where the budget already takes longer);
- a unit whose request is gone (its client disconnected, or its deadline passed) is dropped before it
  reaches MOSEC, and counted;
- MOSEC never answers the envelope of a worker that died. A worker names the envelope it is scoring in its
  heartbeat, so when the supervisor sees a worker gone it says which envelope was lost (``worker_lost``): that
  envelope's units are sent again each in an envelope of its own, and a unit that was alone in an envelope
  on a worker that died before (``POISON_STRIKES``) is answered ``Poisoned`` and never sent again, so one
  request that crashes a worker costs at most two worker deaths and fails alone. When the dead worker's
  heartbeat names nothing (``forgive``), every envelope out is sent again (scoring is idempotent), and each
  answers its units with whichever copy answers first.

Costs are bytes of text (a proxy for tokens known before tokenizing): a small request's body length, a
chunk's JSON length.
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional


class Dropped(Exception):
    """The unit was not sent: its request is gone."""


class Poisoned(Exception):
    """The unit was being scored, alone in its envelope, when a worker died, after a worker had already died
    with it once: it is not sent again."""


class _Split(Exception):
    """The envelope was lost with a worker; its units went back to the queue, each to be sent alone."""


@dataclass
class Unit:
    cost: int
    lane: str  # "small" or "chunk"
    owner: int  # the request it belongs to (round-robin key)
    payload: Any  # what the send function makes of it (the gate: the body behind its part head, and the tag)
    alive: Callable[[], bool]
    deadline_at: float = float("inf")  # the envelope is sent with the latest deadline of its units
    pairs: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    dispatched: Optional[float] = None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    strikes: int = 0  # worker deaths it was in an envelope of
    alone: bool = False  # sent in an envelope of its own from now on (a worker died with it)
    digest: bytes = b""  # its body's, once it had a strike (or bodies are quarantined): see the gate
    probe: bool = False  # the watchdog's canary: no client waits behind it, so it never keeps envelopes small


# Sends one envelope (its units and its id); answers one result per unit, in order (or raises: every unit of it
# fails with that).
SendGroup = Callable[[list[Unit], int], Awaitable[list]]
MAX_RESENDS = 2  # copies of one envelope sent after workers died (whose envelope was not known), beyond the first
POISON_STRIKES = 2  # a unit alone in an envelope when a worker dies, with this many deaths, is not sent again


def _envelope_id() -> int:
    return secrets.randbits(63) or 1  # 0 means "no envelope" in a heartbeat


class _Envelope:
    """An envelope out: its units, the slot it holds (its epoch), and the copies of it being sent."""

    def __init__(self, group: list[Unit], cost: int, epoch: int) -> None:
        self.id = _envelope_id()
        self.group = group
        self.cost = cost
        self.epoch = epoch
        self.copies: list[asyncio.Future] = []
        self.running = 0  # copies sent and not ended
        self.resent = 0
        # Its results, from the first copy that answers, or why there are none: the last failure once every
        # copy failed, lost with its worker (``_Split``), ``Poisoned``. The one thing its waiter awaits: the copy
        # that answers wakes it directly (asyncio.wait over the copies cost a turn of the loop more and ~6 us of
        # bookkeeping an envelope, a lone request's included). Set as the answer is read, it also tells a worker
        # death reported just after that this envelope was answered, not lost.
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    def end(self, exc: BaseException) -> None:
        """No results: ``exc`` says why (unless a copy answered first)."""
        if not self.outcome.done():
            self.outcome.set_exception(exc)
            self.outcome.exception()  # retrieved: its waiter may have gone


@dataclass(frozen=True)
class Ticket:
    """A slot and a share of the budget taken by ``enter_now``, given back with ``leave``."""

    cost: int
    epoch: int


class LoopClock:
    """What the scheduler waits with: the event loop's monotonic clock and its timers (tests give a fake one
    they move by hand)."""

    @staticmethod
    def now() -> float:
        return time.monotonic()  # what the default event loop's time() is

    @staticmethod
    def call_at(when: float, callback: Callable[[], None]) -> Any:
        return asyncio.get_running_loop().call_at(when, callback)


class FairScheduler:
    def __init__(self, budget: int, send: SendGroup, *, slots: int = 1, max_group: int = 32,
                 linger_s: float = 0.0, on_drop: Optional[Callable[[Unit], None]] = None,
                 clock: Any = LoopClock, quiet_s: float = 0.0) -> None:
        self.clock = clock
        self.budget = max(1, budget)
        self.send = send
        self.slots = max(1, slots)
        self.max_group = max(1, max_group)
        self.linger_s = max(0.0, linger_s)
        self.on_drop = on_drop
        self.outstanding = 0  # cost sent and not answered
        self.busy = 0  # envelopes out that hold a slot
        self.epoch = 0  # envelopes of an older epoch hold no slot (``forgive``)
        self.small: deque[Unit] = deque()
        self.chunks: "OrderedDict[int, deque[Unit]]" = OrderedDict()
        self._small_streak = 0  # cost of small units dispatched while chunks waited (since the last chunk)
        self._want = 0  # small units expected back (see ``_lingering``) ...
        self._want_until = 0.0  # ... until then
        self._timer: Any = None  # the clock's timer handle, while a linger is timed
        self._out: dict[_Envelope, None] = {}  # the envelopes out, in the order sent
        self.quiet_s = max(0.0, quiet_s)
        self._small_at = float("-inf")  # when the last small unit came
        self.speed = 0.0  # cost a worker answers per second, from chunk envelopes' round trips (0: not yet known)

    def submit(self, unit: Unit) -> asyncio.Future:
        return self.submit_all([unit])[0]

    def submit_all(self, units: list[Unit]) -> list[asyncio.Future]:
        """Queue ``units`` (one request's: its small unit, or all its chunks), then form envelopes once."""
        for unit in units:
            if unit.lane == "small":
                if not unit.probe:
                    self._small_at = self.clock.now()
                self.small.append(unit)
            else:
                self.chunks.setdefault(unit.owner, deque()).append(unit)
        self._pump()
        return [unit.future for unit in units]

    def enter_now(self, cost: int, probe: bool = False) -> Optional[Ticket]:
        """The fast path: nothing is queued or expected back, a worker is free and the budget has room, so the
        caller sends an envelope of one at once, in its own task (``send_now``)."""
        if (self.small or self.chunks or self.busy >= self.slots or self._lingering(self.clock.now(), arriving=1)
                or (self.outstanding and self.outstanding + cost > self.budget)):
            return None
        if not probe:
            self._small_at = self.clock.now()  # only small requests take the fast path
        self.outstanding += cost
        self.busy += 1
        self._want = 0
        return Ticket(cost, self.epoch)

    async def send_now(self, unit: Unit, ticket: Ticket) -> Any:
        """The fast path's envelope of one, with the slot ``enter_now`` took: its result, or it raises. It is
        sent again like any other if a worker dies while it is out."""
        unit.dispatched = self.clock.now()
        return (await self._settle(self._launch([unit], ticket.cost, ticket.epoch)))[0]

    def forgive(self) -> int:
        """A worker died and which envelope it held is not known (its heartbeat named none): that envelope will
        never be answered (MOSEC does not resend it). So every envelope out is sent again, once more per
        death (at most ``MAX_RESENDS``), and holds one slot from now on whichever copy answers; the envelopes of
        the fast path, not known here, stop holding theirs (they still end, by their answer or their deadline).
        Returns how many envelopes were sent again."""
        self.epoch += 1
        self.busy = 0
        resent = 0
        for env in list(self._out):
            if env.resent >= MAX_RESENDS or env.outcome.done():
                continue  # it holds no slot any more (it ends by an answer or its deadline), or it was answered
            env.resent += 1
            resent += 1
            env.epoch = self.epoch
            self.busy += 1
            self._copy(env)
        self._pump()
        return resent

    def worker_lost(self, held: set[int]) -> tuple[int, int]:
        """Workers died scoring the envelopes ``held`` (their ids, from the dead workers' heartbeats). Each
        such envelope's units are suspects: one of them may be what killed the worker. An envelope of several
        is taken apart: its units go back to the front of the queue, each to be sent alone. An envelope of
        one is sent again, unless its unit already was in an envelope when a worker died: then it is answered
        ``Poisoned`` and never sent again. The other envelopes out were not on those workers and go on.
        Returns (units queued again or sent again, units poisoned)."""
        again = poisoned = 0
        # an envelope whose outcome is in was answered (or already taken apart, or poisoned): not lost
        for env in [e for e in self._out if e.id in held and not e.outcome.done()]:
            for unit in env.group:
                unit.strikes += 1
            if len(env.group) > 1:
                for unit in reversed(env.group):
                    unit.alone = True
                    self._requeue(unit)
                env.end(_Split())  # its units were queued again, each alone: their futures wait for that
                again += len(env.group)
            elif env.group[0].strikes >= POISON_STRIKES:
                env.end(Poisoned())
                poisoned += 1
            else:
                self._copy(env)  # it keeps its slot: the copy takes the worker MOSEC puts in the dead one's place
                again += 1
        self._pump()
        return again, poisoned

    def cancel(self, owner: int) -> int:
        """Drop every queued unit of request ``owner`` at once (its deadline passed or its client left);
        returns how many. What is already out ends by its answer, unread."""
        dropped = [u for u in self.small if u.owner == owner]
        if dropped:
            self.small = deque(u for u in self.small if u.owner != owner)
        dropped += self.chunks.pop(owner, ())
        for unit in dropped:
            self._fail(unit, Dropped())
        if dropped:
            self._pump()  # the lingering wait may have counted on them
        return len(dropped)

    def _copy(self, env: _Envelope) -> None:
        env.running += 1
        env.copies.append(asyncio.ensure_future(self._send_copy(env)))

    async def _send_copy(self, env: _Envelope) -> None:
        """One copy of ``env`` sent; its answer is the envelope's if it is the first, its failure if every copy
        failed (this one last)."""
        try:
            results = await self.send(env.group, env.id)
        except asyncio.CancelledError:
            env.running -= 1
            if not env.running and not env.outcome.done():
                env.outcome.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the envelope's waiter
            env.running -= 1
            if not env.running:
                env.end(exc)
            return
        env.running -= 1
        if not env.outcome.done():
            env.outcome.set_result(results)

    def _requeue(self, unit: Unit) -> None:
        """Back to the front of its lane (the work is older than anything queued)."""
        unit.dispatched = None
        if unit.lane == "small":
            self.small.appendleft(unit)
        else:
            self.chunks.setdefault(unit.owner, deque()).appendleft(unit)
            self.chunks.move_to_end(unit.owner, last=False)

    @property
    def queued(self) -> int:
        return len(self.small) + sum(len(q) for q in self.chunks.values())

    def _release(self, cost: int, epoch: int) -> None:
        self.outstanding -= cost
        if epoch == self.epoch:
            self.busy -= 1

    def _answered(self, n: int) -> None:
        """An envelope of ``n`` small units was answered: its clients (and those queued) are expected next."""
        if self.linger_s:
            self._want = min(self.max_group, len(self.small) + n)
            self._want_until = self.clock.now() + self.linger_s

    def _lingering(self, now: float, arriving: int = 0) -> bool:
        """Whether to wait for clients just answered: more small units are expected back than are queued
        (with the one ``arriving``), and the wait has not run out (the timer pumps again when it does)."""
        if self._want <= len(self.small) + arriving:
            return False
        if now >= self._want_until:
            self._want = 0
            return False
        if self._timer is None:
            self._timer = self.clock.call_at(self._want_until, self._linger_over)
        return True

    def _linger_over(self) -> None:
        # the wait it was set for may have been replaced by a later one since: _lingering judges, again
        self._timer = None
        self._pump()

    def _turn(self) -> str:
        """The lane the next envelope takes from ("" when nothing waits): small first, unless the chunks have
        waited through a whole budget of small work."""
        if self.small and self.chunks:
            return "chunk" if self._small_streak >= self.budget else "small"
        return "small" if self.small else ("chunk" if self.chunks else "")

    def _head(self, lane: str) -> Optional[Unit]:
        """The next unit of ``lane`` (of the chunks, the first large request's in the round-robin)."""
        if lane == "small":
            return self.small[0] if self.small else None
        if lane == "chunk" and self.chunks:
            return self.chunks[next(iter(self.chunks))][0]
        return None

    def _pop(self, unit: Unit) -> None:
        if unit.lane == "small":
            self.small.popleft()
            self._small_streak += unit.cost if self.chunks else 0
        else:
            q = self.chunks.pop(unit.owner)
            q.popleft()
            if q:
                self.chunks[unit.owner] = q  # to the back: round-robin across large requests
            self._small_streak = 0

    def _drop(self, unit: Unit) -> None:
        self._pop(unit)
        self._fail(unit, Dropped())

    def _fail(self, unit: Unit, exc: Exception) -> None:
        if not unit.future.done():
            unit.future.set_exception(exc)
            unit.future.exception()  # retrieved: nobody may be waiting any more
        if isinstance(exc, Dropped) and self.on_drop is not None:
            self.on_drop(unit)

    @property
    def share(self) -> int:
        """What one envelope may hold: its worker's share of the budget."""
        return max(1, self.budget // self.slots)

    def grown_share(self) -> int:
        """What one envelope of chunks may hold now: ``quiet_s`` of work at the measured speed while no small
        request is waiting or has come within ``quiet_s``; else (or below it) its share of the budget."""
        share = self.share
        if (not self.quiet_s or not self.speed or self.small
                or self.clock.now() - self._small_at < self.quiet_s):
            return share
        return max(share, int(self.speed * self.quiet_s))

    def _learn_speed(self, env: _Envelope, answered_at: float) -> None:
        """Cost per second of a chunk envelope's round trip, smoothed (the speed ``grown_share`` converts time
        with). Envelopes of chunks only: their cost is text the worker scores, and they are long enough for a
        round trip's fixed part not to dominate."""
        started = env.group[0].dispatched
        if started is None or answered_at <= started or env.resent:
            return
        speed = env.cost / (answered_at - started)
        self.speed = speed if not self.speed else 0.7 * self.speed + 0.3 * speed

    def _take(self) -> list[Unit]:
        """The next envelope: units of one lane, in order, within the budget and an envelope's share of it
        (grown while nobody small is around: ``grown_share``)."""
        group: list[Unit] = []
        cost = 0
        lane = self._turn()
        share = self.grown_share() if lane == "chunk" else self.share
        budget = max(self.budget, share * self.slots)
        while len(group) < self.max_group:
            # the lane the envelope began with, to its end: taking the first chunk ends the small lane's streak,
            # and asking whose turn it is after that gave the turn back to small requests waiting, so an
            # envelope of chunks held one chunk beside them (long requests kept 0.28 of their speed at INT8)
            unit = self._head(lane)
            if unit is None or (group and (unit.alone or group[0].alone)):
                break
            if not unit.alive():
                self._drop(unit)
                continue
            out = self.outstanding + cost
            if (out and out + unit.cost > budget) or (group and cost + unit.cost > share):
                break
            self._pop(unit)
            group.append(unit)
            cost += unit.cost
        return group

    def _pump(self) -> None:
        while self.busy < self.slots and (self.small or self.chunks):
            if self._lingering(self.clock.now()):
                return
            group = self._take()
            if not group:
                return
            self._want = 0
            cost = sum(u.cost for u in group)
            self.outstanding += cost
            self.busy += 1
            now = self.clock.now()
            for unit in group:
                unit.dispatched = now
            # in a context of its own: an envelope is nobody's request, and its log lines must not carry the
            # request id of whichever request happened to pump (observe.py)
            contextvars.Context().run(self._start, group, cost, self.epoch)

    def _start(self, group: list[Unit], cost: int, epoch: int) -> None:
        asyncio.ensure_future(self._run(self._launch(group, cost, epoch)))

    def _launch(self, group: list[Unit], cost: int, epoch: int) -> _Envelope:
        env = _Envelope(group, cost, epoch)
        self._copy(env)
        self._out[env] = None
        return env

    async def _settle(self, env: _Envelope) -> list:
        """The envelope's results, once one copy answered; then its slot and budget are given back."""
        ok = False
        try:
            results = await env.outcome  # the first copy's answer; if every copy fails, the last failure
            if len(results) != len(env.group):
                raise RuntimeError(f"{len(results)} results for an envelope of {len(env.group)}")
            ok = True
            if env.group[0].lane == "chunk":
                self._learn_speed(env, self.clock.now())
            return results
        finally:
            self._out.pop(env, None)
            for copy in env.copies:
                if not copy.done():
                    copy.cancel()  # the answer is in (or nobody waits): a copy still out is not waited for
            self._release(env.cost, env.epoch)
            if ok and env.group[0].lane == "small":
                self._answered(len(env.group))
            self._pump()

    async def _run(self, env: _Envelope) -> None:
        try:
            results = await self._settle(env)
        except _Split:
            return  # its units are queued again, each to be sent alone: their futures wait for that
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the units
            for unit in env.group:
                if not unit.future.done():
                    unit.future.set_exception(exc)
                    unit.future.exception()
        else:
            for unit, result in zip(env.group, results):
                if not unit.future.done():
                    unit.future.set_result(result)
