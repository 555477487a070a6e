"""The watchdog's policy on a fake monotonic clock: which worker to kill (stopped, hung), when the canary's
failures mean a wedged server, the restart budget and backoff, and no decision read from the wall clock."""

from __future__ import annotations

import os
import time

import pytest

from reranker_ops.supervise.policy import RestartPolicy, WatchdogPolicy, WorkerView

pytestmark = pytest.mark.timeout(60)


def policy(**kw) -> WatchdogPolicy:
    return WatchdogPolicy(failures_needed=2, hang_after_s=10, **kw)


def restarts(**kw) -> RestartPolicy:
    return RestartPolicy(start_attempts=2, restart_budget=3, restart_window_s=100, **kw)


def test_a_stopped_worker_is_killed_even_while_probes_pass():
    # two workers: the healthy one keeps answering the canary; the stopped one must still be found
    p = policy()
    p.record_probe(True, 100)
    kills = p.inspect(100, [WorkerView(1, "score", "stopped"), WorkerView(2, "score", "sleeping")])
    assert [(k.pid, k.dump_stack) for k in kills] == [(1, False)]


def test_a_worker_without_progress_inside_forward_is_hung_and_dumped_first():
    p = policy()
    p.record_probe(True, 100)
    hung = WorkerView(7, "score", "running", busy_since=80, progress_at=85)
    [kill] = p.inspect(100, [hung])
    assert kill.pid == 7 and kill.dump_stack and "no progress" in kill.reason
    progressing = WorkerView(7, "score", "running", busy_since=80, progress_at=95)
    assert p.inspect(100, [progressing]) == []  # busy, not hung
    idle = WorkerView(7, "score", "sleeping", busy_since=None, progress_at=1)
    assert p.inspect(100, [idle]) == []  # idle for long is fine


def test_zombie_and_dead_workers_are_left_to_mosec():
    p = policy()
    assert p.inspect(100, [WorkerView(3, "score", "zombie"), WorkerView(4, "validate", "dead")]) == []


def test_the_canary_rule_restarts_a_wedged_server_but_not_an_overloaded_one():
    p = policy()
    idle = [WorkerView(1, "score", "sleeping", busy_since=None, progress_at=50)]
    p.record_probe(False, 100)
    assert p.wedged(100, idle) is None  # one failure is not enough
    p.record_probe(False, 105)
    assert "2 probes failed" in p.wedged(105, idle)
    progressing = [WorkerView(1, "score", "running", busy_since=101, progress_at=104)]
    assert p.wedged(105, progressing) is None  # overloaded: work goes on
    p.record_probe(True, 110)
    assert p.consecutive_failures == 0 and p.wedged(110, idle) is None


def test_restart_budget_and_backoff():
    """The one place that decides restart or give up, on a clock the test sets (the times passed in)."""
    p = restarts()
    assert p.backoff() == 0.0
    delays = []
    for t in (0, 1, 2):
        verdict = p.failure("crash", t, ever_ready=True)
        assert verdict.restart
        delays.append(verdict.delay)
    assert delays == [0.0, 1.0, 2.0]  # a one-off crash is repaired at once, a crash loop slows down
    assert p.failure("crash", 3, ever_ready=True).fatal == "gave up: 3 restarts within 100s (last: crash)"
    assert p.failure("crash", 101, ever_ready=True).restart  # the oldest fell out of the window


def test_a_start_that_fails_gets_its_attempts_and_a_remediation_spends_nothing():
    p = restarts()
    assert p.failure("no model", 0, ever_ready=False).restart  # the first boot failed: once more
    assert p.failure("no model", 1, ever_ready=False).fatal == "the server failed to start 2 time(s): no model"
    q = restarts()
    for t in range(10):  # the watchdog ended MOSEC itself (a stage's last worker killed): not a crash loop
        assert q.failure("killed by the watchdog", t, ever_ready=True, ours=True).restart
    assert list(q.restarts) == [] and q.failure("crash", 10, ever_ready=True).delay == 0.0


def test_no_decision_reads_the_wall_clock(tmp_path, monkeypatch):
    """Heartbeats and the policy run on CLOCK_MONOTONIC, so stepping the wall clock either way neither makes a
    busy worker look hung nor hides a hung one: the heartbeat's own stamps, their reading and every decision
    are made here with ``time.time`` unusable."""
    from reranker_ops.protocol.heartbeat import Heartbeat, read_heartbeat

    def wall_clock() -> float:
        raise AssertionError("a decision read the wall clock")

    busy = Heartbeat(str(tmp_path), "score")  # stamps progress_at itself: on the monotonic clock
    assert abs(busy.data["progress_at"] - time.monotonic()) < 60
    monkeypatch.setattr(time, "time", wall_clock)
    p = policy()
    restart = restarts()

    def view() -> WorkerView:
        rec = read_heartbeat(next(tmp_path.glob("score-*.hb")))
        return WorkerView(os.getpid(), "score", "running", True, rec["busy_since"], rec["progress_at"])

    busy.write(busy_since=busy.data["progress_at"], ready=1)
    assert p.inspect(time.monotonic(), [view()]) == []  # busy and fresh: never killed
    busy.write(busy_since=time.monotonic() - 60, progress_at=time.monotonic() - 60)  # stuck for a minute
    assert [k.pid for k in p.inspect(time.monotonic(), [view()])] == [os.getpid()]  # always found
    p.record_probe(False, time.monotonic())
    p.record_probe(False, time.monotonic())
    assert p.wedged(time.monotonic(), [view()])
    assert restart.failure("wedged", time.monotonic(), ever_ready=True).restart
