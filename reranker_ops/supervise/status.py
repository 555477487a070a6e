"""The supervisor's state as others see it: the state machine (``states.py``) set from what the loop found,
each move logged and told to systemd (sd_notify: READY=1 once, STOPPING=1, STATUS=, WATCHDOG=1 after a
good probe), and ``state.json`` written on each move and at least every ``PUBLISH_EVERY_S``."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from .sdnotify import Notifier
from .states import State, StateMachine, Transition

PUBLISH_EVERY_S = 1.0


def slot_verdict(gen, canary, capacity: dict, restarting: Optional[str], down: Optional[str]) -> tuple[State, str]:
    """The state one model's generation puts it in: starting until the first good probe; then running, or
    degraded with every reason (a failed probe, a generation starting, workers missing); restarting while a
    new generation waits; failed (down) once it gave up."""
    if down is not None:
        return State.FAILED, down
    if restarting is not None:
        return State.RESTARTING, restarting
    if gen is None or not canary.ever_ready:
        return State.STARTING, "loading the model" if gen is None or not gen.booted else "waiting for the first answer"
    probe = canary.last
    problems = [f"probe failed: {probe.error}"] if probe is not None and not probe.ok else []
    if gen.ready_at is None:
        problems.append(f"MOSEC generation {gen.number} starting")
    problems += [f"{c['live']} of {c['expected']} {stage} workers" for stage, c in capacity.items()
                 if c["live"] < c["expected"]]
    return (State.DEGRADED, "; ".join(problems)) if problems else (State.RUNNING, "")


class Status:
    def __init__(self, notifier: Notifier, log: logging.Logger, serving: Callable[[], str],
                 publish: Callable[[], None]) -> None:
        self.sm = StateMachine(State.STARTING, "loading the model")
        self.notifier, self.log = notifier, log
        self._serving = serving  # what READY=1 says is served
        self._publish = publish
        self._ready_notified = False
        self.last_publish = 0.0
        self.sm.subscribe(self.on_transition)

    def derive(self, verdicts: list[tuple[str, State, str, bool]]) -> None:
        """The server's state from its models' (name, state, reason, ever answered a canary): one model's state
        is the server's; of several, running when all run, starting while none has answered yet, else
        degraded, with each model that is not running named (one that is down included)."""
        if len(verdicts) == 1:
            _name, state, reason, _ever = verdicts[0]
            if state != State.FAILED:  # a model that gave up ends a server of one: the supervisor stops
                self.sm.to(state, reason)
            return
        if all(state == State.RUNNING for _n, state, _r, _e in verdicts):
            self.sm.to(State.RUNNING)
            return
        why = "; ".join(f"{name}: {'down' if state == State.FAILED else state.value}{': ' + reason if reason else ''}"
                        for name, state, reason, _e in verdicts if state != State.RUNNING)
        serving = any(ever for *_x, ever in verdicts) or self.sm.state != State.STARTING
        self.sm.to(State.DEGRADED if serving else State.STARTING, why)

    def serving_ready(self, verdicts: list[tuple[str, State, str, bool]]) -> None:
        """READY=1 for a server of several models once every model has answered or given up, and one serves:
        a model that cannot load does not hold the others' start (the state says which is down)."""
        if (not self._ready_notified and len(verdicts) > 1
                and all(ever or state == State.FAILED for _n, state, _r, ever in verdicts)
                and any(state in (State.RUNNING, State.DEGRADED) for _n, state, _r, _e in verdicts)):
            self._ready_notified = True
            self.notifier.ready(f"serving {self._serving()}; {self.sm.reason}")

    def on_transition(self, t: Transition) -> None:
        quiet = t.new in (State.RUNNING, State.STARTING, State.STOPPING, State.STOPPED)
        self.log.log(logging.INFO if quiet else logging.WARNING, "state %s -> %s%s", t.old, t.new,
                     f": {t.reason}" if t.reason else "")
        if t.new == State.RUNNING and not self._ready_notified:
            self._ready_notified = True
            self.notifier.ready(f"serving {self._serving()}")
        elif t.new == State.STOPPING:
            self.notifier.stopping(f"stopping: {t.reason}")
        else:
            self.notifier.status(f"{t.new}{': ' + t.reason if t.reason else ''}")
        self.publish()

    def ping(self) -> None:
        """A probe succeeded: systemd's watchdog is fed, only ever after READY=1."""
        if self._ready_notified:
            self.notifier.watchdog()

    def publish(self) -> None:
        self.last_publish = time.monotonic()
        self._publish()

    def publish_due(self, now: float) -> None:
        if now - self.last_publish >= PUBLISH_EVERY_S:
            self.publish()

    def finish(self, fatal) -> None:
        """The last move: failed (with why) or stopped."""
        if fatal and not self.sm.terminal:
            self.sm.to(State.FAILED, fatal)
        elif not self.sm.terminal:
            if self.sm.state != State.STOPPING:
                self.sm.to(State.STOPPING, "stopping")
            self.sm.to(State.STOPPED)
        self.publish()
