"""The supervisor: one asyncio process, no model in it (gunicorn's arbiter, uvicorn's Server).

``run``: ``startup`` (the run lock, what a dead server left, MOSEC spawned, then the front opened while the model
compiles), the loop, ``shutdown`` (drain, stop MOSEC), ``cleanup``. Signal handlers only queue; ``tick`` turns every
``TICK_S`` and acts: the queued signals (one ``handle_<signal>`` each), a generation that exited, the canary's last
result, every worker (``WorkerWatch``), the boot deadline and the "wedged" rule, the state. What to do when a
generation fails is ``RestartPolicy``'s to decide; each part lives in its own module of this package:

    rundir (lock, pidfile, state, leftovers)   generation (a MOSEC tree and its state)   workerwatch (every worker)
    policy (kill? restart or give up?)         canary (probes, outages)                  reload (a new generation)
    status (state machine, sd_notify, state.json)   view (what the front reads)

All times are monotonic. An unexpected exception ends in state ``failed``, its traceback in the log.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import secrets
import signal
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import ServerStartError
from ..startup import frozen_imports
from .canary import Canary, Outages
from .generation import Generation, generation_config
from .policy import RestartPolicy, WatchdogPolicy
from .procs import kill_instance, reap_orphans
from .reload import CHILD_TERM_GRACE, Builds, Reloader, served_precision
from .report import pidfile_data, state_data
from .rundir import RunDir
from .sdnotify import Notifier
from .states import State
from .status import Status
from .view import SupervisorView
from .workerwatch import WorkerWatch

if TYPE_CHECKING:  # the HTTP side is imported by startup, once MOSEC is on its way
    from ..front.front import Front

TICK_S = 0.25


class Supervisor:
    def __init__(self, settings, variant_dir: Path, model_name: str, notifier: Notifier,
                 log: Optional[logging.Logger] = None, argv: Optional[list[str]] = None) -> None:
        from ..front.metrics import Metrics
        from ..worker.app import keeps_last_worker, mosec_version  # noqa: I001 - neither imports MOSEC

        s = self.settings = settings
        self.variant_dir = Path(variant_dir).resolve()  # the build the pointer names now: convert moves pointers
        self.precision = served_precision(variant_dir, settings.precision)
        self.model_name, self.notifier, self.argv = model_name, notifier, argv
        self.log = log or logging.getLogger("rerankctl")
        self.instance, self.probe_token = uuid.uuid4().hex, secrets.token_hex(16)
        self.metrics = Metrics()
        self.rundir = RunDir(s, self.instance)
        self.builds = Builds()
        self.watchdog = WatchdogPolicy(failures_needed=s.probe_failures, hang_after_s=s.worker_hang_s)
        self.restart_policy = RestartPolicy(start_attempts=s.start_attempts, restart_budget=s.restart_budget,
                                            restart_window_s=s.restart_window_s)
        self.outages = Outages(self.log)
        self.status = Status(notifier, self.log, lambda: f"{self.model_name} on {s.host}:{s.port}",
                             lambda: self.rundir.publish(state_data(self), self.log))
        self.sm = self.status.sm
        self.canary = Canary(s, self.watchdog, self.metrics, self.log, self.outages, lambda: self.front.session,
                             self.probe_token, self.status.ping)
        self.watch = WorkerWatch(s, self.watchdog, None, self.metrics, self.log, self.outages,
                                 keeps_last_worker(mosec_version()))
        self.reloader = Reloader(self, self.log)
        self.front: Optional[Front] = None
        self.gen: Optional[Generation] = None
        self.generations = self.server_restarts = self.stop_requests = 0
        self.fatal: Optional[str] = None
        self.started_at, self.started_mono, self.loop_tick = time.time(), time.monotonic(), 0.0
        self.tail: deque[str] = deque(maxlen=200)  # MOSEC's last lines, for the reasons of failures
        self._signals: deque[int] = deque()
        self._wake: Optional[asyncio.Event] = None
        self._gen_pids: set[int] = set()
        self._stop_deadline_s = s.stop_timeout_s

    restarts = property(lambda self: {"worker": self.watch.kills, "server": self.server_restarts})

    # --- life ------------------------------------------------------------------------------------------
    async def run(self) -> int:
        faulthandler.enable(all_threads=True)  # SIGABRT (systemd's watchdog) or a crash: every stack, to stderr
        self._wake = asyncio.Event()
        self.rundir.take()  # or AlreadyRunning
        try:
            await self.startup()
            try:
                while not await self.tick():
                    await self.sleep(TICK_S)
            except Exception as exc:  # noqa: BLE001 - a crash must end in 'failed', its cause in the log
                self.log.exception("the supervisor crashed")
                self.fatal = f"the supervisor crashed: {type(exc).__name__}: {exc}"
            await self.shutdown()
        finally:
            await self.cleanup()
        if self.fatal:
            self.log.error("giving up: %s", self.fatal)
            raise ServerStartError(self.fatal, "see the log: rerankctl logs; fix the cause, then serve again")
        return 0

    async def startup(self) -> None:
        self.rundir.reap_previous(self.log)  # we hold the lock: a recorded server is dead
        self.rundir.prepare()
        self.builds.hold(self.variant_dir)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # MOSEC first: its interpreters start and the model compiles on the other core while this process
        # imports its HTTP side and binds its ports
        self.gen = await self.spawn(self.variant_dir, self.model_name)
        with frozen_imports():  # they live as long as the supervisor
            from ..front.front import Front
        view = SupervisorView(self)
        self.front = Front(self.settings, self.metrics, self.log, self.probe_token, view)
        self.watch.front = self.front
        await self.front.start()
        self.rundir.write_pidfile(pidfile_data(self))
        self.status.publish()

    async def tick(self) -> bool:
        """One turn of the loop; True when it is time to stop."""
        now = self.loop_tick = time.monotonic()
        self.handle_signals()
        if self.stop_requests or self.fatal:
            return True
        if not self.rundir.lock_is_here():
            self.restore_run_dir()
        gen = self.gen
        if self.fatal or gen is None:
            return True
        if gen.gone():  # MOSEC exited unasked: a crash, whatever the code (unless it was our remediation)
            cause = await gen.collect_exit()
            await self.watch.generation_died(gen.number)
            await self.fail_generation(cause, ever_ready=self.canary.ever_ready, ours=gen.expected_exit)
            return False
        self.fatal = self.canary.collect(gen)
        if self.fatal:
            return True
        why = await self.watch.tick(gen, now)  # a kill that did not take, workers that did not come back
        ever_ready = True  # those are restarts of a booted generation: the restart budget's
        if why is None and not gen.booted:
            why, ever_ready = self.watch.boot_check(gen, now), self.canary.ever_ready
        elif why is None:
            why = self.watchdog.wedged(now, self.watch.views)
        if why:
            self.log.warning("watchdog: %s -> restart MOSEC", why)
            await self.fail_generation(why, ever_ready=ever_ready)
            return bool(self.fatal)
        if self.fatal or self.gen is not gen:
            return bool(self.fatal)
        self.status.derive(gen, self.canary, self.watch.capacity())
        if os.getpid() == 1:
            reap_orphans(self._gen_pids)
        self.canary.maybe_start(now, self.wake)
        self.status.publish_due(now)
        return False

    # --- signals: the handlers only queue, the loop acts (one handle_<signal> each) --------------------
    def _on_signal(self, sig: int) -> None:
        self._signals.append(sig)
        self.wake()

    def handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.popleft()
            {signal.SIGTERM: self.handle_sigterm, signal.SIGINT: self.handle_sigint,
             signal.SIGHUP: self.handle_sighup}[sig]()

    def handle_sigterm(self) -> None:
        """Stop: drain, then MOSEC. ``rerankctl stop --timeout S`` left its deadline in a request file."""
        self.stop_requests += 1
        self._stop_deadline_s = self.rundir.stop_deadline(os.getpid()) or self._stop_deadline_s
        self.log.info("received SIGTERM%s", " again: stopping now" if self.stop_requests > 1 else "")

    handle_sigint = handle_sigterm

    def handle_sighup(self) -> None:
        """Reload (``rerankctl reload`` left what to load in a request file)."""
        refuse = None
        if not self.canary.ever_ready or self.sm.state in (State.STOPPING, State.RESTARTING):
            refuse = f"cannot reload while {self.sm.state}"
        self.reloader.ask(self.rundir.take_request("reload-request.json"), refuse)

    # --- generations -------------------------------------------------------------------------------------
    async def spawn(self, variant_dir: Path, model_name: str) -> Generation:
        """Start a MOSEC generation (not yet the one the gate sends to)."""
        self.generations += 1
        config_path, folder = self.rundir.generation_paths(self.generations)
        config = generation_config(self.settings, self.generations, folder, variant_dir, model_name,
                                   self.watch.keep_last_worker)
        gen = await Generation.spawn(config, config_path, variant_dir, self.instance, dict(os.environ),
                                     self.settings.run_dir, self.settings.startup_timeout_s, self.log, self.tail,
                                     on_exit=self.wake)
        self._gen_pids.add(gen.pid)
        return gen

    async def stop_generation(self, gen: Generation, grace: float) -> None:
        await gen.stop(grace, f"{self.instance}.{gen.number}")
        self.rundir.forget_generation(gen.number)

    async def fail_generation(self, cause: str, *, ever_ready: bool, ours: bool = False) -> None:
        """RestartPolicy decides: a new generation (after its backoff), or give up."""
        verdict = self.restart_policy.failure(cause, time.monotonic(), ever_ready=ever_ready, ours=ours)
        if not verdict.restart:
            self.fatal = verdict.fatal
            return
        self.sm.to(State.RESTARTING, cause)
        self.server_restarts += 1
        self.metrics.count_restart("server")
        self.outages.open(cause)
        if self.gen is not None:
            await self.stop_generation(self.gen, grace=1.0)
        if verdict.delay:
            self.log.info("restarting MOSEC in %.1fs", verdict.delay)
            await self.sleep(verdict.delay)
        self.handle_signals()
        if self.stop_requests:
            return
        self.watch.reset()
        self.canary.reset()
        self.gen = await self.spawn(self.variant_dir, self.model_name)
        self.sm.to(State.DEGRADED if self.canary.ever_ready else State.STARTING,
                   f"MOSEC generation {self.generations} starting")

    def restore_run_dir(self) -> None:
        """The run dir (or its lock) was removed under the running server (a cleanup of /run/user or /tmp, an
        rm): put back what says that it runs here, and move MOSEC (whose sockets were there) to a new
        generation by a reload, which drops no request. When that cannot be done, stop, touching nothing."""
        self.fatal = self.rundir.restore(self.log, pidfile_data(self))
        if self.fatal:
            return
        self.status.publish()
        if self.canary.ever_ready and not self.reloader.running and self.sm.state not in (State.STOPPING,
                                                                                            State.RESTARTING):
            self.reloader.ask({"id": "run-dir-restored"})
        # else: one booting or restarting now is replaced (into the restored dir) by the boot deadline

    # --- stopping ----------------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        front = self.front
        if not self.sm.terminal and self.sm.state != State.STOPPING:
            self.sm.to(State.STOPPING, f"draining {front.taken if front else 0} request(s)")
        # leave room after the drain for stopping MOSEC within the caller's deadline
        t_end = time.monotonic() + self._stop_deadline_s
        deadline = t_end - min(CHILD_TERM_GRACE + 1.0, max(1.0, self._stop_deadline_s / 3))
        if front is not None and await front.drained(deadline, self._stop_again):
            self.log.warning("stopping with %d request(s) still in flight", front.taken)
        self.canary.cancel()
        await self.reloader.cancel()
        if self.gen is not None:
            # drained: nothing of a client's is left in MOSEC, so there is nothing to wait for
            idle = front is None or front.taken == 0
            grace = 0.2 if self.stop_requests > 1 or idle else max(0.2, min(CHILD_TERM_GRACE,
                                                                             t_end - time.monotonic() - 0.5))
            await self.stop_generation(self.gen, grace=grace)

    async def cleanup(self) -> None:
        try:
            if self.gen is not None:
                await self.stop_generation(self.gen, grace=0.2)
            await asyncio.get_running_loop().run_in_executor(None, kill_instance, self.instance)
        except Exception:  # noqa: BLE001 - cleanup must go on
            self.log.exception("while stopping MOSEC")
        if self.front is not None:  # None when the start failed before the front was opened
            await self.front.close()
        self.status.finish(self.fatal)
        self.rundir.close(os.getpid())

    def _stop_again(self) -> bool:
        """A second SIGTERM came: stop now, drained or not."""
        self.handle_signals()
        return self.stop_requests > 1

    # --- waiting -----------------------------------------------------------------------------------------
    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass or something happens (a signal, MOSEC exits, a probe ends)."""
        assert self._wake is not None
        self._wake.clear()
        if self._signals:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

