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
- a unit whose request is gone (its client disconnected, or its deadline passed) is dropped before it
  reaches MOSEC, and counted.

Costs are bytes of text (a proxy for tokens known before tokenizing): a small request's body length, a
chunk's JSON length.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional


class Dropped(Exception):
    """The unit was not sent: its request is gone."""


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


# Sends one envelope; answers one result per unit, in order (or raises: every unit of it fails with that).
SendGroup = Callable[[list[Unit]], Awaitable[list]]


@dataclass(frozen=True)
class Ticket:
    """A slot and a share of the budget taken by ``enter_now``, given back with ``leave``."""

    cost: int
    epoch: int


class FairScheduler:
    def __init__(self, budget: int, send: SendGroup, *, slots: int = 1, max_group: int = 32,
                 linger_s: float = 0.0, on_drop: Optional[Callable[[Unit], None]] = None) -> None:
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
        self._streak = {"small": 0, "chunk": 0}  # cost dispatched from a lane while the other waited
        self._want = 0  # small units expected back (see ``_lingering``) ...
        self._want_until = 0.0  # ... until then
        self._timer: Optional[asyncio.TimerHandle] = None

    def submit(self, unit: Unit) -> asyncio.Future:
        if unit.lane == "small":
            self.small.append(unit)
        else:
            self.chunks.setdefault(unit.owner, deque()).append(unit)
        self._pump()
        return unit.future

    def enter_now(self, cost: int) -> Optional[Ticket]:
        """The fast path: nothing is queued or expected back, a worker is free and the budget has room, so the
        caller sends an envelope of one at once (no unit, no task) and must ``leave`` with the ticket."""
        if (self.small or self.chunks or self.busy >= self.slots or self._lingering(time.monotonic(), arriving=1)
                or (self.outstanding and self.outstanding + cost > self.budget)):
            return None
        self.outstanding += cost
        self.busy += 1
        self._want = 0
        return Ticket(cost, self.epoch)

    def leave(self, ticket: Ticket, answered: bool) -> None:
        self._release(ticket.cost, ticket.epoch)
        if answered:
            self._answered(1)
        self._pump()

    def forgive(self) -> None:
        """A worker died: the envelopes it held may never be answered (MOSEC does not resend them), so no
        envelope out now holds a slot any more. They still end, by their answer or their deadline."""
        self.epoch += 1
        self.busy = 0
        self._pump()

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
            self._want_until = time.monotonic() + self.linger_s

    def _lingering(self, now: float, arriving: int = 0) -> bool:
        """Whether to wait for clients just answered: more small units are expected back than are queued
        (with the one ``arriving``), and the wait has not run out (the timer pumps again when it does)."""
        if self._want <= len(self.small) + arriving:
            return False
        if now >= self._want_until:
            self._want = 0
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._want_until, self._linger_over)
        return True

    def _linger_over(self) -> None:
        self._timer = None
        self._want = 0
        self._pump()

    def _peek(self) -> Optional[Unit]:
        has_small, has_chunk = bool(self.small), bool(self.chunks)
        if has_small and has_chunk:
            # small first, unless the chunks have waited through a whole budget of small work
            lane = "chunk" if self._streak["small"] >= self.budget else "small"
        else:
            lane = "small" if has_small else ("chunk" if has_chunk else "")
        if lane == "small":
            return self.small[0]
        if lane == "chunk":
            owner = next(iter(self.chunks))
            return self.chunks[owner][0]
        return None

    def _pop(self, unit: Unit) -> None:
        if unit.lane == "small":
            self.small.popleft()
            self._streak["small"] += unit.cost if self.chunks else 0
            self._streak["chunk"] = 0
        else:
            q = self.chunks.pop(unit.owner)
            q.popleft()
            if q:
                self.chunks[unit.owner] = q  # to the back: round-robin across large requests
            self._streak["small"] = 0

    def _drop(self, unit: Unit) -> None:
        self._pop(unit)
        if not unit.future.done():
            unit.future.set_exception(Dropped())
            unit.future.exception()  # retrieved: nobody may be waiting any more
        if self.on_drop is not None:
            self.on_drop(unit)

    def _take(self) -> list[Unit]:
        """The next envelope: units of one lane, in order, within the budget and an envelope's share of it."""
        group: list[Unit] = []
        cost = 0
        share = max(1, self.budget // self.slots)
        while len(group) < self.max_group:
            unit = self._peek()
            if unit is None or (group and unit.lane != group[0].lane):
                break
            if not unit.alive():
                self._drop(unit)
                continue
            out = self.outstanding + cost
            if (out and out + unit.cost > self.budget) or (group and cost + unit.cost > share):
                break
            self._pop(unit)
            group.append(unit)
            cost += unit.cost
        return group

    def _pump(self) -> None:
        while self.busy < self.slots and (self.small or self.chunks):
            if self._lingering(time.monotonic()):
                return
            group = self._take()
            if not group:
                return
            self._want = 0
            cost = sum(u.cost for u in group)
            self.outstanding += cost
            self.busy += 1
            now = time.monotonic()
            for unit in group:
                unit.dispatched = now
            asyncio.ensure_future(self._run(group, cost, self.epoch))

    async def _run(self, group: list[Unit], cost: int, epoch: int) -> None:
        ok = False
        try:
            results = await self.send(group)
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} results for an envelope of {len(group)}")
            ok = True
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the units
            for unit in group:
                if not unit.future.done():
                    unit.future.set_exception(exc)
                    unit.future.exception()
        else:
            for unit, result in zip(group, results):
                if not unit.future.done():
                    unit.future.set_result(result)
        finally:
            self._release(cost, epoch)
            if ok and group[0].lane == "small":
                self._answered(len(group))
            self._pump()
