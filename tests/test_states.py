"""The supervisor's state machine: the moves it makes, the ones it refuses, and who hears of them."""

from __future__ import annotations

import pytest

from reranker_ops.supervise.states import InvalidTransition, State, StateMachine

pytestmark = pytest.mark.timeout(60)


def test_state_machine_transitions_and_listeners():
    seen = []
    sm = StateMachine(State.STARTING, "loading")
    sm.subscribe(seen.append)
    sm.to(State.RUNNING)
    assert sm.to(State.RUNNING) is None  # no change, no publication
    sm.to(State.DEGRADED, "1 of 2 score workers")
    sm.to(State.DEGRADED, "probe failed")  # a new reason is published
    sm.to(State.RESTARTING, "wedged")
    sm.to(State.DEGRADED, "generation 2 starting")
    sm.to(State.RUNNING)
    sm.to(State.STOPPING, "draining")
    sm.to(State.STOPPED)
    assert [(t.old.value, t.new.value) for t in seen] == [
        ("starting", "running"), ("running", "degraded"), ("degraded", "degraded"), ("degraded", "restarting"),
        ("restarting", "degraded"), ("degraded", "running"), ("running", "stopping"), ("stopping", "stopped")]
    assert sm.terminal
    with pytest.raises(InvalidTransition):
        sm.to(State.RUNNING)  # nothing leaves a terminal state


@pytest.mark.parametrize("old,new", [
    (State.RUNNING, State.STARTING),  # once served, a restart is 'degraded', never 'starting' again
    (State.STOPPING, State.RUNNING),  # a drain is never undone
    (State.FAILED, State.STOPPED),
    (State.STARTING, State.STOPPED),  # a stop always drains first
])
def test_state_machine_refuses_what_makes_no_sense(old, new):
    sm = StateMachine(old)
    with pytest.raises(InvalidTransition):
        sm.to(new, "x")
    assert sm.state == old
