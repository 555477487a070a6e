"""The watchdog's eyes and hands on the score workers: heartbeats, kills, stack dumps, deaths, capacity.

Every tick, whatever the canary says (with two workers the healthy one keeps answering the canary, so a
probe-driven check would never see a stopped sibling):

- the worker dir is read once (in a thread): each heartbeat, and whether its process is alive;
- a worker that died (found by its heartbeat file, which outlives it until reported, so one that MOSEC started
  and that died between two ticks is found too) took the envelope it was scoring along: the front sends that
  envelope's requests again, each alone (``FairScheduler.worker_lost``);
- a worker that is stopped, or hung inside forward with no progress for ``worker_hang_s``, has its stack dumped
  (hung only) and is killed; each kill is verified;
- capacity: every stage back to its expected count within ``respawn_timeout_s``, else the generation is
  replaced (``tick`` says why).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Optional

import psutil

from ..protocol.heartbeat import forget_worker, read_worker_dir
from . import roles
from .generation import Generation
from .policy import GONE_STATUSES, STOPPED_STATUSES, Kill, WatchdogPolicy, WorkerView
from .procs import OsCalls, alive

KILL_CONFIRM_S = 5.0
STACK_DUMP_WAIT_S = 1.0


@dataclass
class PendingKill:
    pid: int
    stage: str
    deadline: float


# what a score worker's heartbeat counts: pairs scored, tokens in them, envelopes (one scoring call each), requests
# in those envelopes
SCORE_COUNTERS = ("pairs", "tokens", "batches", "requests")


class WorkerWatch:
    def __init__(self, settings, policy: WatchdogPolicy, front, metrics, log: logging.Logger, outages,
                 keep_last_worker: bool, os_calls: Optional[OsCalls] = None) -> None:
        self.settings = settings
        self.policy = policy
        self.front = front  # what the supervisor gives it: worker_lost / forgive of the request path
        self.metrics = metrics
        self.log = log
        self.outages = outages
        self.keep_last_worker = keep_last_worker  # MOSEC replaces a stage's last worker (worker/app.py)
        self.os = os_calls or OsCalls()
        self.expected = {"score": settings.workers}
        self.kills = 0  # workers the watchdog killed
        self.deaths = 0  # workers that died without being killed by it
        self.pending: dict[int, PendingKill] = {}
        self.views: list[WorkerView] = []
        self.beats: dict[int, dict] = {}  # the heartbeats ``views`` were built from (read once a tick)
        self._short_since: dict[str, float] = {}

    def reset(self) -> None:
        """A new generation is the current one: what was pending or short was the old one's."""
        self.pending.clear()
        self._short_since.clear()
        self.views = []

    # --- reading ---------------------------------------------------------------------------------------
    def observe(self, gen: Optional[Generation]) -> tuple[dict[int, dict], list[WorkerView]]:
        """The heartbeats (each marked ``alive`` or not) and the workers' views, from one read of the worker
        dir (run in a thread)."""
        beats = read_worker_dir(self.settings.worker_dir)
        for pid, beat in beats.items():
            beat["alive"] = alive(pid)
        return beats, self.worker_views(gen, beats)

    async def observe_async(self, gen: Optional[Generation]) -> tuple[dict[int, dict], list[WorkerView]]:
        return await asyncio.get_running_loop().run_in_executor(None, self.observe, gen)

    def processes(self, gen: Optional[Generation], beats: Optional[dict[int, dict]] = None
                  ) -> list[tuple[psutil.Process, str]]:
        """Every process of a MOSEC generation with its role."""
        if gen is None or gen.exit_code is not None:
            return []
        beats = read_worker_dir(self.settings.worker_dir) if beats is None else beats
        return [(p, roles.role_of(p, supervisor_pid=None, mosec_pid=gen.pid, beats=beats))
                for p in roles.tree(gen.pid)]

    def worker_views(self, gen: Optional[Generation], beats: dict[int, dict]) -> list[WorkerView]:
        views = []
        for proc, role in self.processes(gen, beats):
            if role not in self.expected:
                continue
            try:
                status = proc.status()
            except psutil.NoSuchProcess:
                continue
            beat = beats.get(proc.pid, {})
            views.append(WorkerView(proc.pid, role, status, bool(beat.get("ready")), beat.get("busy_since"),
                                    beat.get("progress_at")))
        return views

    def capacity(self, views: Optional[list[WorkerView]] = None) -> dict[str, dict[str, int]]:
        live: dict[str, int] = {stage: 0 for stage in self.expected}
        for v in (self.views if views is None else views):
            if v.ready and v.status not in STOPPED_STATUSES | GONE_STATUSES and v.pid not in self.pending:
                live[v.stage] = live.get(v.stage, 0) + 1
        return {stage: {"live": live.get(stage, 0), "expected": n} for stage, n in self.expected.items()}

    def all_ready(self, views: list[WorkerView]) -> bool:
        return all(c["live"] >= c["expected"] for c in self.capacity(views).values())

    def boot_check(self, gen: Generation, now: float) -> Optional[str]:
        """A generation must have every worker ready by its own deadline: marks it booted when they are;
        why it failed, or None."""
        if self.all_ready(self.views):
            gen.mark_booted()
            self.log.info("MOSEC generation %d: all workers ready after %.2fs", gen.number, now - gen.started)
            return None
        failure = self.init_failure(gen.number, self.beats)
        if failure is None and now <= gen.deadline:
            return None
        return (f"MOSEC generation {gen.number}: {failure}" if failure else f"MOSEC generation {gen.number} did"
                f" not get its workers ready within {self.settings.startup_timeout_s:g}s: {gen.last_error()}")

    async def generation_died(self, number: int) -> None:
        """MOSEC's main process is gone: the envelopes its score workers held are answered by nobody, so they
        are suspects as with one worker's death."""
        beats, _views = await self.observe_async(None)
        dead = {pid for pid, beat in beats.items() if beat.get("stage") == "score" and not beat.get("alive")}
        if dead:
            self.report_lost(dead, beats, number)

    @staticmethod
    def init_failure(number: int, beats: dict[int, dict]) -> Optional[str]:
        """Why a worker of generation ``number`` could not start, if one said so before it died. MOSEC starts
        a dead worker again, so a model that cannot load is loaded again and again, each time in a new
        process, until the boot deadline: the first one's reason ends the boot at once."""
        for beat in beats.values():
            if beat.get("generation") == number and beat.get("init_error"):
                return f"the {beat.get('stage', '?')} worker could not start: {beat['init_error']}"
        return None

    def scored_totals(self) -> dict[str, int]:
        """The score workers' ``SCORE_COUNTERS``, summed, read from their heartbeats in one pass at scrape time:
        a scrape right after an answer counts it (the watch's own view is as old as its last tick)."""
        beats = [b for b in read_worker_dir(self.settings.worker_dir).values()
                 if b.get("stage") == "score" and not b.get("torn")]  # a torn record has no counters
        return {f: sum(int(b.get(f, 0)) for b in beats) for f in SCORE_COUNTERS}

    # --- every tick --------------------------------------------------------------------------------------
    async def tick(self, gen: Generation, now: float) -> Optional[str]:
        """Look at every worker; act. Returns why the generation must be replaced, or None."""
        self.beats, views = await self.observe_async(gen)
        before, self.views = self.views, views
        current = {v.pid: v for v in views}
        dead = {pid for pid, beat in self.beats.items() if beat.get("stage") == "score" and not beat.get("alive")}
        if dead:
            self.report_lost(dead, self.beats, gen.number)
            # the generation's only ready workers died: nothing could answer until MOSEC replaced them, however
            # fast it did (the replacement may already be up at this tick)
            lost = [pid for pid in dead if self.beats.get(pid, {}).get("ready")]
            if lost and gen.booted and not any(v.ready and v.pid not in dead for v in before):
                self.outages.open(f"no score worker alive ({len(lost)} died)")
        # each kill is verified: the process must be gone (or a zombie MOSEC will reap) in time
        for pid, pk in list(self.pending.items()):
            v = current.get(pid)
            if v is None or v.status in GONE_STATUSES:
                del self.pending[pid]
                forget_worker(self.settings.worker_dir, pid)
                self.log.info("watchdog: %s worker %d is gone; waiting for MOSEC's replacement", pk.stage, pid)
            elif now > pk.deadline:
                del self.pending[pid]
                return f"{pk.stage} worker {pid} did not die after SIGKILL"
        for kill in self.policy.inspect(now, [v for v in views if v.pid not in self.pending]):
            await self.kill(gen, kill)
        if not gen.booted:
            return None
        # capacity: every stage back to its expected count within respawn_timeout_s, or a new generation
        for stage, c in self.capacity().items():
            if c["live"] >= c["expected"]:
                if self._short_since.pop(stage, None) is not None:
                    self.log.info("watchdog: %s workers back to %d of %d", stage, c["live"], c["expected"])
                continue
            since = self._short_since.setdefault(stage, now)
            if c["live"] == 0:  # nothing can answer until MOSEC replaces the worker: an outage, however short
                self.outages.open(f"no {stage} worker alive (MOSEC is replacing it)")
            if now - since > self.settings.respawn_timeout_s:
                return (f"{stage} workers at {c['live']} of {c['expected']} for over "
                        f"{self.settings.respawn_timeout_s:g}s: MOSEC did not replace them")
        return None

    def report_lost(self, dead: set[int], beats: dict[int, dict], number: int) -> None:
        """Workers ``dead`` died (or were killed) and MOSEC will never answer the envelopes they held. Each
        names the one it was scoring in its heartbeat: those envelopes' requests are sent again, each alone,
        and one that was already alone when a worker died with it is answered as poison (see
        ``FairScheduler.worker_lost``). A dead worker whose heartbeat names nothing may have taken an envelope
        between MOSEC's hand-over and its first heartbeat: then every envelope out is sent again."""
        held, unknown = set(), False
        for pid in dead:
            beat = beats.get(pid) or {}
            if pid not in self.pending:
                forget_worker(self.settings.worker_dir, pid)  # reported once; never mistaken for a live one
                if beat.get("ready"):  # one that never started took nothing with it: that is a boot failure
                    self.deaths += 1
                    self.metrics.count_worker_death()
            if beat.get("busy_since") and beat.get("envelope"):
                held.add(int(beat["envelope"]))
            elif beat.get("ready") and beat.get("generation") == number:
                unknown = True  # it may have died between MOSEC's hand-over and its first heartbeat
        if held:
            again, poisoned = self.front.worker_lost(held)
            self.metrics.count_resend("worker_lost", again)
            if poisoned:
                self.log.warning("watchdog: a request was alone in its envelope when a worker died with it a second"
                                 " time: it is answered 500 and quarantined")
        if unknown:
            self.metrics.count_resend("worker_lost", self.front.forgive())

    async def kill(self, gen: Generation, kill: Kill) -> None:
        self.log.warning("watchdog: %s -> kill", kill.reason)
        if kill.dump_stack:
            await self._dump_stack(gen, kill.pid)
        try:
            self.os.kill(kill.pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # gone already
        except OSError as exc:  # PermissionError: the pid now belongs to someone else's process; not ours to kill
            self.log.warning("watchdog: cannot kill %d (%s): it is not our worker any more", kill.pid, exc.strerror)
            return
        self.pending[kill.pid] = PendingKill(kill.pid, kill.stage, time.monotonic() + KILL_CONFIRM_S)
        self.kills += 1
        self.metrics.count_restart("worker")
        siblings = [v for v in self.views if v.stage == kill.stage and v.pid != kill.pid
                    and v.status not in STOPPED_STATUSES | GONE_STATUSES and v.pid not in self.pending]
        if not siblings:
            self.outages.open(f"{kill.reason}: no {kill.stage} worker left until it is replaced")
            if not self.keep_last_worker and gen is not None:
                gen.expect_exit()  # MOSEC ends when the last worker of a stage dies: this remediation, no crash

    async def _dump_stack(self, gen: Generation, pid: int) -> None:
        """Ask a hung worker for its Python stack (faulthandler on SIGUSR1) and give it a moment to print."""
        asked = time.monotonic()
        try:
            self.os.kill(pid, signal.SIGUSR1)
        except OSError:  # gone, or not ours any more (a reused pid): nothing to dump
            return
        deadline = asked + STACK_DUMP_WAIT_S
        while time.monotonic() < deadline:
            if gen.stack_seen > asked:
                await asyncio.sleep(0.1)  # the rest of the dump follows in the same burst
                return
            await asyncio.sleep(0.02)
        self.log.warning("watchdog: worker %d printed no stack within %.1fs", pid, STACK_DUMP_WAIT_S)
