"""The gate's scheduler forms the envelopes MOSEC's workers get: on a real event loop, with a send function
that stands for the worker (it holds each envelope until the test lets it go) and a clock the test moves by
hand (no test here waits for real time to pass)."""

from __future__ import annotations

import asyncio
import heapq
import itertools

import pytest

from reranker_ops.front.scheduler import (
    MAX_RESENDS,
    POISON_STRIKES,
    Dropped,
    FairScheduler,
    Poisoned,
    Unit,
)

pytestmark = pytest.mark.timeout(30)


class Worker:
    """Records each envelope it is sent and answers it when released (or fails it)."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.ids: list[int] = []  # each envelope's id, as the worker writes it in its heartbeat
        self.gates: list[asyncio.Future] = []
        self.cancelled: list[int] = []  # envelopes whose sender stopped waiting

    async def send(self, group: list[Unit], envelope_id: int) -> list:
        self.groups.append([u.payload for u in group])
        self.ids.append(envelope_id)
        gate = asyncio.get_running_loop().create_future()
        index = len(self.gates)
        self.gates.append(gate)
        try:
            failure = await gate
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        if failure is not None:
            raise failure
        return [f"answer {u.payload}" for u in group]

    def release(self, i: int, failure: Exception | None = None) -> None:
        self.gates[i].set_result(failure)

    async def sent(self, n: int) -> None:
        for _ in range(1000):  # bounded: the loop runs the scheduler's tasks in between
            if len(self.groups) >= n:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"{len(self.groups)} envelopes sent, expected {n}: {self.groups}")


async def settle() -> None:
    """Let every task that can run, run (nothing here waits on time): what has not happened by then, won't."""
    for _ in range(50):
        await asyncio.sleep(0)


class FakeClock:
    """The scheduler's clock and timers, moved by the test: ``advance`` fires the timers that fall due."""

    class Handle:
        def __init__(self) -> None:
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self) -> None:
        self.t = 1000.0
        self._timers: list = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.t

    def call_at(self, when: float, callback) -> "FakeClock.Handle":
        handle = FakeClock.Handle()
        heapq.heappush(self._timers, (when, next(self._order), handle, callback))
        return handle

    async def advance(self, seconds: float) -> None:
        self.t += seconds
        while self._timers and self._timers[0][0] <= self.t:
            _when, _n, handle, callback = heapq.heappop(self._timers)
            if not handle.cancelled:
                callback()
        await settle()


def worker_and_scheduler(budget: int = 10_000, **kw) -> tuple[Worker, FairScheduler]:
    w = Worker()
    return w, FairScheduler(budget, w.send, **kw)


def unit(name: str, lane: str = "small", cost: int = 10, owner: int = 0, alive=lambda: True) -> Unit:
    return Unit(cost=cost, lane=lane, owner=owner, payload=name, alive=alive)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_what_waits_for_a_busy_worker_goes_in_one_envelope():
    async def main():
        w, s = worker_and_scheduler(slots=1, max_group=4)
        first = s.submit(unit("a"))
        await w.sent(1)
        rest = [s.submit(unit(n)) for n in "bcdef"]
        assert len(w.groups) == 1  # the worker is busy: they wait
        w.release(0)
        assert await first == "answer a"
        await w.sent(2)
        assert w.groups == [["a"], ["b", "c", "d", "e"]]  # at most max_group, in order
        w.release(1)
        await w.sent(3)
        assert w.groups[2] == ["f"]
        w.release(2)
        assert [await f for f in rest] == [f"answer {n}" for n in "bcdef"]
        assert s.busy == 0 and s.outstanding == 0
    run(main())


def test_two_workers_get_an_envelope_each_and_lanes_never_share_one():
    async def main():
        w, s = worker_and_scheduler(slots=2)
        s.submit(unit("a"))
        s.submit(unit("b"))
        await w.sent(2)
        assert w.groups == [["a"], ["b"]]  # both workers busy
        futures = [s.submit(unit("c1", lane="chunk", owner=1)), s.submit(unit("s1")), s.submit(unit("s2")),
                   s.submit(unit("c2", lane="chunk", owner=2))]
        w.release(0)
        await w.sent(3)
        assert w.groups[2] == ["s1", "s2"]  # small first, without the chunks
        w.release(1)
        await w.sent(4)
        assert w.groups[3] == ["c1", "c2"]
        w.release(2)
        w.release(3)
        await asyncio.gather(*futures)
    run(main())


def test_an_envelope_holds_at_most_its_workers_share_of_the_budget():
    async def main():
        w = Worker()
        s = FairScheduler(300, w.send, slots=2)  # a share of 150
        futures = [s.submit(unit(f"c{i}", lane="chunk", cost=100, owner=i)) for i in range(3)]
        await w.sent(2)
        assert w.groups == [["c0"], ["c1"]]  # one 100-cost chunk an envelope; the third waits for the budget
        w.release(0)
        await w.sent(3)
        assert w.groups[2] == ["c2"]
        w.release(1)
        w.release(2)
        await asyncio.gather(*futures)
    run(main())


def test_when_the_chunks_turn_comes_their_envelope_holds_its_whole_share():
    """Small requests go first until they took a budget's worth while chunks waited; then the chunks' envelope
    is a whole share of them, not one chunk (taking the first chunk ends the small lane's streak, which must not
    hand the rest of the envelope back to the small lane)."""
    async def main():
        w, s = worker_and_scheduler(300, slots=1)
        busy = s.submit(unit("x"))
        await w.sent(1)
        chunks = [s.submit(unit(f"c{i}", lane="chunk", cost=100, owner=1)) for i in range(6)]
        smalls = [s.submit(unit(f"s{i}", owner=2 + i)) for i in range(40)]
        w.release(0)
        await busy
        await w.sent(2)
        assert w.groups[1] == [f"s{i}" for i in range(30)]  # a share of small requests: the budget's worth
        w.release(1)
        await w.sent(3)
        assert w.groups[2] == ["c0", "c1", "c2"]  # the chunks' turn: a whole share of them
        w.release(2)
        await w.sent(4)
        assert w.groups[3] == [f"s{i}" for i in range(30, 40)]  # then the small ones again
        w.release(3)
        await w.sent(5)
        assert w.groups[4] == ["c3", "c4", "c5"]
        w.release(4)
        await asyncio.gather(*chunks, *smalls)
    run(main())


def test_a_large_requests_chunks_reach_a_free_worker_together():
    """Each chunk used to be queued with a submit of its own, and the first took the free worker: an envelope of
    one chunk, then one of the rest. ``submit_all`` queues them all, then forms the envelope (within its share,
    in order); the dispatcher queues a request's chunks with it."""
    async def main():
        w, s = worker_and_scheduler(slots=1, max_group=8)
        futures = s.submit_all([unit(f"a{i}", lane="chunk", cost=100, owner=1) for i in range(5)])
        await w.sent(1)
        assert w.groups == [["a0", "a1", "a2", "a3", "a4"]]
        w.release(0)
        assert [await f for f in futures] == [f"answer a{i}" for i in range(5)]
        # bounded as before: max_group, then the budget's share
        w2, s2 = worker_and_scheduler(250, slots=1, max_group=8)
        futures = s2.submit_all([unit(f"b{i}", lane="chunk", cost=100, owner=2) for i in range(5)])
        await w2.sent(1)
        assert w2.groups == [["b0", "b1"]]
        for i in range(2):
            w2.release(i)
            await w2.sent(i + 2)
        w2.release(2)
        assert [await f for f in futures] == [f"answer b{i}" for i in range(5)]
        assert w2.groups == [["b0", "b1"], ["b2", "b3"], ["b4"]]
    run(main())


def test_the_clients_just_answered_are_waited_for_within_the_linger():
    async def main():
        clock = FakeClock()
        w, s = worker_and_scheduler(slots=1, linger_s=0.2, clock=clock)
        futures = [s.submit(unit(n)) for n in "abc"]
        await w.sent(1)
        assert w.groups == [["a"]]
        w.release(0)  # one answered and two queued: its client is expected back too, for the linger
        await settle()
        assert len(w.groups) == 1
        await clock.advance(0.2)
        await w.sent(2)
        assert w.groups[1] == ["b", "c"]
        w.release(1)
        await asyncio.gather(*futures)
        # two were answered together: the first to come back waits for the second (not sent alone)
        first = s.submit(unit("b2"))
        assert s.enter_now(10) is None  # nor does a request take the fast path past them
        await clock.advance(0.1)  # within the linger
        assert len(w.groups) == 2
        second = s.submit(unit("c2"))
        await w.sent(3)
        assert w.groups[2] == ["b2", "c2"]
        w.release(2)
        await asyncio.gather(first, second)
        # only one of the two comes back: it is sent when the linger runs out, not before, not held longer
        lone = s.submit(unit("b3"))
        await clock.advance(0.19)
        assert len(w.groups) == 3  # still waiting for the other one
        await clock.advance(0.01)  # the linger is over: its timer sends it
        await w.sent(4)
        assert w.groups[3] == ["b3"]
        w.release(3)
        await lone
        # after a lone request, the next goes at once, by the fast path
        assert s.enter_now(10) is not None
    run(main())


def test_a_newer_wait_is_not_cut_short_by_the_timer_of_an_older_one():
    async def main():
        clock = FakeClock()
        w, s = worker_and_scheduler(slots=1, linger_s=0.4, clock=clock)
        first = [s.submit(unit(n)) for n in "abc"]
        await w.sent(1)
        w.release(0)  # one answered, two queued: three expected, until t0 + 0.4 (a timer is set for then)
        await first[0]
        first.append(s.submit(unit("d")))
        await w.sent(2)
        assert w.groups[1] == ["b", "c", "d"]
        await clock.advance(0.2)
        w.release(1)  # three answered: three expected again, until t0 + 0.6
        await asyncio.gather(*first)
        e = s.submit(unit("e"))
        await clock.advance(0.25)  # t0 + 0.45: past the older wait's timer, which fires now
        assert len(w.groups) == 2, w.groups  # e still waits for the other two
        rest = [s.submit(unit("f")), s.submit(unit("g"))]
        await w.sent(3)
        assert w.groups[2] == ["e", "f", "g"]
        w.release(2)
        await asyncio.gather(e, *rest)
    run(main())


def test_the_fast_path_takes_a_free_worker_only_and_is_sent_again_if_its_worker_dies():
    async def main():
        w, s = worker_and_scheduler(slots=1)
        ticket = s.enter_now(10)
        assert ticket is not None and s.busy == 1
        assert s.enter_now(10) is None  # the one worker is taken
        lone = asyncio.ensure_future(s.send_now(unit("a"), ticket))
        queued = s.submit(unit("b"))
        await w.sent(1)
        await settle()
        assert w.groups == [["a"]]  # "b" waits for the fast path's envelope
        assert s.forgive() == 1  # its worker died: sent again, and still holds the slot
        await w.sent(2)
        w.release(1)
        assert await lone == "answer a"
        await w.sent(3)
        assert w.groups[2] == ["b"] and w.cancelled == [0]
        w.release(2)
        assert await queued == "answer b"
        assert s.busy == 0 and s.outstanding == 0
    run(main())


def test_the_envelopes_out_when_a_worker_dies_are_sent_again_and_the_first_answer_wins():
    """MOSEC never answers the envelope of a worker that died, and which one it was is unknown: ``forgive``
    (the supervisor calls it when a worker is gone) sends every envelope out again, and each is answered
    by whichever copy answers first; the lost one is not waited for until its deadline."""
    async def main():
        w, s = worker_and_scheduler(slots=2)
        lost, alive = s.submit(unit("a")), s.submit(unit("b"))
        await w.sent(2)
        waiting = s.submit(unit("c"))
        assert s.forgive() == 2  # the worker that held "a" died (or the one with "b": nobody knows)
        await w.sent(4)
        assert w.groups[2:] == [["a"], ["b"]] and s.busy == 2  # each sent again, and holds a slot
        w.release(1)  # the survivor answers its original
        assert await alive == "answer b"
        await w.sent(5)
        assert w.groups[4] == ["c"]  # the slot of "b" is free again
        w.release(2)  # the copy of "a" is answered by the replacement worker
        assert await lost == "answer a"
        w.release(4)
        assert await waiting == "answer c"
        assert s.busy == 0 and s.outstanding == 0
        assert sorted(w.cancelled) == [0, 3]  # the copies that lost are not waited for
    run(main())


def test_an_envelope_is_sent_again_a_bounded_number_of_times_and_fails_with_its_copies():
    async def main():
        w, s = worker_and_scheduler(slots=1)
        f = s.submit(unit("a"))
        await w.sent(1)  # then its worker dies again and again
        for _ in range(MAX_RESENDS + 2):
            s.forgive()
        await w.sent(1 + MAX_RESENDS)
        await settle()
        assert len(w.groups) == 1 + MAX_RESENDS and s.busy == 0  # beyond the bound it holds no slot
        ticket = s.enter_now(10)
        assert ticket is not None  # a new request is not held behind it
        other = asyncio.ensure_future(s.send_now(unit("b"), ticket))
        await w.sent(2 + MAX_RESENDS)
        w.release(1 + MAX_RESENDS)
        assert await other == "answer b"
        for i in range(1 + MAX_RESENDS):
            w.release(i, TimeoutError(f"copy {i}"))
        with pytest.raises(TimeoutError):
            await f  # every copy failed: the units fail with the last failure
        assert s.outstanding == 0 and s.busy == 0
    run(main())


def test_a_failed_envelope_fails_each_of_its_units_and_a_gone_unit_is_never_sent():
    async def main():
        w, s = worker_and_scheduler(slots=1)
        first = s.submit(unit("a"))
        await w.sent(1)
        gone = s.submit(unit("gone", alive=lambda: False))
        b, c = s.submit(unit("b")), s.submit(unit("c"))
        w.release(0)
        await first
        await w.sent(2)
        assert w.groups[1] == ["b", "c"]
        with pytest.raises(Dropped):
            await gone
        w.release(1, ConnectionError("cut"))
        for f in (b, c):
            with pytest.raises(ConnectionError):
                await f
        assert s.busy == 0 and s.outstanding == 0
    run(main())


def test_an_envelope_lost_with_its_worker_is_taken_apart_and_a_unit_that_kills_alone_again_is_poison():
    """The dead worker's heartbeat names the envelope it held (``worker_lost``): its units go back to the front
    of the queue, each to be sent alone; the envelope on the other worker goes on untouched. The one that kills
    its worker again, alone, is answered Poisoned and never sent again; the others are answered."""
    async def main():
        w, s = worker_and_scheduler(slots=2, max_group=8)
        x, y = s.submit(unit("x")), s.submit(unit("y"))  # both workers busy
        await w.sent(2)
        others = [s.submit(unit(n)) for n in ("p", "a", "b")]  # they wait, and go together to a free worker
        w.release(0)
        await x
        await w.sent(3)
        busy = s.submit(unit("c"))
        w.release(1)
        await y
        await w.sent(4)
        assert w.groups[2:] == [["p", "a", "b"], ["c"]]
        assert s.worker_lost({w.ids[2]}) == (3, 0)  # the worker with p, a, b died
        await w.sent(5)
        assert w.groups[4] == ["p"]  # alone, from the queue's front, on the slot the lost envelope gave back
        assert 2 in w.cancelled  # the lost envelope's copy is not waited for
        assert s.worker_lost({w.ids[4]}) == (0, 1)  # p killed the next worker too, alone: poison
        with pytest.raises(Poisoned):
            await others[0]
        await w.sent(6)
        assert w.groups[5] == ["a"]  # each alone from now on
        w.release(3)  # c's worker answers: its envelope was never sent again
        assert await busy == "answer c"
        await w.sent(7)
        assert w.groups[6] == ["b"]
        w.release(5)
        w.release(6)
        assert [await f for f in others[1:]] == ["answer a", "answer b"]
        assert len(w.groups) == 7 and s.busy == 0 and s.outstanding == 0
    run(main())


def test_a_lone_unit_on_a_dead_worker_is_sent_again_once_and_then_is_poison():
    """An innocent request can be on a worker that is killed (the OOM killer, an operator): the first death
    sends it again, alone; only a second death with it alone makes it poison (POISON_STRIKES)."""
    assert POISON_STRIKES == 2

    async def main():
        w, s = worker_and_scheduler(slots=1)
        ticket = s.enter_now(10)
        lone = asyncio.ensure_future(s.send_now(unit("a"), ticket))
        await w.sent(1)
        assert s.worker_lost({w.ids[0]}) == (1, 0)
        await w.sent(2)
        assert w.ids[1] == w.ids[0] and w.groups[1] == ["a"] and s.busy == 1  # a copy, on the slot it had
        w.release(1)
        assert await lone == "answer a"
        # the same again, but the copy's worker dies too
        ticket = s.enter_now(10)
        doomed = asyncio.ensure_future(s.send_now(unit("b"), ticket))
        await w.sent(3)
        s.worker_lost({w.ids[2]})
        await w.sent(4)
        assert s.worker_lost({w.ids[3]}) == (0, 1)
        with pytest.raises(Poisoned):
            await doomed
        assert s.busy == 0 and s.outstanding == 0 and w.cancelled[-2:] == [2, 3]
        assert s.worker_lost({12345}) == (0, 0)  # an envelope nobody has out any more: nothing happens
    run(main())


def test_an_envelope_answered_before_its_worker_is_reported_lost_keeps_its_answer():
    """A worker can die just after its answer came back: its heartbeat, read later by the supervisor, still names
    the envelope. The answer stands: the envelope is neither taken apart nor sent again, and its units get no
    strike (two strikes make a request poison). The answer is the envelope's the moment it is read, before the
    waiter runs."""
    async def main():
        w, s = worker_and_scheduler(slots=1, max_group=8)
        first = s.submit(unit("a"))
        await w.sent(1)
        b, c = s.submit(unit("b", owner=1)), s.submit(unit("c", owner=2))
        w.release(0)
        assert await first == "answer a"
        await w.sent(2)
        assert w.groups[1] == ["b", "c"]
        w.release(1)
        await asyncio.sleep(0)  # one turn: the envelope's answer is read; nobody waiting for it has run yet
        assert s.worker_lost({w.ids[1]}) == (0, 0)
        assert await b == "answer b" and await c == "answer c"
        await settle()
        assert len(w.groups) == 2 and s.busy == 0 and s.outstanding == 0 and s.queued == 0
    run(main())


def test_cancel_drops_every_queued_unit_of_a_request_at_once():
    async def main():
        w, s = worker_and_scheduler(slots=1, budget=100)
        head = s.submit(unit("head"))
        await w.sent(1)
        mine = [s.submit(unit(f"c{i}", lane="chunk", owner=7)) for i in range(5)]
        theirs = [s.submit(unit("t", owner=8)), s.submit(unit("u", lane="chunk", owner=9))]
        small_mine = s.submit(unit("s", owner=7))
        dropped = []
        s.on_drop = dropped.append
        assert s.cancel(7) == 6 and s.queued == 2
        for f in (*mine, small_mine):
            with pytest.raises(Dropped):
                await f
        assert len(dropped) == 6
        w.release(0)
        await head
        await w.sent(2)
        w.release(1)
        await w.sent(3)
        w.release(2)
        assert [await f for f in theirs] == ["answer t", "answer u"]
        assert all("c" not in g[0] for g in w.groups)
    run(main())


def test_with_nobody_small_around_an_envelope_of_chunks_grows_to_the_quiet_time_at_the_measured_speed():
    """Issue 36: the budget's share bounds what a short request waits behind; with none around, splitting buys
    nothing, and on fast silicon more pairs in one envelope pack into fuller calls. The share grows to
    ``quiet_s`` of work at the speed learned from answered envelopes, and shrinks back once a short request
    comes (a canary is not one: nobody waits behind it)."""
    async def main():
        clock = FakeClock()
        w, s = worker_and_scheduler(300, slots=1, quiet_s=1.0, clock=clock)  # a share of 300
        first = s.submit(unit("a", lane="chunk", cost=300, owner=1))
        await w.sent(1)
        assert s.speed == 0 and s.grown_share() == 300  # no speed known yet: the budget's share
        await clock.advance(0.5)  # 300 of cost answered in half a second: 600 a second
        w.release(0)
        await first
        assert s.speed == pytest.approx(600) and s.grown_share() == 600
        # the worker is busy with one chunk while two requests' chunks queue: the next envelope takes 600 of them
        busy = s.submit(unit("b0", lane="chunk", cost=100, owner=2))
        await w.sent(2)
        rest = [s.submit(unit(f"{o}{i}", lane="chunk", cost=100, owner=o)) for o in "cd" for i in range(4)]
        await clock.advance(1 / 6)  # 600 a second again
        w.release(1)
        await busy
        await w.sent(3)
        assert w.groups[2] == ["c0", "d0", "c1", "d1", "c2", "d2"]  # round-robin still, six of 100
        # a canary queued meanwhile does not count as a short request
        probe = Unit(cost=10, lane="small", owner=9, payload="probe", alive=lambda: True, probe=True)
        probe_answer = s.submit(probe)
        w.release(2)
        await w.sent(4)
        assert w.groups[3] == ["probe"]
        w.release(3)
        assert await probe_answer == "answer probe"
        await w.sent(5)
        assert w.groups[4] == ["c3", "d3"] and s.grown_share() == 600
        w.release(4)
        await asyncio.gather(*rest)
        # a short request: back to the budget's share, until quiet_s without one has passed
        short = s.submit(unit("s"))
        await w.sent(6)
        assert s.grown_share() == 300
        w.release(5)
        await short
        await clock.advance(0.9)
        assert s.grown_share() == 300
        await clock.advance(0.1)
        assert s.grown_share() == 600
    run(main())


def test_the_share_never_shrinks_below_the_budget_and_stays_put_without_a_quiet_time():
    async def main():
        clock = FakeClock()
        for quiet_s, slow in ((0.0, False), (1.0, True)):
            w, s = worker_and_scheduler(300, slots=1, quiet_s=quiet_s, clock=clock)
            answer = s.submit(unit("a", lane="chunk", cost=300, owner=1))
            await w.sent(1)
            await clock.advance(10.0 if slow else 0.01)  # slow: 30 a second, a second of it less than the share
            w.release(0)
            await answer
            assert s.speed > 0
            assert s.grown_share() == 300
    run(main())

