"""The supervisor: one asyncio process, no model in it.

It holds the run lock for its whole life, serves the API gate and the health port, runs MOSEC as a child
in its own process group, probes it with real rerank requests and heals it: kills hung workers, restarts
a crashed or wedged server with backoff, and gives up (exit non-zero, with the reason) when a budget of
restarts is spent or the server never manages to boot. Signals only set a flag; the main loop acts.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Optional

import aiohttp
import psutil
from aiohttp import web

from .. import __version__
from ..config import Settings
from ..errors import AlreadyRunning, PortInUse, ServerStartError
from ..health.probe import CANARY, PROBE_HEADER, ProbeResult, judge
from ..health.server import Health
from ..health.watchdog import WatchdogPolicy, WorkerView
from ..metrics import Metrics
from ..models.store import write_json_atomic
from ..serving.engine import read_variant_manifest
from ..serving.gate import Gate
from ..serving.heartbeat import read_worker_dir
from .runstate import (
    INSTANCE_ENV,
    RunLock,
    kill_instance,
    read_pidfile,
    remove_pidfile_if_ours,
    write_pidfile,
)
from .sdnotify import Notifier

STARTUP_PROBE_INTERVAL = 0.05
CHILD_TERM_GRACE = 3.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_owner(port: int) -> str:
    """'pid 123 (nginx)' for whoever listens on ``port``, when the OS lets us see it."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                try:
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except (psutil.Error, OSError):
        pass
    return "another program"


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        variant_dir: Path,
        model_name: str,
        notifier: Notifier,
        log: Optional[logging.Logger] = None,
        argv: Optional[list[str]] = None,
    ) -> None:
        self.settings = settings
        self.variant_dir = Path(variant_dir)
        self.model_name = model_name
        self.notifier = notifier
        self.log = log or logging.getLogger("rerankctl")
        self.argv = argv or sys.argv
        self.instance = uuid.uuid4().hex
        self.metrics = Metrics()
        self.policy = WatchdogPolicy(
            failures_needed=settings.probe_failures,
            hang_after_s=settings.worker_hang_s,
            restart_budget=settings.restart_budget,
            restart_window_s=settings.restart_window_s,
        )
        self.health = Health(self)
        self.gate = Gate(self)
        self.started_at = time.time()
        self.loop_tick = time.time()
        self.state = "starting"
        self.reason = "loading the model"
        self.last_probe: Optional[ProbeResult] = None
        self.ever_ready = False
        self.start_failures = 0
        self.boot_wrong_answers = 0
        self.restarts = {"worker": 0, "server": 0}
        self.outages: deque[dict] = deque(maxlen=20)
        self._outage: Optional[dict] = None
        self.child: Optional[asyncio.subprocess.Process] = None
        self.child_started = 0.0
        self.mosec_port: Optional[int] = None
        self.tail: deque[str] = deque(maxlen=200)
        self.stop_event = asyncio.Event()
        self.stop_signals = 0
        self.fatal: Optional[str] = None
        self._expected_exit_until = 0.0
        self._runners: list[web.AppRunner] = []
        self._lock = RunLock(settings.lock_path)
        self._reader: Optional[asyncio.Task] = None

    # --- views used by gate and health -------------------------------------------------------------------
    @property
    def upstream_base(self) -> Optional[str]:
        if self.child is None or self.child.returncode is not None or self.mosec_port is None:
            return None
        return f"http://127.0.0.1:{self.mosec_port}"

    @property
    def upstream_url(self) -> Optional[str]:
        base = self.upstream_base
        return f"{base}/score" if base else None

    def _heartbeats(self) -> dict[int, dict]:
        return read_worker_dir(self.settings.worker_dir)

    def scored_totals(self) -> tuple[int, int]:
        pairs = tokens = 0
        for beat in self._heartbeats().values():
            if beat.get("stage") == "score":
                pairs += int(beat.get("pairs", 0))
                tokens += int(beat.get("tokens", 0))
        return pairs, tokens

    def processes(self) -> list[tuple[psutil.Process, str]]:
        """Every process of the running MOSEC tree with its role: main, controller, validate, score."""
        if self.child is None or self.child.returncode is not None:
            return []
        beats = self._heartbeats()
        try:
            main = psutil.Process(self.child.pid)
            tree = [main] + main.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in tree:
            if p.pid == main.pid:
                role = "main"
            elif p.pid in beats:
                role = beats[p.pid].get("stage", "worker")
            else:
                try:
                    role = "controller" if "mosec" in os.path.basename(p.exe()) else "helper"
                except psutil.Error:
                    role = "helper"
            out.append((p, role))
        return out

    def _mosec_gone(self) -> bool:
        """MOSEC's main process has died, even if asyncio has not reported its exit yet."""
        if self.child is None or self.child.returncode is not None:
            return True
        try:
            return psutil.Process(self.child.pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def worker_views(self) -> list[WorkerView]:
        beats = self._heartbeats()
        views = []
        for proc, role in self.processes():
            try:
                status = proc.status()
            except psutil.NoSuchProcess:
                continue
            beat = beats.get(proc.pid, {})
            views.append(WorkerView(proc.pid, role, status, beat.get("busy_since"), beat.get("progress_at")))
        return views

    def worker_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _proc, role in self.processes():
            if role in ("score", "validate"):
                counts[role] = counts.get(role, 0) + 1
        return counts

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def run(self) -> int:
        if not self._lock.acquire():
            info, _ = read_pidfile(self.settings.pidfile_path)
            where = f" (pid {info.pid}, port {info.data.get('port')})" if info else ""
            raise AlreadyRunning(f"a server is already running{where}", "see: rerankctl status; stop it with: rerankctl stop")
        try:
            self._reap_previous()
            self._prepare_dirs()
            await self._bind()
            self._write_pidfile()
            self._install_signals()
            self._publish()
            await self._start_child()
            await self._main_loop()
            await self._shutdown()
        finally:
            await self._cleanup()
        if self.fatal:
            self.log.error("giving up: %s", self.fatal)
            raise ServerStartError(self.fatal, "see the log: rerankctl logs; fix the cause, then serve again")
        return 0

    def _reap_previous(self) -> None:
        """We hold the lock, so any recorded server is dead: kill what its supervisor left behind."""
        info, why = read_pidfile(self.settings.pidfile_path)
        if info is not None:
            killed = kill_instance(info.instance)
            if killed:
                self.log.warning("killed %d leftover process(es) of a dead server: %s", len(killed), killed)
            self.log.info("replacing a stale pidfile (pid %s)", info.pid)
        elif why not in ("missing", None):
            self.log.info("replacing a %s pidfile", why)

    def _prepare_dirs(self) -> None:
        s = self.settings
        s.run_dir.mkdir(parents=True, exist_ok=True)
        for d in (s.worker_dir, s.mosec_dir):
            d.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():
                if f.is_file():
                    f.unlink(missing_ok=True)

    async def _bind(self) -> None:
        s = self.settings
        await self.gate.start()
        for app, port, what in ((self.gate.app(), s.port, "API"), (self.health.app(), s.health_port, "health")):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, s.host, port, reuse_address=True, backlog=1024)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"{what} port {port} on {s.host} is already in use by {port_owner(port)}",
                        f"stop that program or choose another port (--{'port' if what == 'API' else 'health-port'})",
                    ) from None
                raise ServerStartError(f"cannot listen on {s.host}:{port}: {exc.strerror}", "check --host") from None
            self._runners.append(runner)

    def _write_pidfile(self) -> None:
        me = psutil.Process()
        s = self.settings
        write_pidfile(
            s.pidfile_path,
            {
                "pid": me.pid,
                "create_time": me.create_time(),
                "pgid": os.getpgid(0),
                "instance": self.instance,
                "host": s.host,
                "port": s.port,
                "health_port": s.health_port,
                "model": self.model_name,
                "precision": s.precision,
                "variant_dir": str(self.variant_dir),
                "version": __version__,
                "argv": self.argv,
                "log": str(s.log_path),
                "started_at": self.started_at,
            },
        )

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)

    def _on_signal(self, sig: int) -> None:
        # Only record; the main loop acts. A second signal skips the drain.
        self.stop_signals += 1
        self.log.info("received %s%s", signal.Signals(sig).name, " again: stopping now" if self.stop_signals > 1 else "")
        self.stop_event.set()

    # --- the MOSEC child ---------------------------------------------------------------------------------
    def _child_config(self) -> Path:
        s = self.settings
        manifest = read_variant_manifest(self.variant_dir)
        self.mosec_port = free_port()
        cfg = {
            "variant_dir": str(self.variant_dir),
            "model_name": self.model_name,
            "threads": s.effective_threads(),
            "pin_threads": s.pin_threads,
            "token_budget": s.token_budget,
            "max_length": s.max_length,
            "model_max_length": manifest.get("max_length"),
            "limits": {"max_documents": s.max_documents, "max_document_chars": s.max_document_chars},
            "worker_dir": str(s.worker_dir),
            "workers": s.workers,
            "validate_workers": 1,
            "max_batch_requests": s.max_batch_requests,
            "mosec": {
                "address": "127.0.0.1",
                "port": self.mosec_port,
                "timeout_ms": int(s.request_timeout_s * 1000),
                "capacity": s.queue_capacity,
                "path": str(s.mosec_dir),
                "wait_ms": s.batch_wait_ms,
                # The gate enforces the user's limit; MOSEC gets room for the route tag.
                "max_request_size": s.max_body_bytes + 64,
                "log_level": "debug" if s.debug else "info",
            },
        }
        path = s.run_dir / "mosec-config.json"
        write_json_atomic(path, cfg)
        return path

    async def _start_child(self) -> None:
        cfg_path = self._child_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOSEC_") and k != "NOTIFY_SOCKET"}
        env[INSTANCE_ENV] = self.instance
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reranker_ops.serving.app", str(cfg_path), str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop kills the whole group
            env=env,
            cwd=str(self.settings.run_dir),
        )
        self.child_started = time.time()
        self.log.info("started MOSEC (pid %d, internal port %d)", self.child.pid, self.mosec_port)
        self._reader = asyncio.create_task(self._read_child(self.child))

    async def _read_child(self, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None
        while True:
            try:
                line = await child.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            self.log.info("mosec: %s", text)

    def _last_error(self) -> str:
        for line in reversed(self.tail):
            stripped = line.strip()
            if not stripped:
                continue
            head = stripped.split(":", 1)[0]
            if head.endswith(("Error", "Exception")) or "error" in head.lower():
                return stripped[:300]
        return self.tail[-1][:300] if self.tail else "no output"

    async def _stop_child(self, grace: float = CHILD_TERM_GRACE) -> None:
        """SIGTERM MOSEC's main process, wait ``grace``, then SIGKILL its group and every marked process."""
        child = self.child
        if child is None:
            return
        if child.returncode is None:
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(child.wait(), timeout=max(0.1, grace))
            except asyncio.TimeoutError:
                self.log.warning("MOSEC did not stop within %.1fs: killing its process group", grace)
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        await asyncio.get_running_loop().run_in_executor(None, kill_instance, self.instance)
        if child.returncode is None:
            try:
                await asyncio.wait_for(child.wait(), timeout=5)
            except asyncio.TimeoutError:
                pass
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, timeout=2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader.cancel()

    # --- probing and healing -----------------------------------------------------------------------------
    async def probe(self) -> ProbeResult:
        s = self.settings
        host = "127.0.0.1" if s.host in ("0.0.0.0", "") else ("::1" if s.host == "::" else s.host)
        url = f"http://{host if ':' not in host else '[' + host + ']'}:{s.port}/rerank"
        headers = {PROBE_HEADER: "1"}
        if s.api_key:
            headers["Authorization"] = f"Bearer {s.api_key.get_secret_value()}"
        t0 = time.monotonic()
        at = time.time()
        try:
            assert self.gate.session is not None
            async with self.gate.session.post(
                url, json=CANARY, headers=headers, timeout=aiohttp.ClientTimeout(total=s.probe_timeout_s)
            ) as resp:
                raw = await resp.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                error = judge(resp.status, body)
                result = ProbeResult(error is None, at, time.monotonic() - t0, resp.status, error)
        except asyncio.TimeoutError:
            result = ProbeResult(False, at, time.monotonic() - t0, None, f"no answer within {s.probe_timeout_s:g}s")
        except aiohttp.ClientError as exc:
            result = ProbeResult(False, at, time.monotonic() - t0, None, f"{type(exc).__name__}: {exc}")
        self.metrics.observe_probe(result.ok, result.latency_s)
        return result

    async def _main_loop(self) -> None:
        s = self.settings
        boot_deadline = time.monotonic() + s.startup_timeout_s
        while not self.stop_event.is_set():
            self.loop_tick = time.time()
            child = self.child
            if child is not None and child.returncode is not None:
                if not await self._on_child_exit(child.returncode):
                    return
                boot_deadline = time.monotonic() + s.startup_timeout_s
                continue
            if not self.ever_ready and self.state == "starting" and time.monotonic() > boot_deadline:
                self.fatal = f"MOSEC did not answer a probe within {s.startup_timeout_s:g}s: {self._last_error()}"
                return
            result = await self.probe()
            self.last_probe = result
            self.loop_tick = time.time()
            if self.state == "starting" and not result.ok and result.status in (None, 503):
                interval = STARTUP_PROBE_INTERVAL  # still booting: no verdict, just look again soon
            elif self.state == "starting" and not result.ok:
                # It answers, but wrongly: a broken model or pipeline, not a slow boot.
                self.boot_wrong_answers += 1
                if self.boot_wrong_answers >= self.settings.probe_failures:
                    self.fatal = f"the server answers but fails the canary request: {result.error}; {self._last_error()}"
                    return
                interval = STARTUP_PROBE_INTERVAL
            else:
                await self._after_probe(result)
                if self.fatal:
                    return
                interval = s.probe_interval_s
            self._publish()
            await self._wait(interval)

    async def _after_probe(self, result: ProbeResult) -> None:
        now = time.time()
        self.policy.record_probe(result.ok, now)
        if result.ok:
            if not self.ever_ready:
                self.ever_ready = True
                self.log.info("ready: first probe answered in %.3fs", result.latency_s or 0)
                self.notifier.ready(f"serving {self.model_name} on {self.settings.host}:{self.settings.port}")
            if self._outage is not None:
                self._outage["end"] = now
                self._outage["seconds"] = round(now - self._outage["start"], 2)
                self.log.warning("service restored after %.1fs (%s)", self._outage["seconds"], self._outage["cause"])
                self.notifier.status(f"restored after {self._outage['seconds']:.1f}s")
                self._outage = None
            self.state, self.reason = "running", ""
            self.notifier.watchdog()  # only ever after a successful probe
            return
        self.log.warning("probe failed: %s", result.error)
        if self.state == "running":
            self.state, self.reason = "degraded", f"probe failed: {result.error}"
            self.notifier.status(f"degraded: {result.error}")
        if self._outage is None:
            self._outage = {"start": result.at, "end": None, "seconds": None, "cause": result.error}
            self.outages.append(self._outage)
        if self._mosec_gone():
            return  # a crash, not a hang: the main loop's exit path restarts it, within the budget
        decision = self.policy.decide(now, self.worker_views())
        if decision.action == "none":
            if decision.reason:
                self.reason = decision.reason
            return
        self.log.warning("watchdog: %s -> %s", decision.reason, decision.action)
        if self._outage is not None:
            self._outage["cause"] = decision.reason
        if not self.policy.allow_restart(time.monotonic()):
            self.fatal = (
                f"gave up: {self.settings.restart_budget} restarts within {self.settings.restart_window_s:g}s did not"
                f" heal the server (last: {decision.reason})"
            )
            return
        if decision.action == "kill_workers":
            mine = {p.pid for p, _role in self.processes()}
            for pid in decision.pids:
                if pid in mine:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.log.warning("killed hung worker %d", pid)
                    except ProcessLookupError:
                        pass
            self.restarts["worker"] += len(decision.pids)
            self.metrics.count_restart("worker")
            # A lone worker's death makes MOSEC exit: that restart is this remediation, not a new crash.
            self._expected_exit_until = time.monotonic() + 15
            self.policy.reset_after_restart()
            self.state, self.reason = "degraded", decision.reason
        elif decision.action == "restart":
            await self._restart(decision.reason)

    async def _restart(self, why: str) -> None:
        self.state, self.reason = "restarting", why
        self._publish()
        self.restarts["server"] += 1
        self.metrics.count_restart("server")
        await self._stop_child(grace=1.0)
        delay = self.policy.backoff()
        if delay:
            self.log.info("restarting MOSEC in %.1fs", delay)
            await self._wait(delay)
        if self.stop_event.is_set():
            return
        self.policy.reset_after_restart()
        await self._start_child()
        self.state = "degraded" if self.ever_ready else "starting"

    async def _on_child_exit(self, code: int) -> bool:
        """MOSEC exited without being asked: a crash, whatever the code. False when giving up."""
        expected = time.monotonic() < self._expected_exit_until
        cause = self._last_error()
        self.log.error("MOSEC exited with code %s (%s): %s", code, "after a remediation" if expected else "crash", cause)
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, timeout=2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            cause = self._last_error()
        if self._outage is None:
            now = time.time()
            self._outage = {"start": now, "end": None, "seconds": None, "cause": f"MOSEC exited ({code})"}
            self.outages.append(self._outage)
        if not self.ever_ready:
            self.start_failures += 1
            if self.start_failures >= self.settings.start_attempts:
                self.fatal = f"the server failed to start {self.start_failures} time(s): {cause}"
                return False
        elif not expected and not self.policy.allow_restart(time.monotonic()):
            self.fatal = (
                f"gave up: {self.settings.restart_budget} restarts within {self.settings.restart_window_s:g}s"
                f" (last: MOSEC exited with code {code}: {cause})"
            )
            return False
        await self._restart(f"MOSEC exited with code {code}")
        return not self.stop_event.is_set()

    async def _wait(self, seconds: float) -> None:
        """Sleep until ``seconds`` pass, a stop is asked, or MOSEC exits, whichever comes first."""
        waits = [asyncio.ensure_future(self.stop_event.wait())]
        if self.child is not None and self.child.returncode is None:
            waits.append(asyncio.ensure_future(self.child.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # --- stopping ----------------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        s = self.settings
        self.state, self.reason = "stopping", "draining"
        self.notifier.stopping(f"stopping: draining {self.gate.in_flight} request(s)")
        self._publish()
        self.gate.draining = True
        deadline = time.monotonic() + max(1.0, s.stop_timeout_s - CHILD_TERM_GRACE - 1.0)
        while self.gate.in_flight and self.stop_signals < 2 and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.gate.idle.wait(), timeout=0.2)
            except asyncio.TimeoutError:
                pass
        if self.gate.in_flight:
            self.log.warning("stopping with %d request(s) still in flight", self.gate.in_flight)
        await self._stop_child(grace=0.2 if self.stop_signals > 1 else CHILD_TERM_GRACE)

    async def _cleanup(self) -> None:
        try:
            await self._stop_child(grace=0.2)
        except Exception:  # noqa: BLE001 - cleanup must go on
            self.log.exception("while stopping MOSEC")
        for runner in self._runners:
            try:
                await runner.cleanup()
            except Exception:  # noqa: BLE001
                pass
        await self.gate.close()
        s = self.settings
        self.state = "failed" if self.fatal else "stopped"
        self.reason = self.fatal or ""
        self._publish()
        remove_pidfile_if_ours(s.pidfile_path, os.getpid())
        for f in (s.run_dir / "mosec-config.json",):
            f.unlink(missing_ok=True)
        self._lock.release()

    # --- state for `status` ------------------------------------------------------------------------------
    def _publish(self) -> None:
        probe = self.last_probe
        data = {
            "pid": os.getpid(),
            "instance": self.instance,
            "state": self.state,
            "reason": self.reason,
            "healthy": self.health.verdict()[0] if self.state not in ("stopped", "failed") else False,
            "model": self.model_name,
            "precision": self.settings.precision,
            "variant_dir": str(self.variant_dir),
            "host": self.settings.host,
            "port": self.settings.port,
            "health_port": self.settings.health_port,
            "started_at": self.started_at,
            "updated_at": time.time(),
            "mosec": {
                "pid": self.child.pid if self.child is not None and self.child.returncode is None else None,
                "port": self.mosec_port,
                "started_at": self.child_started,
            },
            "last_probe": probe.to_dict() if probe else None,
            "restarts": dict(self.restarts),
            "outages": list(self.outages),
        }
        try:
            write_json_atomic(self.settings.state_path, data)
        except OSError:
            self.log.exception("cannot write %s", self.settings.state_path)
