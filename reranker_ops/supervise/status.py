"""The supervisor's state as others see it: the state machine (``states.py``) set from what the loop found,
each move logged and told to systemd (sd_notify: READY=1 once, STOPPING=1, STATUS=, WATCHDOG=1 after a
good probe), and ``state.json`` written on each move and at least every ``PUBLISH_EVERY_S``."""

from __future__ import annotations

import logging
import time
from typing import Callable

from .sdnotify import Notifier
from .states import State, StateMachine, Transition

PUBLISH_EVERY_S = 1.0


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

    def derive(self, gen, canary, capacity: dict) -> None:
        """The state a booted or booting generation puts the server in: starting until the first good probe;
        then running, or degraded with every reason (a failed probe, a generation starting, workers missing)."""
        if not canary.ever_ready:
            self.sm.to(State.STARTING, "loading the model" if not gen.booted else "waiting for the first answer")
            return
        probe = canary.last
        problems = [f"probe failed: {probe.error}"] if probe is not None and not probe.ok else []
        if gen.ready_at is None:
            problems.append(f"MOSEC generation {gen.number} starting")
        problems += [f"{c['live']} of {c['expected']} {stage} workers" for stage, c in capacity.items()
                     if c["live"] < c["expected"]]
        self.sm.to(State.DEGRADED, "; ".join(problems)) if problems else self.sm.to(State.RUNNING)

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
