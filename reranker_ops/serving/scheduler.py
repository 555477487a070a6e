"""Fair scheduling in the gate: the unit of work is text to score, not a request.

MOSEC batches by request count, first in first out, and answers a batch only when all of it is scored, so a
short request queued behind (or batched with) a long one waits for all of it. The gate therefore keeps
MOSEC's queue short and decides the order itself:

- a small request is one **unit**; a large one is split (by the gate) into **chunks** of at most
  ``chunk_chars`` characters of text, each its own unit;
- at most ``budget`` characters of work are outstanding in MOSEC at once (one chunk per worker and a half),
  so whatever enters MOSEC is scored within about one chunk's time;
- the next unit comes from the small lane first, the chunks lane otherwise, round-robin across the large
  requests; a lane that waited while the other took a whole budget's worth goes next, so neither starves;
- a unit whose request is gone (its client disconnected, or its deadline passed) is dropped before it
  reaches MOSEC, and counted.

Costs are characters (a proxy for tokens known before tokenizing): a small request's body length, a chunk's
query and passage lengths.
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
    send: Callable[[], Awaitable[Any]]
    alive: Callable[[], bool]
    pairs: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    dispatched: Optional[float] = None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairScheduler:
    def __init__(self, budget: int, on_drop: Optional[Callable[[Unit], None]] = None) -> None:
        self.budget = max(1, budget)
        self.outstanding = 0
        self.small: deque[Unit] = deque()
        self.chunks: "OrderedDict[int, deque[Unit]]" = OrderedDict()
        self.on_drop = on_drop
        self._streak = {"small": 0, "chunk": 0}  # cost dispatched from a lane while the other waited

    def submit(self, unit: Unit) -> asyncio.Future:
        if unit.lane == "small":
            self.small.append(unit)
        else:
            self.chunks.setdefault(unit.owner, deque()).append(unit)
        self._pump()
        return unit.future

    def enter_now(self, cost: int) -> bool:
        """The fast path: nothing is queued and the budget has room, so the caller sends at once (no unit,
        no task) and must call ``leave(cost)`` when its answer is in."""
        if self.small or self.chunks or (self.outstanding and self.outstanding + cost > self.budget):
            return False
        self.outstanding += cost
        return True

    def leave(self, cost: int) -> None:
        self.outstanding -= cost
        self._pump()

    @property
    def queued(self) -> int:
        return len(self.small) + sum(len(q) for q in self.chunks.values())

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

    def _pump(self) -> None:
        while True:
            unit = self._peek()
            if unit is None:
                return
            if not unit.alive():
                self._pop(unit)
                if not unit.future.done():
                    unit.future.set_exception(Dropped())
                    unit.future.exception()  # retrieved: nobody may be waiting any more
                if self.on_drop is not None:
                    self.on_drop(unit)
                continue
            if self.outstanding and self.outstanding + unit.cost > self.budget:
                return
            self._pop(unit)
            self.outstanding += unit.cost
            unit.dispatched = time.monotonic()
            asyncio.ensure_future(self._run(unit))

    async def _run(self, unit: Unit) -> None:
        try:
            result = await unit.send()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the unit
            if not unit.future.done():
                unit.future.set_exception(exc)
                unit.future.exception()
        else:
            if not unit.future.done():
                unit.future.set_result(result)
        finally:
            self.outstanding -= unit.cost
            self._pump()
