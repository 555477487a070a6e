"""The supervisor: one asyncio process, no model in it (gunicorn's arbiter is the model).

It holds the run lock for its whole life, serves the API gate and the health port, and runs MOSEC as a
child generation in its own process group. Its loop turns every ``TICK_S``:

1. queued signals are handled (handlers only queue them);
2. a MOSEC generation that exited is replaced (budgeted, with backoff), or the supervisor gives up;
3. the watchdog looks at **every** worker, whatever the canary says: a stopped worker is killed, a worker
   hung inside forward has its stack dumped to the log and is killed; each kill is verified, and so is
   the replacement MOSEC spawns (it must heartbeat ``ready`` within ``respawn_timeout_s``, else the
   generation is replaced); a generation that does not boot by its own deadline is replaced too;
4. the canary (a real rerank through the gate) runs as its own task, so a slow probe never stops the
   watchdog; its results drive ``/health`` and the "whole server wedged" rule;
5. the state is derived and moved through ``states.StateMachine``, whose one transition function
   publishes ``state.json``, sd_notify, the metrics and a log line.

All times are monotonic. An unexpected exception ends in state ``failed`` with its reason, and its
traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import errno
import faulthandler
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import psutil

from .. import __version__
from ..config import Settings
from ..errors import AlreadyRunning, PortInUse, ServerStartError
from ..health.probe import CANARY, PROBE_HEADER, ProbeResult, judge
from ..health.watchdog import GONE_STATUSES, STOPPED_STATUSES, Kill, WatchdogPolicy, WorkerView
from ..metrics import Metrics
from ..models.store import write_json_atomic
from ..serving.manifest import read_variant_manifest
from ..serving.heartbeat import forget_worker, read_worker_dir
from ..serving.schema import ROUTE_TAGS, open_answer, part_head, read_answers, seal
from ..serving.upstream import Upstream
from ..startup import frozen_imports
from . import roles
from .child import Generation, child_environment
from .runstate import (
    GENERATION_ENV,
    INSTANCE_ENV,
    RunLock,
    kill_instance,
    read_pidfile,
    register_server,
    remove_pidfile_if_ours,
    start_ticks,
    unregister_server,
    write_pidfile,
)
from .sdnotify import Notifier
from .states import State, StateMachine, Transition

if TYPE_CHECKING:  # the HTTP side is imported by _open_front, once MOSEC is on its way
    import aiohttp

    from ..health.server import Health
    from ..serving.frontdoor import FrontDoor
    from ..serving.gate import Gate

TICK_S = 0.25
STARTUP_PROBE_INTERVAL = 0.05
CHILD_TERM_GRACE = 3.0
KILL_CONFIRM_S = 5.0
STACK_DUMP_WAIT_S = 1.0
PUBLISH_EVERY_S = 1.0


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


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


def _reopen_log_files(log: logging.Logger) -> None:
    """Log files whose path was removed are opened again at that path (the handler otherwise goes on
    writing to the removed file, which nobody can read)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler) and not os.path.exists(handler.baseFilename):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700, or check that an existing one is ours and make it 0700.

    MOSEC passes pickled data over sockets in the run dir: nobody else may write there.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise ServerStartError(f"{path} belongs to uid {st.st_uid}, not to this user",
                               "choose another --run-dir, or remove that folder")
    if st.st_mode & 0o077:
        path.chmod(0o700)


UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path is 108, with its NUL)
# What a server leaves in its run dir besides the worker and MOSEC folders (the log stays: it is the record)
# (a pidfile is read first, to reap what its server left running, and then replaced; ``.*.json.*`` are the
# temporary files of a write cut short)
LEFTOVERS = ("state.json", "stop-request.json", "reload-request.json", "mosec-config-*.json", ".*.json.*")


def remove_tree(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a folder and all it holds; nothing if absent."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


# The health port: probes and scrapers, a few connections each
HEALTH_CONNECTIONS = 256
HEALTH_PER_PEER = 32
HEALTH_IDLE_S = 300.0
LOOPBACK_RESERVE = 32  # connections of each port that only loopback peers (the canary, a local balancer) get

FD_RESERVE = 512  # descriptors kept for the health port, MOSEC's connections, logs, the canary


def connection_budget(wanted: int) -> int:
    """How many client connections the API port may hold: raise the soft descriptor limit to the hard one,
    then keep ``FD_RESERVE`` free, so a flood of clients can never take the descriptors the canary needs."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(8, min(wanted, soft - FD_RESERVE))


@dataclass
class PendingKill:
    pid: int
    stage: str
    deadline: float


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
        # The build the pointer names now: a later 'convert' switches the pointer, not what we serve.
        self.variant_dir = Path(variant_dir).resolve()
        self._build_locks: dict[Path, Optional[int]] = {}
        self.precision = served_precision(variant_dir, settings.precision)
        self.model_name = model_name
        self.notifier = notifier
        self.log = log or logging.getLogger("rerankctl")
        self.argv = argv or sys.argv
        self.instance = uuid.uuid4().hex
        self.probe_token = secrets.token_hex(16)
        self.metrics = Metrics()
        self.policy = WatchdogPolicy(
            failures_needed=settings.probe_failures,
            hang_after_s=settings.worker_hang_s,
            restart_budget=settings.restart_budget,
            restart_window_s=settings.restart_window_s,
        )
        self.sm = StateMachine(State.STARTING, "loading the model")
        self.sm.subscribe(self._on_transition)
        self.health: Health = None  # type: ignore[assignment]  # built by _open_front
        self.gate: Gate = None  # type: ignore[assignment]
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.loop_tick = time.monotonic()
        self.last_probe: Optional[ProbeResult] = None
        self.ever_ready = False
        self.start_failures = 0
        self.boot_wrong_answers = 0
        self.restarts = {"worker": 0, "server": 0}
        self.worker_deaths = 0  # score workers that died without being killed by the watchdog
        self.outages: deque[dict] = deque(maxlen=20)
        self._outage: Optional[dict] = None
        self.gen: Optional[Generation] = None
        self._generations = 0
        self.tail: deque[str] = deque(maxlen=200)
        self.expected = {"score": settings.workers}
        self._pending: dict[int, PendingKill] = {}
        self._short_since: dict[str, float] = {}
        self._views: list[WorkerView] = []
        self._beats: dict[int, dict] = {}  # the heartbeats _views were built from (read once a tick)
        self._signals: deque[int] = deque()
        self._wake: Optional[asyncio.Event] = None
        self.stop_requests = 0
        self.fatal: Optional[str] = None
        self._probe_task: Optional[asyncio.Task] = None
        self._next_probe = 0.0
        self._last_publish = 0.0
        self._doors: list[FrontDoor] = []
        self._runners: list = []
        self._ready_notified = False
        self._lock = RunLock(settings.lock_path)
        self._run_dir_lost = False
        self._gen_pids: set[int] = set()
        self._pid1 = os.getpid() == 1  # in a container: orphans are re-parented to us, and we must reap them
        self._reload_task: Optional[asyncio.Task] = None
        self._stop_deadline_s = settings.stop_timeout_s
        self.reload_status: Optional[dict] = None
        from ..serving.app import keeps_last_worker, mosec_version  # neither imports MOSEC

        # MOSEC replaces the last worker of a stage like any other (serving/app.py, on verified versions)
        self.keep_last_worker = keeps_last_worker(mosec_version())

    # --- what the gate and the health server read ------------------------------------------------------
    @property
    def state_name(self) -> str:
        return self.sm.state.value

    @property
    def state_reason(self) -> str:
        return self.sm.reason

    @property
    def http(self) -> Optional[aiohttp.ClientSession]:
        return self.gate.session

    def upstream(self) -> Optional[Upstream]:
        gen = self.gen
        if gen is None or gen.exit_code is not None:
            return None
        return Upstream(gen.port, gen.secret, gen.number, gen.model_name, gen.max_length, gen.pid)

    def mosec_metrics_url(self) -> Optional[str]:
        gen = self.gen
        return None if gen is None or gen.exit_code is not None else f"http://127.0.0.1:{gen.port}/metrics"

    def _index(self) -> dict:
        from ..serving.schema import ROUTES

        return {"name": "rerankctl", "model": self.model_name, "routes": list(ROUTES),
                "health": f"{roles.base_url(self.settings.host, self.settings.health_port)}/health"}

    def _heartbeats(self) -> dict[int, dict]:
        return read_worker_dir(self.settings.worker_dir)

    def _observe(self, gen: Optional[Generation] = None) -> tuple[dict[int, dict], list[WorkerView]]:
        """The heartbeats (each marked ``alive`` or not) and the workers' views, from one read of the worker
        dir (run in a thread)."""
        beats = self._heartbeats()
        for pid, beat in beats.items():
            beat["alive"] = _alive(pid)
        return beats, self.worker_views(gen, beats)

    @staticmethod
    def init_failure(number: int, beats: dict[int, dict]) -> Optional[str]:
        """Why a worker of generation ``number`` could not start, if one said so before it died. MOSEC
        starts a dead worker again as long as another of its stage lives, so with two workers a model that
        cannot load is loaded again and again, each time in a new interpreter, until the boot deadline."""
        for beat in beats.values():
            if beat.get("generation") == number and beat.get("init_error"):
                return f"the {beat.get('stage', '?')} worker could not start: {beat['init_error']}"
        return None

    def scored_totals(self) -> tuple[int, int]:
        pairs = tokens = 0
        for beat in self._heartbeats().values():
            if beat.get("stage") == "score":
                pairs += int(beat.get("pairs", 0))
                tokens += int(beat.get("tokens", 0))
        return pairs, tokens

    def extra_metrics(self) -> str:
        lines = []
        for name, kind, what, attr in (
            ("open", "gauge", "Open client connections, by port (door).", "open_connections"),
            ("rejected_total", "counter", "Connections refused: the port full (nothing idle to close) or an"
             " address over its share.", "rejected_total"),
            ("timed_out_total", "counter", "Connections closed for not sending a request (or its body) in time.",
             "timed_out_total"),
            ("evicted_total", "counter", "Idle connections closed to make room for a new one on a full port.",
             "evicted_total"),
            ("send_timed_out_total", "counter", "Connections cut because the client read nothing of its answer"
             " for RERANKER_SEND_TIMEOUT_S.", "send_timed_out_total"),
        ):
            lines += [f"# HELP reranker_connections_{name} {what}", f"# TYPE reranker_connections_{name} {kind}"]
            for door in self._doors:
                lines.append(f'reranker_connections_{name}{{door="{door.name}"}} {getattr(door, attr)}')
        lines += [
            "# HELP reranker_in_flight_per_worker Requests in flight per live score worker (a scaling signal).",
            "# TYPE reranker_in_flight_per_worker gauge",
            f"reranker_in_flight_per_worker {self.gate.in_flight / max(1, self.capacity()['score']['live']):.3f}",
            "# HELP reranker_batches_total Envelopes the live score workers scored (one scoring call each).",
            "# TYPE reranker_batches_total counter",
            f"reranker_batches_total {sum(int(b.get('batches', 0)) for b in self._beats.values())}",
            "# HELP reranker_batched_requests_total Requests in those envelopes (over batches: the average batch).",
            "# TYPE reranker_batched_requests_total counter",
            f"reranker_batched_requests_total {sum(int(b.get('requests', 0)) for b in self._beats.values())}",
        ]
        return "\n".join(lines) + "\n"

    def capacity(self, views: Optional[list[WorkerView]] = None) -> dict[str, dict[str, int]]:
        live: dict[str, int] = {stage: 0 for stage in self.expected}
        for v in (self._views if views is None else views):
            if v.ready and v.status not in STOPPED_STATUSES | GONE_STATUSES and v.pid not in self._pending:
                live[v.stage] = live.get(v.stage, 0) + 1
        return {stage: {"live": live.get(stage, 0), "expected": n} for stage, n in self.expected.items()}

    def processes(self, gen: Optional[Generation] = None, beats: Optional[dict[int, dict]] = None
                  ) -> list[tuple[psutil.Process, str]]:
        """Every process of a MOSEC generation (the current one by default) with its role."""
        gen = gen or self.gen
        if gen is None or gen.exit_code is not None:
            return []
        beats = self._heartbeats() if beats is None else beats
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

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def run(self) -> int:
        # SIGABRT (systemd's watchdog) or a crash: every thread's stack to stderr (the journal, or daemon.out)
        faulthandler.enable(all_threads=True)
        self._wake = asyncio.Event()
        if not self._lock.acquire():
            info, _ = read_pidfile(self.settings.pidfile_path)
            where = f" (pid {info.pid}, port {info.data.get('port')})" if info else ""
            raise AlreadyRunning(f"a server is already running{where}", "see: rerankctl status; stop it with: rerankctl stop")
        try:
            self._reap_previous()
            self._prepare_dirs()
            self._hold(self.variant_dir)
            self._install_signals()
            # MOSEC first: its interpreters start and the model compiles on the other core while this
            # process imports its HTTP side (aiohttp, the gate: ~0.16 s) and binds its ports
            await self._start_generation()
            self._open_front()
            await self._bind()
            self._write_pidfile()
            self._publish()
            try:
                await self._main_loop()
            except Exception as exc:  # noqa: BLE001 - a crash must end in 'failed', its cause in the log
                self.log.exception("the supervisor crashed")
                self.fatal = f"the supervisor crashed: {type(exc).__name__}: {exc}"
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

    def _make_dirs(self) -> None:
        s = self.settings
        ensure_private_dir(s.run_dir)
        for d in (s.worker_dir, s.mosec_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _prepare_dirs(self) -> None:
        """A start owns its run dir: under the lock, everything a previous server could have left there is
        removed before anything binds. A server killed with SIGKILL (an OOM kill of its cgroup, a container
        runtime's kill) leaves MOSEC's IPC sockets, which its controller refuses to bind over (AddrInUse),
        its generations' configs, the workers' heartbeats, request files, its state. The log stays. And each
        generation's paths carry this server's instance (``_generation_paths``): a dead server's can never be
        taken for ours, even if one could not be removed."""
        s = self.settings
        ensure_private_dir(s.run_dir)
        for d in (s.worker_dir, s.mosec_dir):
            remove_tree(d)
        for pattern in LEFTOVERS:
            for path in s.run_dir.glob(pattern):
                remove_tree(path)
        self._make_dirs()

    def _generation_paths(self, number: int) -> tuple[Path, Path]:
        """(config file, MOSEC's folder) of generation ``number``: unique to this server and generation."""
        tag = f"{self.instance[:12]}.g{number}"
        folder = self.settings.mosec_dir / tag
        # MOSEC puts its IPC sockets in the folder: a Unix socket's path has at most 107 bytes
        socket = folder / "ipc_Score_1.socket"
        if len(os.fsencode(socket)) > UNIX_PATH_MAX:
            raise ServerStartError(f"the run dir {self.settings.run_dir} is too long a path for MOSEC's sockets"
                                   f" ({len(os.fsencode(socket))} bytes, at most {UNIX_PATH_MAX})",
                                   "choose a shorter --run-dir (RERANKER_RUN_DIR)")
        return self.settings.mosec_dir / f"{tag}.json", folder

    def _open_front(self) -> None:
        """The gate and the health server, and aiohttp under them: imported here rather than with this
        module, so that a start pays for them while MOSEC boots, not before it is spawned."""
        with frozen_imports():  # they live as long as the supervisor
            from ..health.server import Health
            from ..serving.gate import Gate
        self.health = Health(self.settings, self)
        self.gate = Gate(self.settings, self.metrics, self.log, self.upstream, self.probe_token, self._index)

    async def _bind(self) -> None:
        from aiohttp import web

        from ..serving.frontdoor import FrontDoor, tracked

        s = self.settings
        await self.gate.start()
        max_conns = connection_budget(s.max_connections)
        if max_conns < s.max_connections:
            self.log.warning("RERANKER_MAX_CONNECTIONS=%d does not fit the descriptor limit: using %d",
                             s.max_connections, max_conns)
        health_app = self.health.app()
        health_app.middlewares.append(tracked(lambda: self._doors[1] if len(self._doors) > 1 else None))
        doors = (
            # (app, port, what, connections, per address, aiohttp's keep-alive, the door's idle deadline)
            (self.gate.app(self.gate.ops_routes(self.health.routes(brief=True))), s.port, "API", max_conns,
             s.max_connections_per_peer, s.keepalive_timeout_s),
            # probes and scrapers: few of them, each kept alive between scrapes (Prometheus scrapes each minute
            # by default) rather than cut; idle ones are closed only to make room for a new connection
            (health_app, s.health_port, "health", HEALTH_CONNECTIONS, HEALTH_PER_PEER, HEALTH_IDLE_S),
        )
        for app, port, what, conns, per_peer, idle_s in doors:
            # auto_decompress off: a compressed body is never inflated, not even by aiohttp's parser
            runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False,
                                   keepalive_timeout=idle_s + 5)
            await runner.setup()
            door = FrontDoor(runner.server, max_connections=conns, header_timeout_s=s.header_timeout_s,
                             idle_timeout_s=idle_s, send_timeout_s=s.send_timeout_s, per_peer=per_peer,
                             reserve=LOOPBACK_RESERVE, name="api" if what == "API" else "health")
            try:
                await door.listen(s.host, port)
            except OSError as exc:
                await runner.cleanup()
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"{what} port {port} on {s.host} is already in use by {port_owner(port)}",
                        f"stop that program or choose another port (--{'port' if what == 'API' else 'health-port'})",
                    ) from None
                raise ServerStartError(f"cannot listen on {s.host}:{port}: {exc.strerror}", "check --host") from None
            self._doors.append(door)
            self._runners.append(runner)
        self.gate.door = self._doors[0]

    def _write_pidfile(self) -> None:
        s = self.settings
        me = os.getpid()
        register_server(self.instance, {"pid": me, "start_ticks": start_ticks(me), "run_dir": str(s.run_dir),
                                        "host": s.host, "port": s.port})
        write_pidfile(
            s.pidfile_path,
            {
                "pid": me,
                "start_ticks": start_ticks(me),
                "pgid": os.getpgid(0),
                "instance": self.instance,
                "host": s.host,
                "port": s.port,
                "health_port": s.health_port,
                "model": self.model_name,
                "precision": self.precision,
                "variant_dir": str(self.variant_dir),
                "version": __version__,
                "argv": self.argv,
                "log": str(s.log_path),
                "started_at": self.started_at,
                "under_systemd": self.notifier.enabled,
                # what `restart` starts again (secrets excluded: they come from the environment), and whether
                # it needs a key (the fact, never the key): a restart must not come back unauthenticated
                "settings": s.as_json(exclude=("api_key",)),
                "api_key_required": bool(s.api_key),
            },
        )

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        # Only queue; the main loop acts.
        self._signals.append(sig)
        if self._wake is not None:
            self._wake.set()

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.popleft()
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.stop_requests += 1
                self._read_stop_request()
                self.log.info("received %s%s", signal.Signals(sig).name,
                              " again: stopping now" if self.stop_requests > 1 else "")
            elif sig == signal.SIGHUP:
                self._request_reload()

    # --- generations -------------------------------------------------------------------------------------
    def _child_config(self, number: int, port: int, secret: bytes, variant_dir: Path, model_name: str) -> Path:
        s = self.settings
        path, folder = self._generation_paths(number)
        manifest = read_variant_manifest(variant_dir)
        cfg = {
            "variant_dir": str(variant_dir),
            "model_name": model_name,
            "threads": s.effective_threads(),
            "pin_threads": s.pin_threads,
            "token_budget": s.token_budget,
            "attention_budget": s.attention_budget,
            "max_length": s.max_length,
            "model_max_length": manifest.get("max_length"),
            "limits": {"max_documents": s.max_documents, "max_document_chars": s.max_document_chars,
                       "windows": s.windows, "max_windows": s.max_windows, "max_query_chars": s.max_query_chars},
            "window_stride": s.window_stride,
            "worker_dir": str(s.worker_dir),
            "generation": number,
            "workers": s.workers,
            "gate_secret": secret.decode("ascii"),
            "keep_last_worker": self.keep_last_worker,
            "mosec": {
                "address": "127.0.0.1",
                "port": port,
                # above the gate's deadline: only the gate fails a late request, alone (MOSEC would fail the
                # whole batch); a hung worker is the watchdog's, not this timeout's
                "timeout_ms": int((s.request_timeout_s + 10) * 1000),
                "capacity": s.queue_capacity,
                "path": str(folder),
                # The gate enforces the user's limit; MOSEC gets room for the secret and the route tag.
                "max_request_size": s.max_body_bytes + 128,
                "log_level": "debug" if s.debug else "info",
            },
        }
        write_json_atomic(path, cfg)
        path.chmod(0o600)
        return path

    async def _spawn(self, variant_dir: Path, model_name: str) -> Generation:
        """Start a MOSEC generation (not yet the one the gate sends to)."""
        self._generations += 1
        number = self._generations
        secret = secrets.token_hex(16).encode("ascii")
        port = free_port()
        cfg = self._child_config(number, port, secret, variant_dir, model_name)
        env = child_environment(dict(os.environ), INSTANCE_ENV, self.instance, home=self.settings.run_dir)
        env[GENERATION_ENV] = f"{self.instance}.{number}"
        gen = await Generation.spawn(number, cfg, port, env, self.settings.run_dir,
                                     self.settings.startup_timeout_s, self.log, self.tail)
        gen.secret, gen.variant_dir, gen.model_name = secret, variant_dir, model_name
        model_max = int(read_variant_manifest(variant_dir).get("max_length") or 512)
        gen.max_length = min(self.settings.max_length, model_max) if self.settings.max_length else model_max
        self._gen_pids.add(gen.pid)
        asyncio.ensure_future(self._wake_on_exit(gen))
        return gen

    async def _start_generation(self) -> None:
        self._pending.clear()
        self._short_since.clear()
        self._views = []
        self.boot_wrong_answers = 0
        self.gen = await self._spawn(self.variant_dir, self.model_name)

    async def _wake_on_exit(self, gen: Generation) -> None:
        await gen.exited.wait()
        if self._wake is not None:
            self._wake.set()

    async def _stop_generation(self, gen: Generation, grace: float) -> None:
        await gen.stop(grace, f"{self.instance}.{gen.number}")
        if self._run_dir_lost:
            return  # the run dir is not ours any more: its files may be another server's
        config, folder = self._generation_paths(gen.number)
        config.unlink(missing_ok=True)
        remove_tree(folder)  # MOSEC removes it when it ends well; not when it is killed
        for beat in read_worker_dir(self.settings.worker_dir):
            if not psutil.pid_exists(beat):
                forget_worker(self.settings.worker_dir, beat)

    async def _replace_generation(self, why: str) -> None:
        """Stop the current generation and start a new one after the backoff (a 'server restart')."""
        self.sm.to(State.RESTARTING, why)
        self.restarts["server"] += 1
        self.metrics.count_restart("server")
        self._open_outage(why)
        if self.gen is not None:
            await self._stop_generation(self.gen, grace=1.0)
        delay = self.policy.backoff()
        if delay:
            self.log.info("restarting MOSEC in %.1fs", delay)
            await self._sleep(delay)
        self._handle_signals()
        if self.stop_requests:
            return
        self.policy.reset_after_restart()
        await self._start_generation()
        self.sm.to(State.DEGRADED if self.ever_ready else State.STARTING,
                   f"MOSEC generation {self._generations} starting")

    async def _on_generation_exit(self, gen: Generation) -> None:
        """MOSEC exited without being asked: a crash, whatever the code (unless it was our remediation)."""
        try:
            await asyncio.wait_for(gen.exited.wait(), timeout=2)
        except asyncio.TimeoutError:
            pass
        # its controller and workers outlive a killed main process and hold the output pipe open: end the
        # group first, then read what they printed to the end
        try:
            os.killpg(gen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        await gen.drain_output()
        code = gen.exit_code
        cause = gen.last_error()
        expected = gen.expected_exit
        # the envelopes its workers were scoring when it died are answered by nobody: suspects, like a worker's
        beats, _views = await asyncio.get_running_loop().run_in_executor(None, self._observe)
        dead = {pid for pid, beat in beats.items() if beat.get("stage") == "score" and not beat.get("alive")}
        if dead and self.gate is not None:
            self._report_lost(dead, beats, gen.number)
        self.log.error("MOSEC exited with code %s (%s): %s", code, "after a remediation" if expected else "crash",
                       cause)
        if not self.ever_ready and not expected:
            self.start_failures += 1
            if self.start_failures >= self.settings.start_attempts:
                self.fatal = f"the server failed to start {self.start_failures} time(s): {cause}"
                return
        elif not expected and not self.policy.allow_restart(time.monotonic()):
            self.fatal = (f"gave up: {self.settings.restart_budget} restarts within {self.settings.restart_window_s:g}s"
                          f" (last: MOSEC exited with code {code}: {cause})")
            return
        await self._replace_generation(f"MOSEC exited with code {code}")

    # --- reload: a new generation, probed, switched to, the old one drained --------------------------------
    def _hold(self, variant_dir: Path) -> None:
        if variant_dir not in self._build_locks:
            from ..models.store import hold_build

            self._build_locks[variant_dir] = hold_build(variant_dir)

    def _let_go(self, variant_dir: Path) -> None:
        fd = self._build_locks.pop(variant_dir, None)
        if fd is not None:
            os.close(fd)

    def _read_stop_request(self) -> None:
        """``rerankctl stop --timeout S`` leaves its deadline here: the drain fits inside it."""
        path = self.settings.run_dir / "stop-request.json"
        try:
            req = json.loads(path.read_text(encoding="utf-8"))
            path.unlink(missing_ok=True)
            if req.get("pid") == os.getpid() and float(req.get("drain_s", 0)) > 0:
                self._stop_deadline_s = float(req["drain_s"])
        except (OSError, ValueError, TypeError):
            pass

    def _request_reload(self) -> None:
        path = self.settings.run_dir / "reload-request.json"
        try:
            request = json.loads(path.read_text(encoding="utf-8"))
            path.unlink(missing_ok=True)
        except (OSError, ValueError):
            request = {}
        if self._reload_task is not None and not self._reload_task.done():
            self.log.warning("reload asked while one is in progress: ignored")
            self._set_reload(request.get("id"), "refused", "a reload is already in progress")
            return
        if not self.ever_ready or self.sm.state in (State.STOPPING, State.RESTARTING):
            self._set_reload(request.get("id"), "refused", f"cannot reload while {self.sm.state}")
            return
        self._reload_task = asyncio.ensure_future(self._reload(request))

    def _set_reload(self, rid: Optional[str], state: str, reason: str = "", **extra) -> None:
        self.reload_status = {"id": rid, "state": state, "reason": reason, "at": time.time(), **extra}
        log = self.log.info if state in ("in_progress", "ok") else self.log.warning
        log("reload %s%s", state, f": {reason}" if reason else "")
        self._publish()

    def _resolve_reload_target(self, request: dict) -> tuple[Path, str, str]:
        from ..models.store import find_variant, resolve_model

        update = {k: request[k] for k in ("model", "precision", "model_format") if request.get(k)}
        settings = self.settings.replace(**update)
        variant = find_variant(settings)
        return variant.resolve(), resolve_model(settings).name, served_precision(variant, settings.precision)

    async def _reload(self, request: dict) -> None:
        rid = request.get("id")
        self._set_reload(rid, "in_progress", "starting a new generation")
        try:
            variant, name, precision = self._resolve_reload_target(request)
        except Exception as exc:  # noqa: BLE001 - a bad target is the reload's failure, not ours
            self._set_reload(rid, "failed", f"{getattr(exc, 'message', None) or exc}; still serving "
                                            f"{self.model_name} from {self.variant_dir}")
            return
        new = await self._spawn(variant, name)
        self._hold(variant)
        try:
            ok, why = await self._boot_and_probe(new)
            if not ok:
                await self._stop_generation(new, grace=0.2)
                if variant != self.variant_dir:
                    self._let_go(variant)
                self._set_reload(rid, "failed", f"the new generation failed: {why}; still serving "
                                                f"{self.model_name} from {self.variant_dir}")
                return
            overlap = self._tree_pss()
            old, old_variant = self.gen, self.variant_dir
            # the switch: one assignment; the gate reads the upstream per request
            self.gen, self.variant_dir, self.model_name = new, variant, name
            self.precision = precision
            self._pending.clear()
            self._short_since.clear()
            self._views = []
            self.log.info("reload: serving generation %d (%s, %s) now; draining generation %d", new.number, name,
                          variant, old.number if old else -1)
            if old is not None:
                old.expected_exit = True
                deadline = time.monotonic() + self.settings.request_timeout_s + 2
                while self.gate.upstream_in_flight.get(old.number) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await self._stop_generation(old, grace=CHILD_TERM_GRACE)
            if old_variant != variant:
                self._let_go(old_variant)
            self._set_reload(rid, "ok", f"serving {name} from {variant}", generation=new.number,
                             overlap_pss_bytes=overlap)
        except asyncio.CancelledError:
            await self._stop_generation(new, grace=0.2)
            raise

    async def _boot_and_probe(self, gen: Generation) -> tuple[bool, str]:
        """Wait until every worker of ``gen`` is ready and it answers the canary correctly, directly."""
        import aiohttp

        loop = asyncio.get_running_loop()
        canary = json.dumps(CANARY, ensure_ascii=False).encode("utf-8")
        part = part_head(ROUTE_TAGS["/rerank"], len(canary)) + canary
        envelope_id = secrets.randbits(63) or 1
        body = seal(gen.secret, envelope_id, [part]) + part  # an envelope of one
        url = f"http://127.0.0.1:{gen.port}/score"
        last = "no answer yet"
        while time.monotonic() < gen.deadline:
            if self.stop_requests:
                return False, "the server is stopping"
            # before gone(): when every worker failed to load, MOSEC exits too, and the reason is the workers'
            beats, views = await loop.run_in_executor(None, self._observe, gen)
            failure = self.init_failure(gen.number, beats)
            if failure:
                return False, failure
            if gen.gone():
                await gen.drain_output()
                return False, f"MOSEC exited ({gen.exit_code}): {gen.last_error()}"
            if all(c["live"] >= c["expected"] for c in self.capacity(views).values()):
                gen.booted = True
                try:
                    assert self.gate.session is not None
                    async with self.gate.session.post(
                        url, data=body, timeout=aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)
                    ) as resp:
                        status, raw = resp.status, await resp.read()
                        try:
                            if status == 200:
                                [(status, raw)] = read_answers(open_answer(gen.secret, envelope_id, raw), 1)
                            answer: object = json.loads(raw)
                        except ValueError:  # EnvelopeError is one
                            answer = raw.decode("utf-8", "replace")
                        error = judge(status, answer)
                    if error is None:
                        gen.ready_at = time.monotonic()
                        return True, ""
                    last = error
                    if status not in (408, 429, 503, 504):
                        return False, f"wrong answer to the canary: {error}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
        return False, f"not ready within {self.settings.startup_timeout_s:g}s ({last})"

    def _tree_pss(self) -> Optional[int]:
        total = 0
        try:
            for p in [psutil.Process()] + psutil.Process().children(recursive=True):
                try:
                    total += p.memory_full_info().pss
                except (psutil.Error, AttributeError):
                    pass
        except psutil.Error:
            return None
        return total

    # --- the loop ----------------------------------------------------------------------------------------
    async def _main_loop(self) -> None:
        while True:
            now = time.monotonic()
            self.loop_tick = now
            self._handle_signals()
            if self.stop_requests or self.fatal:
                return
            if not self._lock.is_at_path():
                self._restore_run_dir()
                if self.fatal:
                    return
            gen = self.gen
            assert gen is not None
            if gen.gone():
                await self._on_generation_exit(gen)
                continue
            self._collect_probe()
            if self.fatal:
                return
            await self._watch_workers(gen, now)
            if self.fatal or self.gen is not gen:
                continue
            await self._check_boot(gen, now)
            if self.fatal or self.gen is not gen:
                continue
            await self._check_wedged(gen, now)
            if self.fatal or self.gen is not gen:
                continue
            self._derive_state(gen)
            if self._pid1:
                self._reap_orphans()
            self._maybe_probe(now)
            if now - self._last_publish >= PUBLISH_EVERY_S:
                self._publish()
            await self._sleep(TICK_S)

    def _restore_run_dir(self) -> None:
        """The run dir (or the lock file in it) was removed under the running server: by a cleanup of
        ``/run/user/<uid>`` or ``/tmp``, or by hand. Left so, ``status`` and ``stop`` could no longer find
        this server, and a second one could take a fresh lock beside it. Put back what says that it runs
        here (lock, pidfile, state, log) and move MOSEC, whose sockets and heartbeats were in the removed
        dir, to a new generation in the restored one: a reload, which drops no request. When the dir
        cannot be made again, or another server already holds the new lock, stop without touching it."""
        s = self.settings
        try:
            self._make_dirs()
            lock = RunLock(s.lock_path)
            taken = lock.acquire()
        except (OSError, ServerStartError) as exc:
            self._run_dir_lost = True
            self.fatal = (f"the run dir {s.run_dir} was removed and cannot be made again "
                          f"({getattr(exc, 'message', None) or exc}); stopping: nothing could find or stop this server")
            return
        if not taken:
            self._run_dir_lost = True
            self.fatal = f"the run dir {s.run_dir} was removed and another server holds it now; stopping this one"
            return
        old, self._lock = self._lock, lock
        old.release()
        _reopen_log_files(self.log)
        self._write_pidfile()
        self._publish()
        self.log.warning("the run dir %s was removed under the running server: its lock, pidfile and state are"
                         " back; moving MOSEC to a new generation in it", s.run_dir)
        reloading = self._reload_task is not None and not self._reload_task.done()
        if self.ever_ready and not reloading and self.sm.state not in (State.STOPPING, State.RESTARTING):
            self._reload_task = asyncio.ensure_future(self._reload({"id": "run-dir-restored"}))
        # else: a generation that boots or restarts now, or a reload under way, may have lost its sockets too;
        # the boot deadline and the capacity watch replace it, into the restored dir

    def _reap_orphans(self) -> None:
        """As PID 1, collect zombies that are not our own children (a MOSEC generation's main process is
        left to asyncio's watcher, which reports its exit)."""
        ours = self._gen_pids
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in ours:
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read()
                fields = stat[stat.rindex(b")") + 2:].split()
                if fields[0] == b"Z" and int(fields[1]) == 1:
                    os.waitpid(int(entry), os.WNOHANG)
            except (OSError, ValueError, IndexError, ChildProcessError):
                continue

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass or something happens (a signal, MOSEC exits, a probe ends)."""
        assert self._wake is not None
        self._wake.clear()
        if self._signals:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    # --- the watchdog: every worker, every tick ----------------------------------------------------------
    async def _watch_workers(self, gen: Generation, now: float) -> None:
        self._beats, views = await asyncio.get_running_loop().run_in_executor(None, self._observe)
        before, self._views = self._views, views
        alive = {v.pid: v for v in views}
        # A worker that died took the envelope it held with it (MOSEC never answers it): the gate sends the
        # envelopes out again, or the lost one would hold its requests and a slot until their deadline.
        # Found by its heartbeat file, which outlives it until reported: a worker MOSEC started and that died
        # between two ticks is found too (comparing the pids seen at two ticks missed it).
        dead = {pid for pid, beat in self._beats.items() if beat.get("stage") == "score" and not beat.get("alive")}
        if dead:
            self._report_lost(dead, self._beats, gen.number)
            # the generation's only ready workers died: nothing could answer until MOSEC replaced them, however
            # fast it did (the replacement may already be up at this tick)
            lost = [pid for pid in dead if self._beats.get(pid, {}).get("ready")]
            if lost and gen.booted and not any(v.ready and v.pid not in dead for v in before):
                self._open_outage(f"no score worker alive ({len(lost)} died)")
        # each kill is verified: the process must be gone (or a zombie MOSEC will reap) in time
        for pid, pk in list(self._pending.items()):
            v = alive.get(pid)
            if v is None or v.status in GONE_STATUSES:
                del self._pending[pid]
                forget_worker(self.settings.worker_dir, pid)
                self.log.info("watchdog: %s worker %d is gone; waiting for MOSEC's replacement", pk.stage, pid)
            elif now > pk.deadline:
                del self._pending[pid]
                await self._wedged_restart(f"{pk.stage} worker {pid} did not die after SIGKILL")
                return
        for kill in self.policy.inspect(now, [v for v in views if v.pid not in self._pending]):
            await self._kill_worker(gen, kill)
        # capacity: every stage back to its expected count within respawn_timeout_s, or a new generation
        if not gen.booted:
            return
        for stage, c in self.capacity().items():
            if c["live"] >= c["expected"]:
                if self._short_since.pop(stage, None) is not None:
                    self.log.info("watchdog: %s workers back to %d of %d", stage, c["live"], c["expected"])
                continue
            since = self._short_since.setdefault(stage, now)
            if c["live"] == 0:  # nothing can answer until MOSEC replaces the worker: an outage, however short
                self._open_outage(f"no {stage} worker alive (MOSEC is replacing it)")
            if now - since > self.settings.respawn_timeout_s:
                await self._wedged_restart(f"{stage} workers at {c['live']} of {c['expected']} for over "
                                           f"{self.settings.respawn_timeout_s:g}s: MOSEC did not replace them")
                return

    def _report_lost(self, dead: set[int], beats: dict[int, dict], number: int) -> None:
        """Workers ``dead`` died (or were killed) and MOSEC will never answer the envelopes they held. Each
        names the one it was scoring in its heartbeat: those envelopes' requests are sent again, each alone,
        and one that was already alone when a worker died with it is answered as poison (see
        ``FairScheduler.worker_lost``). A dead worker whose heartbeat names nothing may have taken an envelope
        between MOSEC's hand-over and its first heartbeat: then every envelope out is sent again."""
        held, unknown = set(), False
        for pid in dead:
            beat = beats.get(pid) or {}
            if pid not in self._pending:
                forget_worker(self.settings.worker_dir, pid)  # reported once; never mistaken for a live one
                if beat.get("ready"):  # one that never started took nothing with it: that is a boot failure
                    self.worker_deaths += 1
                    self.metrics.count_worker_death()
            if beat.get("busy_since") and beat.get("envelope"):
                held.add(int(beat["envelope"]))
            elif beat.get("ready") and beat.get("generation") == number:
                unknown = True  # it may have died between MOSEC's hand-over and its first heartbeat
        scheduler = self.gate.scheduler
        if held:
            again, poisoned = scheduler.worker_lost(held)
            self.metrics.count_resend("worker_lost", again)
            if poisoned:
                self.log.warning("watchdog: a request was alone in its envelope when a worker died with it a second"
                                 " time: it is answered 500 and quarantined")
        if unknown:
            self.metrics.count_resend("worker_lost", scheduler.forgive())

    async def _kill_worker(self, gen: Generation, kill: Kill) -> None:
        self.log.warning("watchdog: %s -> kill", kill.reason)
        if kill.dump_stack:
            await self._dump_stack(gen, kill.pid)
        try:
            os.kill(kill.pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # gone already
        except OSError as exc:  # PermissionError: the pid now belongs to someone else's process; not ours to kill
            self.log.warning("watchdog: cannot kill %d (%s): it is not our worker any more", kill.pid, exc.strerror)
            return
        self._pending[kill.pid] = PendingKill(kill.pid, kill.stage, time.monotonic() + KILL_CONFIRM_S)
        self.restarts["worker"] += 1
        self.metrics.count_restart("worker")
        siblings = [v for v in self._views if v.stage == kill.stage and v.pid != kill.pid
                    and v.status not in STOPPED_STATUSES | GONE_STATUSES and v.pid not in self._pending]
        if not siblings:
            self._open_outage(f"{kill.reason}: no {kill.stage} worker left until it is replaced")
            if not self.keep_last_worker:
                # MOSEC ends when the last worker of a stage dies: that exit is this remediation, not a crash.
                gen.expected_exit = True

    async def _dump_stack(self, gen: Generation, pid: int) -> None:
        """Ask a hung worker for its Python stack (faulthandler on SIGUSR1) and give it a moment to print."""
        asked = time.monotonic()
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:  # gone, or not ours any more (a reused pid): nothing to dump
            return
        deadline = asked + STACK_DUMP_WAIT_S
        while time.monotonic() < deadline:
            if gen.stack_seen > asked:
                await asyncio.sleep(0.1)  # the rest of the dump follows in the same burst
                return
            await asyncio.sleep(0.02)
        self.log.warning("watchdog: worker %d printed no stack within %.1fs", pid, STACK_DUMP_WAIT_S)

    async def _check_boot(self, gen: Generation, now: float) -> None:
        """A generation must have every worker ready by its own deadline."""
        if gen.booted:
            return
        cap = self.capacity()
        if all(c["live"] >= c["expected"] for c in cap.values()):
            gen.booted = True
            self.log.info("MOSEC generation %d: all workers ready after %.2fs", gen.number, now - gen.started)
            return
        failure = self.init_failure(gen.number, self._beats)  # read by _watch_workers this tick
        if failure is None and now <= gen.deadline:
            return
        cause = (f"MOSEC generation {gen.number}: {failure}" if failure else
                 f"MOSEC generation {gen.number} did not get its workers ready within "
                 f"{self.settings.startup_timeout_s:g}s: {gen.last_error()}")
        if not self.ever_ready:
            self.start_failures += 1
            if self.start_failures >= self.settings.start_attempts:
                self.fatal = f"the server failed to start {self.start_failures} time(s): {cause}"
                return
        elif not self.policy.allow_restart(now):
            self.fatal = f"gave up: {self.settings.restart_budget} restarts within " \
                         f"{self.settings.restart_window_s:g}s (last: {cause})"
            return
        await self._replace_generation(cause)

    async def _check_wedged(self, gen: Generation, now: float) -> None:
        if not gen.booted:
            return
        why = self.policy.wedged(now, self._views)
        if why:
            await self._wedged_restart(why)

    async def _wedged_restart(self, why: str) -> None:
        self.log.warning("watchdog: %s -> restart MOSEC", why)
        if not self.policy.allow_restart(time.monotonic()):
            self.fatal = (f"gave up: {self.settings.restart_budget} restarts within "
                          f"{self.settings.restart_window_s:g}s did not heal the server (last: {why})")
            return
        await self._replace_generation(why)

    # --- the canary --------------------------------------------------------------------------------------
    def _maybe_probe(self, now: float) -> None:
        if self._probe_task is not None or now < self._next_probe:
            return
        self._probe_task = asyncio.ensure_future(self.probe())
        self._probe_task.add_done_callback(lambda _t: self._wake.set() if self._wake else None)

    def _collect_probe(self) -> None:
        task = self._probe_task
        if task is None or not task.done():
            return
        self._probe_task = None
        result = task.result()
        self._on_probe(result)
        fast = not self.ever_ready or (self.gen is not None and self.gen.ready_at is None)
        self._next_probe = time.monotonic() + (STARTUP_PROBE_INTERVAL if fast else self.settings.probe_interval_s)

    async def probe(self) -> ProbeResult:
        import aiohttp

        s = self.settings
        url = f"{roles.base_url(s.host, s.port)}/rerank"
        headers = {PROBE_HEADER: self.probe_token}
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
                result = ProbeResult(error is None, at, time.monotonic() - t0, resp.status, error, t0)
        except asyncio.TimeoutError:
            result = ProbeResult(False, at, time.monotonic() - t0, None, f"no answer within {s.probe_timeout_s:g}s", t0)
        except aiohttp.ClientError as exc:
            result = ProbeResult(False, at, time.monotonic() - t0, None, f"{type(exc).__name__}: {exc}", t0)
        self.metrics.observe_probe(result.ok, result.latency_s)
        return result

    def _on_probe(self, result: ProbeResult) -> None:
        gen = self.gen
        self.last_probe = result
        now = time.monotonic()
        if result.ok:
            self.policy.record_probe(True, now)
            self.boot_wrong_answers = 0
            if gen is not None and gen.ready_at is None:
                gen.ready_at = now
                self.log.info("MOSEC generation %d answered its first probe after %.2fs", gen.number,
                              now - gen.started)
            if not self.ever_ready:
                self.ever_ready = True
                self.log.info("ready: first probe answered in %.3fs", result.latency_s or 0)
            if self._outage is not None:
                self._close_outage()
            if self._ready_notified:
                self.notifier.watchdog()  # only ever after a successful probe, and after READY=1
            return
        if not result.busy:
            # It answers, but wrongly: a broken model or pipeline, not a slow boot or an overload.
            self.boot_wrong_answers += 1
            if gen is not None and gen.ready_at is None and self.boot_wrong_answers >= self.settings.probe_failures:
                self.fatal = f"the server answers but fails the canary request: {result.error}; " \
                             f"{gen.last_error()}"
                return
        if gen is None or not gen.booted:
            return  # booting: no verdict yet (the generation's deadline decides)
        self.policy.record_probe(False, now)
        if self.ever_ready:
            self.log.warning("probe failed: %s", result.error)
            self._open_outage(result.error or "probe failed")

    def _open_outage(self, cause: str) -> None:
        if self._outage is None and self.ever_ready:
            self._outage = {"start": time.time(), "mono": time.monotonic(), "end": None, "seconds": None,
                            "cause": cause}
            self.outages.append(self._outage)

    def _close_outage(self) -> None:
        o = self._outage
        assert o is not None
        o["end"] = time.time()
        o["seconds"] = round(time.monotonic() - o.pop("mono"), 2)
        self.log.warning("service restored after %.1fs (%s)", o["seconds"], o["cause"])
        self._outage = None

    # --- state -------------------------------------------------------------------------------------------
    def _derive_state(self, gen: Generation) -> None:
        if not self.ever_ready:
            self.sm.to(State.STARTING, "loading the model" if not gen.booted else "waiting for the first answer")
            return
        problems = []
        probe = self.last_probe
        if probe is not None and not probe.ok:
            problems.append(f"probe failed: {probe.error}")
        if gen.ready_at is None:
            problems.append(f"MOSEC generation {gen.number} starting")
        for stage, c in self.capacity().items():
            if c["live"] < c["expected"]:
                problems.append(f"{c['live']} of {c['expected']} {stage} workers")
        if problems:
            self.sm.to(State.DEGRADED, "; ".join(problems))
        else:
            self.sm.to(State.RUNNING)

    def _on_transition(self, t: Transition) -> None:
        level = logging.INFO if t.new in (State.RUNNING, State.STARTING, State.STOPPING, State.STOPPED) \
            else logging.WARNING
        self.log.log(level, "state %s -> %s%s", t.old, t.new, f": {t.reason}" if t.reason else "")
        if t.new == State.RUNNING and not self._ready_notified:
            self._ready_notified = True
            self.notifier.ready(f"serving {self.model_name} on {self.settings.host}:{self.settings.port}")
        elif t.new == State.STOPPING:
            self.notifier.stopping(f"stopping: {t.reason}")
        else:
            self.notifier.status(f"{t.new}{': ' + t.reason if t.reason else ''}")
        self._publish()

    # --- stopping ----------------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        if not self.sm.terminal and self.sm.state != State.STOPPING:
            self.sm.to(State.STOPPING, f"draining {self.gate.taken} request(s)")
        self.gate.draining = True
        # leave room after the drain for stopping MOSEC within the caller's deadline
        t_end = time.monotonic() + self._stop_deadline_s
        deadline = t_end - min(CHILD_TERM_GRACE + 1.0, max(1.0, self._stop_deadline_s / 3))
        while self.gate.taken and self.stop_requests < 2 and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.gate.idle.wait(), timeout=0.2)
            except asyncio.TimeoutError:
                pass
            self._handle_signals()
        if self.gate.taken:
            self.log.warning("stopping with %d request(s) still in flight", self.gate.taken)
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_task.cancel()
            try:
                await self._reload_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.gen is not None:
            # drained: nothing of a client's is left in MOSEC, so there is nothing to wait for
            idle = self.gate.taken == 0
            grace = 0.2 if self.stop_requests > 1 or idle else max(0.2, min(CHILD_TERM_GRACE, t_end - time.monotonic() - 0.5))
            await self._stop_generation(self.gen, grace=grace)

    async def _cleanup(self) -> None:
        try:
            if self.gen is not None:
                await self._stop_generation(self.gen, grace=0.2)
            await asyncio.get_running_loop().run_in_executor(None, kill_instance, self.instance)
        except Exception:  # noqa: BLE001 - cleanup must go on
            self.log.exception("while stopping MOSEC")
        for door in self._doors:
            await door.close()
        for runner in self._runners:
            try:
                await runner.cleanup()
            except Exception:  # noqa: BLE001
                pass
        if self.gate is not None:  # None when the start failed before the front was opened
            await self.gate.close()
        s = self.settings
        if self.fatal:
            if not self.sm.terminal:
                self.sm.to(State.FAILED, self.fatal)
        elif not self.sm.terminal:
            if self.sm.state != State.STOPPING:
                self.sm.to(State.STOPPING, "stopping")
            self.sm.to(State.STOPPED)
        self._publish()
        remove_pidfile_if_ours(s.pidfile_path, os.getpid())
        unregister_server(self.instance)
        self._lock.release()

    # --- state for `status` ------------------------------------------------------------------------------
    def _publish(self) -> None:
        self._last_publish = time.monotonic()
        if self._run_dir_lost:
            return  # the run dir is gone for good, or another server's now: nothing of ours goes there
        probe = self.last_probe
        gen = self.gen
        data = {
            "pid": os.getpid(),
            "instance": self.instance,
            "state": self.sm.state.value,
            "reason": self.sm.reason,
            "healthy": self.health.verdict()[0] if self.sm.live and self.health is not None else False,
            "serving": self.health.serving()[0] if self.sm.live and self.health is not None else False,
            "model": self.model_name,
            "precision": self.precision,
            "variant_dir": str(self.variant_dir),
            "host": self.settings.host,
            "port": self.settings.port,
            "health_port": self.settings.health_port,
            "started_at": self.started_at,
            "updated_at": time.time(),
            "updated_mono": time.monotonic(),
            "mosec": {
                "pid": gen.pid if gen is not None and gen.exit_code is None else None,
                "port": gen.port if gen is not None else None,
                "generation": gen.number if gen is not None else None,
            },
            "capacity": self.capacity(),
            "reload": self.reload_status,
            "last_probe": probe.to_dict() if probe else None,
            "restarts": dict(self.restarts),
            "worker_deaths": self.worker_deaths,
            "outages": [{k: v for k, v in o.items() if k != "mono"} for o in self.outages],
        }
        try:
            write_json_atomic(self.settings.state_path, data)
        except OSError:
            self.log.exception("cannot write %s", self.settings.state_path)


def served_precision(variant_dir: Path, asked: str) -> str:
    """The precision a variant computes in: with ``auto``, the one auto chose (the build's manifest says)."""
    return read_variant_manifest(Path(variant_dir)).get("precision") or asked
