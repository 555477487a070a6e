"""When to kill what. Pure policy: the caller feeds probe results and worker views, with the time.

The rules, in order:
1. No failed probe: nothing to do.
2. A failed probe and a worker that is stopped (SIGSTOP, tracing) or a zombie: kill it. It can never
   answer, and MOSEC never notices (its forward timeout is a SIGALRM the worker cannot take).
3. A failed probe and a worker inside a forward pass that has made no progress (no micro-batch finished)
   for ``hang_after_s``: hung in native code; kill it.
4. ``failures_needed`` failed probes in a row, no culprit, and no scoring worker made progress since the
   first failure: the server is wedged (controller, IPC); restart MOSEC.
   If a scoring worker did make progress, the server is overloaded, not hung: do not destroy its work.
5. Restarts are bounded: more than ``restart_budget`` within ``restart_window_s`` and the policy gives up,
   so the supervisor exits non-zero and its own supervisor (systemd) decides.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

STUCK_STATUSES = {"stopped", "tracing-stop", "zombie", "dead"}
Action = Literal["none", "kill_workers", "restart", "give_up"]


@dataclass
class WorkerView:
    pid: int
    stage: str
    status: str
    busy_since: Optional[float] = None
    progress_at: Optional[float] = None


@dataclass
class Decision:
    action: Action
    reason: str = ""
    pids: list[int] = field(default_factory=list)


class WatchdogPolicy:
    def __init__(
        self,
        *,
        failures_needed: int = 2,
        hang_after_s: float = 30.0,
        restart_budget: int = 5,
        restart_window_s: float = 600.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.failures_needed = failures_needed
        self.hang_after_s = hang_after_s
        self.restart_budget = restart_budget
        self.restart_window_s = restart_window_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.consecutive_failures = 0
        self.first_failure_at: Optional[float] = None
        self.restarts: deque[float] = deque()

    # --- probes --------------------------------------------------------------------------------------
    def record_probe(self, ok: bool, now: float) -> None:
        if ok:
            self.consecutive_failures = 0
            self.first_failure_at = None
        else:
            if self.consecutive_failures == 0:
                self.first_failure_at = now
            self.consecutive_failures += 1

    def decide(self, now: float, workers: Sequence[WorkerView]) -> Decision:
        if self.consecutive_failures == 0:
            return Decision("none")
        stuck = [w.pid for w in workers if w.status in STUCK_STATUSES]
        if stuck:
            return Decision("kill_workers", f"worker(s) {stuck} stopped or dead while probes fail", stuck)
        hung = [
            w.pid
            for w in workers
            if w.busy_since is not None and w.progress_at is not None and now - w.progress_at > self.hang_after_s
        ]
        if hung:
            return Decision(
                "kill_workers", f"worker(s) {hung} made no progress for over {self.hang_after_s:g}s", hung
            )
        if self.consecutive_failures < self.failures_needed:
            return Decision("none", "probe failed; waiting for confirmation")
        since = self.first_failure_at if self.first_failure_at is not None else now
        progressing = [w.pid for w in workers if w.stage == "score" and (w.progress_at or 0) > since]
        if progressing:
            return Decision("none", "overloaded: probes fail while workers make progress")
        return Decision("restart", f"{self.consecutive_failures} probes failed and no worker made progress")

    # --- restarts ------------------------------------------------------------------------------------
    def allow_restart(self, now: float) -> bool:
        """Count a restart; False once the budget for the window is spent."""
        while self.restarts and now - self.restarts[0] > self.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.restart_budget:
            return False
        self.restarts.append(now)
        return True

    def backoff(self) -> float:
        """Delay before the next restart: doubles with each restart still inside the window."""
        n = max(0, len(self.restarts) - 1)
        return min(self.backoff_max_s, self.backoff_base_s * (2**n)) if self.restarts else 0.0

    def reset_after_restart(self) -> None:
        self.consecutive_failures = 0
        self.first_failure_at = None
