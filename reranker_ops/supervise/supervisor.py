"""The supervisor: one asyncio process, no model in it (gunicorn's arbiter, uvicorn's Server).

``run``: ``startup`` (the run lock, what a dead server left, MOSEC spawned, then the front opened while the model
compiles), the loop, ``shutdown`` (drain, stop MOSEC), ``cleanup``. Signal handlers only queue; ``tick`` turns every
``TICK_S`` and acts: the queued signals (one ``handle_<signal>`` each), then each served model's ``ModelSlot``
(``slot.py``: a generation that exited, the canary's last result, every worker, the boot deadline and the "wedged"
rule), then the server's state from its models'. The server gives up only when every model has. What to do when a
generation fails is ``RestartPolicy``'s to decide; each part lives in its own module of this package:

    rundir (lock, pidfile, state, leftovers)   slot (one model: its generation, watch, canary, restarts, reloads)
    generation (a MOSEC tree and its state)    workerwatch (every worker)     policy (kill? restart or give up?)
    canary (probes, outages)    reload (a new generation)    models (reloads of several models, of the list)
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
from .procs import kill_instance, reap_orphans
from .reload import CHILD_TERM_GRACE, Builds
from .report import pidfile_data, state_data
from .rundir import RunDir
from .sdnotify import Notifier
from .slot import ModelSlot
from .states import State
from .status import Status
from .view import SupervisorView

if TYPE_CHECKING:  # the HTTP side is imported by startup, once MOSEC is on its way
    from ..front.front import Front

TICK_S = 0.25


class Supervisor:
    def __init__(self, settings, variant_dir: Optional[Path], model_name: Optional[str], notifier: Notifier,
                 log: Optional[logging.Logger] = None, argv: Optional[list[str]] = None) -> None:
        """``variant_dir``, ``model_name``: the default model's build and name (the first of RERANKER_MODELS)."""
        from ..front.metrics import Metrics

        s = self.settings = settings
        self.notifier, self.argv = notifier, argv
        self.log = log or logging.getLogger("rerankctl")
        self.instance, self.probe_token = uuid.uuid4().hex, secrets.token_hex(16)
        self.metrics = Metrics()
        self.rundir = RunDir(s, self.instance)
        self.builds = Builds()
        self.environ = os.environ  # what each generation's environment is made from (child_environment)
        self.status = Status(notifier, self.log, lambda: f"{', '.join(self.served())} on {s.host}:{s.port}",
                             lambda: self.rundir.publish(state_data(self), self.log))
        self.sm = self.status.sm
        self.front: Optional[Front] = None
        self.generations = self.stop_requests = 0
        self.slots = [self.new_slot(spec, i == 0, variant_dir if i == 0 else None, model_name if i == 0 else None)
                      for i, spec in enumerate(s.model_specs())]
        self.models_reload: Optional[dict] = None  # the last reload of several models or of the list
        self.fatal: Optional[str] = None
        self.started_at, self.started_mono, self.loop_tick = time.time(), time.monotonic(), 0.0
        self._signals: deque[int] = deque()
        self._wake: Optional[asyncio.Event] = None
        self.gen_pids: set[int] = set()
        self._stop_deadline_s = s.stop_timeout_s

    def new_slot(self, spec, first: bool, variant_dir: Optional[Path] = None, name: Optional[str] = None,
                 settings=None) -> ModelSlot:
        """A model's room (not started): its build found now, or the slot is down from the start with why (in a
        server of several; one model alone was found by ``serve`` before it started)."""
        from ..models.store import find_variant, resolve_model

        settings = settings or self.settings
        mine = settings.for_model(spec, first=first)
        down = None
        if variant_dir is None:
            name = name or os.path.basename(spec.model.rstrip("/")) if spec.model.startswith(("/", ".", "~")) \
                else spec.model  # until it is found: a folder's name, as it would be served
            try:
                name = resolve_model(mine).name
                variant_dir = find_variant(mine)
            except Exception as exc:  # noqa: BLE001 - a model that cannot be found is down; the others serve
                down = f"{getattr(exc, 'message', None) or exc}"
        return ModelSlot(self, mine, variant_dir, name, key=spec.key, down=down)

    # the default model's parts: what a server of one model always had
    gen = property(lambda self: self.slots[0].gen, lambda self, gen: setattr(self.slots[0], "gen", gen))
    watch = property(lambda self: self.slots[0].watch)
    canary = property(lambda self: self.slots[0].canary)
    reloader = property(lambda self: self.slots[0].reloader)
    model_name = property(lambda self: self.slots[0].model_name)
    precision = property(lambda self: self.slots[0].precision)
    variant_dir = property(lambda self: self.slots[0].variant_dir)
    restarts = property(lambda self: {"worker": sum(sl.watch.kills for sl in self.slots),
                                      "server": sum(sl.server_restarts for sl in self.slots)})

    def served(self) -> list[str]:
        return [sl.model_name for sl in self.slots if sl.down is None]

    def verdicts(self) -> list:
        return [(sl.model_name, *sl.verdict(), sl.canary.ever_ready) for sl in self.slots]

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
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # MOSEC first: its interpreters start and the model compiles on the other core while this process
        # imports its HTTP side and binds its ports
        for slot in self.slots:
            await slot.start()
        with frozen_imports():  # they live as long as the supervisor
            from ..front.front import Front
        view = SupervisorView(self)
        self.front = Front(self.settings, self.metrics, self.log, self.probe_token, view)
        for slot in self.slots:
            slot.watch.front = self.front.path(slot.key)  # where its workers' lost envelopes are reported
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
        if self.fatal:
            return True
        for slot in list(self.slots):  # each model on its own: one's failure is its own to heal or give up
            if slot not in self.slots:
                continue  # retired by a reload (``models.py``) while an earlier model's tick awaited
            await slot.tick(now)
            if self.stop_requests:
                return True
        down = [sl for sl in self.slots if sl.down is not None]
        if len(down) == len(self.slots) and not any(sl.reloader.running for sl in down):
            self.fatal = down[0].down if len(down) == 1 else "every model is down: " + "; ".join(
                f"{sl.model_name}: {sl.down}" for sl in down)
            return True
        verdicts = self.verdicts()
        self.status.derive(verdicts)
        self.status.serving_ready(verdicts)
        if os.getpid() == 1:
            reap_orphans(self.gen_pids)
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
        """Reload (``rerankctl reload`` left what to load in a request file): one model's generation, every
        model's one after the other, or the list of models (``models``: added, removed, changed)."""
        from .models import models_reload, reload_each, report_reload, slots_for

        request = self.rundir.take_request("reload-request.json")
        if "models" in request:
            asyncio.ensure_future(models_reload(self, request))
            return
        slots, why = slots_for(self, request.get("model"))
        if (self.models_reload or {}).get("state") == "in_progress":
            why = "a reload of the models is in progress"
        if why:
            report_reload(self, request.get("id"), "refused", why)
        elif len(slots) == 1:
            slot = slots[0]
            if self.settings.several_models:  # named by its alias or its spec: that model, from its pointer
                request = {k: v for k, v in request.items() if k != "model"}
            refuse = None
            if slot.down is None and (not slot.canary.ever_ready or slot.restarting is not None
                                      or self.sm.state in (State.STOPPING, State.RESTARTING)):
                refuse = f"cannot reload while {self.sm.state if len(self.slots) == 1 else slot.verdict()[0]}"
            slot.reloader.ask(request, refuse)
        else:
            asyncio.ensure_future(reload_each(self, slots, request))

    def restore_run_dir(self) -> None:
        """The run dir (or its lock) was removed under the running server (a cleanup of /run/user or /tmp, an
        rm): put back what says that it runs here, and move MOSEC (whose sockets were there) to a new
        generation by a reload, which drops no request. When that cannot be done, stop, touching nothing."""
        self.fatal = self.rundir.restore(self.log, pidfile_data(self))
        if self.fatal:
            return
        self.status.publish()
        for slot in self.slots:
            if (slot.down is None and slot.canary.ever_ready and not slot.reloader.running
                    and slot.restarting is None and self.sm.state != State.STOPPING):
                slot.reloader.ask({"id": "run-dir-restored"})
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
        for slot in self.slots:
            slot.canary.cancel()
            await slot.reloader.cancel()
        # drained: nothing of a client's is left in MOSEC, so there is nothing to wait for
        idle = front is None or front.taken == 0
        grace = 0.2 if self.stop_requests > 1 or idle else max(0.2, min(CHILD_TERM_GRACE,
                                                                         t_end - time.monotonic() - 0.5))
        await asyncio.gather(*(slot.stop_generation(slot.gen, grace=grace) for slot in self.slots
                               if slot.gen is not None))

    async def cleanup(self) -> None:
        try:
            for slot in self.slots:
                if slot.gen is not None:
                    await slot.stop_generation(slot.gen, grace=0.2)
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

