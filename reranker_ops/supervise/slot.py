"""One served model, supervised on its own: its settings, its build, its MOSEC generation, the watch over its
workers, its canary, its restart budget and its reloads. A server of several models has one ``ModelSlot`` each
(``RERANKER_MODELS``); a model that cannot start or gives up is ``down`` (with why) and the others go on.

The supervisor turns the loop and owns what is the whole server's (the run dir, the front, signals, the state);
each tick it asks every slot to ``tick``. What a slot does when its generation fails is ``RestartPolicy``'s to
decide, as before; a restart's backoff is a time the slot waits for, not a sleep of the loop, so one model's
backoff never delays another's watchdog.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from pathlib import Path
from typing import Optional

from .canary import Canary, Outages
from .generation import Generation, generation_config
from .policy import RestartPolicy, WatchdogPolicy
from .reload import CHILD_TERM_GRACE, Reloader, served_precision
from .states import State
from .status import slot_verdict
from .workerwatch import WorkerWatch


class ModelSlot:
    def __init__(self, sup, settings, variant_dir: Optional[Path], model_name: str, *, key: str = "",
                 down: Optional[str] = None) -> None:
        from ..worker.app import keeps_last_worker, mosec_version  # noqa: I001 - neither imports MOSEC

        self.sup, self.settings, self.key, self.log = sup, settings, key, sup.log
        self.variant_dir = Path(variant_dir).resolve() if variant_dir is not None else None
        self.precision = served_precision(variant_dir, settings.precision) if variant_dir else settings.precision
        self.model_name = model_name
        self.watchdog = WatchdogPolicy(failures_needed=settings.probe_failures, hang_after_s=settings.worker_hang_s)
        self.restart_policy = RestartPolicy(start_attempts=settings.start_attempts,
                                            restart_budget=settings.restart_budget,
                                            restart_window_s=settings.restart_window_s)
        self.outages = Outages(self.log)
        self.canary = Canary(settings, self.watchdog, sup.metrics, self.log, self.outages,
                             lambda: sup.front.session, sup.probe_token, sup.status.ping,
                             model=lambda: self.model_name)
        self.watch = WorkerWatch(settings, self.watchdog, None, sup.metrics, self.log, self.outages,
                                 keeps_last_worker(mosec_version()))
        self.reloader = Reloader(self, self.log)
        self.gen: Optional[Generation] = None
        self.down = down  # why this model gave up; None while it serves or tries to
        self.restarting: Optional[str] = None  # the cause, while a new generation waits for its backoff
        self._restart_at = 0.0
        self.server_restarts = 0
        self.tail: deque[str] = deque(maxlen=200)  # its MOSEC's last lines, for the reasons of failures

    # what the reloader reads of whoever it reloads (the slot, for one model)
    builds = property(lambda self: self.sup.builds)
    front = property(lambda self: self.sup.front)
    status = property(lambda self: self.sup.status)
    stop_requests = property(lambda self: self.sup.stop_requests)

    def names(self) -> list[str]:
        """What a request's ``model`` may say for this model: its name, then its aliases."""
        return [self.model_name, *(a for a in self.settings.served_models if a != self.model_name)]

    def verdict(self) -> tuple[State, str]:
        return slot_verdict(self.gen, self.canary, self.watch.capacity(), self.restarting, self.down)

    # --- generations -------------------------------------------------------------------------------------
    async def spawn(self, variant_dir: Path, model_name: str) -> Generation:
        """Start a MOSEC generation of this model (not yet the one the gate sends to)."""
        sup = self.sup
        sup.generations += 1
        self.settings.worker_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config_path, folder = sup.rundir.generation_paths(sup.generations)
        config = generation_config(self.settings, sup.generations, folder, variant_dir, model_name,
                                   self.watch.keep_last_worker)
        gen = await Generation.spawn(config, config_path, variant_dir, sup.instance, dict(sup.environ),
                                     self.settings.run_dir, self.settings.startup_timeout_s, self.log, self.tail,
                                     on_exit=sup.wake)
        sup.gen_pids.add(gen.pid)
        return gen

    async def stop_generation(self, gen: Generation, grace: float) -> None:
        await gen.stop(grace, f"{self.sup.instance}.{gen.number}")
        self.sup.rundir.forget_generation(gen.number)

    async def drain_and_stop(self, gen: Generation) -> None:
        """A generation the gate no longer sends to: its requests in flight answered (within the deadline), then
        stopped (a reload's old one, a removed model's)."""
        gen.expect_exit()
        deadline = time.monotonic() + self.settings.request_timeout_s + 2
        while self.sup.front.upstream_in_flight(gen.number) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop_generation(gen, grace=CHILD_TERM_GRACE)

    async def start(self) -> None:
        if self.down is None and self.variant_dir is not None:
            self.sup.builds.hold(self.variant_dir)
            self.gen = await self.spawn(self.variant_dir, self.model_name)

    async def give_up(self, why: str) -> None:
        """This model is down until a reload brings it back; its generation (if any) is stopped."""
        self.down, self.restarting = why, None
        self.log.error("model %s is down: %s", self.model_name, why)
        if self.gen is not None:
            await self.stop_generation(self.gen, grace=0.2)

    async def fail_generation(self, cause: str, *, ever_ready: bool, ours: bool = False) -> None:
        """RestartPolicy decides: a new generation (after its backoff), or give up."""
        verdict = self.restart_policy.failure(cause, time.monotonic(), ever_ready=ever_ready, ours=ours)
        if not verdict.restart:
            await self.give_up(verdict.fatal)
            return
        self.restarting = cause
        self.server_restarts += 1
        self.sup.metrics.count_restart("server")
        self.outages.open(cause)
        if self.gen is not None:
            await self.stop_generation(self.gen, grace=1.0)
        if verdict.delay:
            self.log.info("restarting MOSEC of %s in %.1fs", self.model_name, verdict.delay)
        self._restart_at = time.monotonic() + verdict.delay
        self.sup.status.derive(self.sup.verdicts())

    async def _restart_now(self) -> None:
        self.watch.reset()
        self.canary.reset()
        self.restarting = None
        self.gen = await self.spawn(self.variant_dir, self.model_name)
        self.log.info("MOSEC generation %d of %s starting", self.gen.number, self.model_name)

    # --- every tick ----------------------------------------------------------------------------------------
    async def tick(self, now: float) -> None:
        """Look at this model's generation and workers; act (a restart, a kill, giving up)."""
        if self.down is not None:
            return
        if self.restarting is not None:
            if now >= self._restart_at and not self.sup.stop_requests:
                await self._restart_now()
            return
        gen = self.gen
        if gen is None:
            return
        if gen.gone():  # MOSEC exited unasked: a crash, whatever the code (unless it was our remediation)
            cause = await gen.collect_exit()
            await self.watch.generation_died(gen.number)
            await self.fail_generation(cause, ever_ready=self.canary.ever_ready, ours=gen.expected_exit)
            return
        fatal = self.canary.collect(gen)
        if fatal:
            await self.give_up(fatal)
            return
        why = await self.watch.tick(gen, now)  # a kill that did not take, workers that did not come back
        if self not in self.sup.slots:
            return  # retired by a reload while the watch looked: the reload stops its generation, not a restart
        ever_ready = True  # those are restarts of a booted generation: the restart budget's
        if why is None and not gen.booted:
            why, ever_ready = self.watch.boot_check(gen, now), self.canary.ever_ready
        elif why is None:
            why = self.watchdog.wedged(now, self.watch.views)
        if why:
            self.log.warning("watchdog: %s -> restart MOSEC", why)
            await self.fail_generation(why, ever_ready=ever_ready)
            return
        if self.gen is gen:
            self.canary.maybe_start(now, self.sup.wake)
