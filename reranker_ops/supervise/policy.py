"""When to kill what, and whether to restart or give up. Pure policy: the caller feeds worker views, probe results,
failures and the time (a test feeds a fake clock).

All times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process of a machine, never
stepped), so a wall-clock step in either direction changes no decision.

Two independent parts:

``inspect`` runs on **every** tick, whatever the canary says (with two workers, the healthy one keeps
answering the canary while its sibling is stuck, so a probe-driven check would never look):
  - a worker that is stopped (SIGSTOP, tracing) can never answer and MOSEC never notices: kill it now;
  - a worker inside a forward pass that made no progress (no micro-batch finished) for ``hang_after_s``
    is hung in native code: dump its stack, then kill it;
  - a zombie or dead worker is left to MOSEC, which reaps and replaces it: killing it again would do
    nothing, so it is neither killed nor counted.

``wedged`` is the canary's rule: ``failures_needed`` failed probes in a row, and no scoring worker made
progress since the first of them, means the server as a whole is stuck (controller, IPC): restart MOSEC.
If a worker did make progress the server is overloaded, not hung, and its work is not destroyed.

``RestartPolicy`` is the one place that decides "restart or give up" when a generation fails (it exited, it
did not boot in time, it is wedged, its kill could not be verified): before the server was ever ready, up to
``start_attempts`` tries; after, more than ``restart_budget`` restarts within ``restart_window_s`` and it gives
up, so the supervisor ends in ``failed`` and its own supervisor (systemd) decides. A failure we caused (the
watchdog killed a stage's last worker) spends nothing. Killing a stuck worker is a local repair, not a restart,
and spends no budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

STOPPED_STATUSES = {"stopped", "tracing-stop"}
GONE_STATUSES = {"zombie", "dead"}


@dataclass(frozen=True)
class WorkerView:
    pid: int
    stage: str  # "score" (the one MOSEC stage)
    status: str  # psutil's: running, sleeping, stopped, zombie, ...
    ready: bool = True
    busy_since: Optional[float] = None  # monotonic
    progress_at: Optional[float] = None  # monotonic


@dataclass(frozen=True)
class Kill:
    pid: int
    stage: str
    reason: str
    dump_stack: bool  # hung inside native code: ask for its stack first


class WatchdogPolicy:
    def __init__(self, *, failures_needed: int = 2, hang_after_s: float = 30.0) -> None:
        self.failures_needed = failures_needed
        self.hang_after_s = hang_after_s
        self.consecutive_failures = 0
        self.first_failure_at: Optional[float] = None

    # --- every tick ----------------------------------------------------------------------------------
    def inspect(self, now: float, workers: Sequence[WorkerView]) -> list[Kill]:
        kills = []
        for w in workers:
            if w.status in GONE_STATUSES:
                continue  # MOSEC reaps and respawns it; nothing to kill
            if w.status in STOPPED_STATUSES:
                kills.append(Kill(w.pid, w.stage, f"{w.stage} worker {w.pid} is stopped ({w.status})", False))
            elif w.busy_since is not None and w.progress_at is not None and now - w.progress_at > self.hang_after_s:
                kills.append(Kill(w.pid, w.stage, f"{w.stage} worker {w.pid} made no progress inside forward for "
                                  f"{now - w.progress_at:.0f}s (limit {self.hang_after_s:g}s)", True))
        return kills

    # --- the canary ----------------------------------------------------------------------------------
    def record_probe(self, ok: bool, now: float) -> None:
        if ok:
            self.consecutive_failures = 0
            self.first_failure_at = None
        else:
            if self.consecutive_failures == 0:
                self.first_failure_at = now
            self.consecutive_failures += 1

    def wedged(self, now: float, workers: Sequence[WorkerView]) -> Optional[str]:
        """Why MOSEC must be restarted, or None."""
        if self.consecutive_failures < self.failures_needed:
            return None
        since = self.first_failure_at if self.first_failure_at is not None else now
        if any(w.stage == "score" and (w.progress_at or float("-inf")) > since for w in workers):
            return None  # overloaded: probes fail while workers make progress
        return f"{self.consecutive_failures} probes failed and no worker made progress for {now - since:.0f}s"

    def reset(self) -> None:
        """A new generation: the probes of the old one say nothing of it."""
        self.consecutive_failures = 0
        self.first_failure_at = None


@dataclass(frozen=True)
class Verdict:
    """What to do about a failed generation: start a new one after ``delay`` seconds, or give up (``fatal``)."""

    fatal: Optional[str] = None
    delay: float = 0.0

    @property
    def restart(self) -> bool:
        return self.fatal is None


class RestartPolicy:
    def __init__(self, *, start_attempts: int = 2, restart_budget: int = 5, restart_window_s: float = 600.0,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 30.0) -> None:
        self.start_attempts = start_attempts
        self.restart_budget = restart_budget
        self.restart_window_s = restart_window_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.start_failures = 0
        self.restarts: deque[float] = deque()

    def failure(self, cause: str, now: float, *, ever_ready: bool, ours: bool = False) -> Verdict:
        """A generation failed with ``cause``. ``ever_ready``: the server has answered a canary before (so this
        is a restart, not a start that failed); ``ours``: we made it end (a remediation), which spends
        nothing. The one place that decides restart or give up."""
        if ours:
            return Verdict(delay=self.backoff())
        if not ever_ready:
            self.start_failures += 1
            if self.start_failures >= self.start_attempts:
                return Verdict(fatal=f"the server failed to start {self.start_failures} time(s): {cause}")
            return Verdict(delay=self.backoff())
        while self.restarts and now - self.restarts[0] > self.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.restart_budget:
            return Verdict(fatal=f"gave up: {self.restart_budget} restarts within {self.restart_window_s:g}s"
                                 f" (last: {cause})")
        self.restarts.append(now)
        return Verdict(delay=self.backoff())

    def backoff(self) -> float:
        """Delay before the next restart: none for the first inside the window (a one-off crash is repaired
        at once), then doubling with each further restart inside it."""
        n = len(self.restarts)
        return 0.0 if n <= 1 else min(self.backoff_max_s, self.backoff_base_s * (2 ** (n - 2)))
