"""One MOSEC generation: start it, know its deadline, read its output, see it exit, stop it.

A generation is one run of ``python -m reranker_ops.worker.app`` in its own process group: the Python main
process, the Rust controller and the workers. Each generation has its own start deadline, its own internal
port and secret, and owns its state (``GenState``: starting, booted, ready, stopping, exited), advanced only by
its own ``transition`` (supervisord's ``Subprocess``); the supervisor replaces a generation, never revives one.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import psutil

from ..protocol.api import Limits
from ..protocol.genconfig import GenerationConfig, MosecArgs
from ..protocol.manifest import read_variant_manifest
from .procs import GENERATION_ENV, INSTANCE_ENV, kill_marked

CHILD_ENV_DROP_PREFIXES = ("MOSEC_", "RERANKER_", "HF_", "HUGGING_FACE_")
CHILD_ENV_DROP = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                  "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GITHUB_TOKEN"}


def child_environment(base: dict[str, str], instance_env: str, instance: str, home: Optional[Path] = None
                      ) -> dict[str, str]:
    """The environment MOSEC gets: the caller's, minus every secret and setting of ours (MOSEC reads its
    configuration from the file we write, and its workers never need a key or a token).

    ``home``: used as HOME when there is none (a service's dynamic user): importing OpenVINO looks up the
    home directory (its telemetry's consent file) and fails the worker's start without one.
    """
    env = {k: v for k, v in base.items()
           if not k.startswith(CHILD_ENV_DROP_PREFIXES) and k not in CHILD_ENV_DROP}
    if home is not None and not env.get("HOME"):
        env["HOME"] = str(home)
    env[instance_env] = instance
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # numpy's OpenBLAS starts a thread pool when imported; MOSEC's main process imports numpy and must stay
    # single-threaded to fork its workers (worker.app._worker_start_method). Our numpy work is small.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Test-only fault injection travels in PYTHONPATH + RERANKER_TEST_*; keep those.
    env.update({k: v for k, v in base.items() if k.startswith("RERANKER_TEST_")})
    return env


LEVELS = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
          "WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def mosec_record(line: str) -> tuple[int, str]:
    """MOSEC logs JSON records (Rust and Python alike); our log gets one readable line at their level:
    ``message k=v ... (target)``. Anything else (tracebacks, stack dumps) passes through as it is."""
    if not line.startswith("{"):
        return logging.INFO, line
    try:
        rec = json.loads(line)
        fields = dict(rec.get("fields") or {})
        message = str(fields.pop("message", ""))
    except (ValueError, AttributeError, TypeError):
        return logging.INFO, line
    extra = " ".join(f"{k}={str(v).strip(chr(34))}" for k, v in fields.items())
    target = str(rec.get("target", "")).replace("mosec::", "")
    text = " ".join(part for part in (message, extra, f"({target})" if target else "") if part)
    return LEVELS.get(str(rec.get("level", "INFO")).upper(), logging.INFO), text


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port for MOSEC's controller (it binds it once its workers are ready; until then another
    process could take it, which is why the gate checks who listens there before it sends anything)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class GenState(enum.Enum):
    STARTING = "starting"  # spawned; its workers load the model
    BOOTED = "booted"  # every worker it should have reported ready
    READY = "ready"  # it answered a canary
    STOPPING = "stopping"  # asked to end (a stop, a replacement, the end of a reload's drain)
    EXITED = "exited"  # its main process is gone


_ORDER = (GenState.STARTING, GenState.BOOTED, GenState.READY, GenState.STOPPING, GenState.EXITED)


def generation_config(settings, number: int, folder: Path, variant_dir: Path, model_name: str,
                      keep_last_worker: bool, port: Optional[int] = None,
                      secret: Optional[bytes] = None) -> GenerationConfig:
    """What the supervisor hands a new generation (``protocol/genconfig.py``), from its settings: a free
    loopback port and a new secret unless given."""
    port = free_port() if port is None else port
    secret = secrets.token_hex(16).encode("ascii") if secret is None else secret
    s = settings
    return GenerationConfig(
        generation=number, variant_dir=str(variant_dir), model_name=model_name, secret=secret.decode("ascii"),
        worker_dir=str(s.worker_dir), workers=s.workers, threads=s.effective_threads(), pin_threads=s.pin_threads,
        token_budget=s.token_budget, attention_budget=s.attention_budget, max_length=s.max_length,
        window_stride=s.window_stride, kernel_cache=s.kernel_cache,
        limits=Limits(max_documents=s.max_documents, max_document_chars=s.max_document_chars, windows=s.windows,
                      max_windows=s.max_windows, max_query_chars=s.max_query_chars,
                      served_models=(model_name, *(a for a in s.served_models if a != model_name))),
        mosec=MosecArgs(
            address="127.0.0.1", port=port,
            # above the gate's deadline: only the gate fails a late request, alone (MOSEC would fail the whole
            # batch); a hung worker is the watchdog's, not this timeout's
            timeout_ms=int((s.request_timeout_s + 10) * 1000), capacity=s.queue_capacity, path=str(folder),
            # the gate enforces the user's limit; MOSEC gets room for the envelope's head and the parts' heads
            max_request_size=s.max_body_bytes + 4096, log_level="debug" if s.debug else "info"),
        keep_last_worker=keep_last_worker,
    )


class Generation:
    """A running MOSEC tree. ``exit_code`` is None while its main process lives."""

    def __init__(self, number: int, proc: asyncio.subprocess.Process, config: GenerationConfig,
                 variant_dir: Path, startup_timeout_s: float, log: logging.Logger, tail: deque,
                 on_exit: Optional[Callable[[], None]] = None) -> None:
        self.number = number
        self.proc = proc
        self.port = config.mosec.port
        self.secret = config.secret.encode("ascii")  # the gate seals every envelope with it; the worker checks
        self.variant_dir = variant_dir
        self.model_name = config.model_name
        model_max = int(read_variant_manifest(variant_dir).get("max_length") or 512)
        self.max_length = min(config.max_length, model_max) if config.max_length else model_max  # the window
        self.started = time.monotonic()
        self.deadline = self.started + startup_timeout_s
        self.state = GenState.STARTING
        self._was_booted = False
        self.ready_at: Optional[float] = None
        self.expected_exit = False  # we asked it to end (a remediation or a stop): its exit is no crash
        self.log = log
        self.tail = tail
        self.stack_seen = 0.0  # monotonic time a worker's stack dump started to arrive
        self.exited = asyncio.Event()
        self._on_exit = on_exit  # the supervisor's loop wakes at once
        self._waiter = asyncio.ensure_future(self._wait_exit())
        self._reader = asyncio.ensure_future(self._read_output())

    @classmethod
    async def spawn(cls, config: GenerationConfig, config_path: Path, variant_dir: Path, instance: str,
                    base_env: dict, cwd: Path, startup_timeout_s: float, log: logging.Logger,
                    tail: deque, on_exit: Optional[Callable[[], None]] = None) -> "Generation":
        """Write its configuration (0600: it holds the secret) and start it, in its own process group."""
        config.write(config_path)
        env = child_environment(base_env, INSTANCE_ENV, instance, home=cwd)
        env[GENERATION_ENV] = f"{instance}.{config.generation}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reranker_ops.worker.app", str(config_path), str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: a stop kills the whole group
            env=env,
            cwd=str(cwd),
        )
        log.info("started MOSEC generation %d (pid %d, internal port %d)", config.generation, proc.pid,
                 config.mosec.port)
        return cls(config.generation, proc, config, variant_dir, startup_timeout_s, log, tail, on_exit)

    # --- its state ------------------------------------------------------------------------------------
    def transition(self, new: GenState, why: str = "") -> bool:
        """Move forward to ``new`` (never back; EXITED from anywhere); False when that is no move."""
        if new == self.state or (new != GenState.EXITED and _ORDER.index(new) < _ORDER.index(self.state)):
            return False
        self.log.debug("MOSEC generation %d: %s -> %s%s", self.number, self.state.value, new.value,
                       f" ({why})" if why else "")
        self.state = new
        if new == GenState.READY:
            self.ready_at = time.monotonic()
        elif new == GenState.STOPPING:
            self.expected_exit = True
        return True

    def mark_booted(self) -> None:
        """Every worker it should have reported ready (a canary may have been answered before that)."""
        self._was_booted = True
        self.transition(GenState.BOOTED, "every worker ready")

    @property
    def booted(self) -> bool:
        """Every worker it should have was ready at some point."""
        return self._was_booted

    def expect_exit(self) -> None:
        """It will end because we make it end (its last worker killed by the watchdog, under MOSEC's own rule:
        a stage whose last worker dies ends MOSEC)."""
        self.expected_exit = True

    # One waiter for the whole life of the process: asyncio keeps every waiter of a process until it
    # exits, so waiting anew on every tick (and cancelling) would grow without bound.
    async def _wait_exit(self) -> None:
        await self.proc.wait()
        self.transition(GenState.EXITED, f"code {self.proc.returncode}")
        self.exited.set()
        if self._on_exit is not None:
            self._on_exit()

    async def _read_output(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text.startswith(("Current thread 0x", "Thread 0x")):
                self.stack_seen = time.monotonic()
            level, text = mosec_record(text)
            self.tail.append(text)
            self.log.log(level, "mosec[%d]: %s", self.number, text)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exit_code(self) -> Optional[int]:
        return self.proc.returncode

    def gone(self) -> bool:
        """The main process has died, even if asyncio has not reported its exit yet."""
        if self.proc.returncode is not None:
            return True
        try:
            return psutil.Process(self.proc.pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def last_error(self) -> str:
        for line in reversed(self.tail):
            stripped = line.strip()
            if not stripped:
                continue
            head = stripped.split(":", 1)[0]
            if head.endswith(("Error", "Exception")) or "error" in head.lower():
                return stripped[:300]
        return self.tail[-1][:300] if self.tail else "no output"

    async def drain_output(self, timeout: float = 2.0) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass

    async def collect_exit(self) -> str:
        """After its main process died unasked: the rest of its group killed (its controller and workers
        outlive it and hold the output pipe open), its output read to the end; the cause, for the log."""
        try:
            await asyncio.wait_for(self.exited.wait(), timeout=2)
        except asyncio.TimeoutError:
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        await self.drain_output()
        cause = f"MOSEC exited with code {self.exit_code}: {self.last_error()}"
        self.log.error("%s (%s)", cause, "after a remediation" if self.expected_exit else "crash")
        return cause

    async def stop(self, grace: float, mark: str) -> None:
        """SIGTERM the main process, wait ``grace``, then SIGKILL the group and every marked process."""
        self.transition(GenState.STOPPING)
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.exited.wait(), timeout=max(0.05, grace))
            except asyncio.TimeoutError:
                if grace >= 1:
                    self.log.warning("MOSEC generation %d did not stop within %.1fs: killing its group",
                                     self.number, grace)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        # workers that left the group (none should) are found by this generation's mark
        await asyncio.get_running_loop().run_in_executor(None, kill_marked, GENERATION_ENV, mark)
        try:
            await asyncio.wait_for(self.exited.wait(), timeout=5)
        except asyncio.TimeoutError:
            self.log.error("MOSEC generation %d (pid %d) did not exit after SIGKILL", self.number, self.proc.pid)
        await self.drain_output()
        self._reader.cancel()
