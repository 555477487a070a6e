"""The supervisor's lifecycle as named states with guarded transitions.

One function, ``StateMachine.to``, changes the state. It refuses a transition that makes no sense (a bug,
raised as ``InvalidTransition``), and tells every listener of each change: the supervisor publishes
``state.json``, sd_notify, the ``reranker_state`` metric and a log line from there, so the four can
never disagree.

    starting ──► running ◄──► degraded
        │           │            │
        └──────► restarting ◄────┘        (a MOSEC generation is being replaced)
                    │
     any live state ──► stopping ──► stopped
     any live state ──► failed               (gave up, or the supervisor itself crashed)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Callable, Optional


class State(str, enum.Enum):
    STARTING = "starting"  # no MOSEC generation has answered a canary yet
    RUNNING = "running"  # the last canary succeeded and every worker is there
    DEGRADED = "degraded"  # serving before, but now a probe fails or capacity is reduced
    RESTARTING = "restarting"  # replacing the MOSEC generation (crash, wedge)
    STOPPING = "stopping"  # draining: new requests get 503
    STOPPED = "stopped"  # ended cleanly
    FAILED = "failed"  # gave up, with a reason

    def __str__(self) -> str:
        return self.value


LIVE = frozenset({State.STARTING, State.RUNNING, State.DEGRADED, State.RESTARTING})
TERMINAL = frozenset({State.STOPPED, State.FAILED})

ALLOWED: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.STARTING, State.RUNNING, State.DEGRADED, State.RESTARTING,
                               State.STOPPING, State.FAILED}),
    State.RUNNING: frozenset({State.DEGRADED, State.RESTARTING, State.STOPPING, State.FAILED}),
    State.DEGRADED: frozenset({State.DEGRADED, State.RUNNING, State.RESTARTING, State.STOPPING, State.FAILED}),
    State.RESTARTING: frozenset({State.STARTING, State.DEGRADED, State.RESTARTING, State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class Transition:
    old: State
    new: State
    reason: str
    at: float  # monotonic


Listener = Callable[[Transition], None]


class StateMachine:
    def __init__(self, initial: State = State.STARTING, reason: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = initial
        self.reason = reason
        self.since = clock()
        self._clock = clock
        self._listeners: list[Listener] = []
        self.history_len = 0

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def can(self, new: State) -> bool:
        return new in ALLOWED[self.state]

    def to(self, new: State, reason: str = "") -> Optional[Transition]:
        """Move to ``new``. Staying in the same state with the same reason is a no-op (returns None)."""
        new = State(new)
        if new == self.state and reason == self.reason:
            return None
        if new not in ALLOWED[self.state]:
            raise InvalidTransition(f"{self.state} -> {new} ({reason or 'no reason'})")
        t = Transition(self.state, new, reason, self._clock())
        if new != self.state:
            self.since = t.at
        self.state, self.reason = new, reason
        self.history_len += 1
        for listener in self._listeners:
            listener(t)
        return t

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL
