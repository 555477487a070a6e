"""One MOSEC generation: start it, know its deadline, read its output, see it exit, stop it.

A generation is one run of ``python -m reranker_ops.serving.app`` in its own process group: the Python
main process, the Rust controller and the workers. Each generation has its own start deadline and its
own internal port; the supervisor replaces a generation, never revives one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional

import psutil

from .runstate import GENERATION_ENV, kill_marked

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
    # single-threaded to fork its workers (serving.app._worker_start_method). Our numpy work is small.
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


class Generation:
    """A running MOSEC tree. ``exit_code`` is None while its main process lives."""

    def __init__(self, number: int, proc: asyncio.subprocess.Process, port: int, startup_timeout_s: float,
                 log: logging.Logger, tail: deque) -> None:
        self.number = number
        self.proc = proc
        self.port = port
        self.started = time.monotonic()
        self.deadline = self.started + startup_timeout_s
        self.ready_at: Optional[float] = None
        self.booted = False  # every expected worker has reported ready
        self.expected_exit = False  # we asked it to end (a remediation or a stop)
        self.secret = b""  # what the gate prefixes to every request; the score worker checks it
        self.variant_dir: Optional[Path] = None
        self.model_name = ""
        self.max_length = 0  # tokens of the model's window, as the workers truncate
        self.log = log
        self.tail = tail
        self.stack_seen = 0.0  # monotonic time a worker's stack dump started to arrive
        self.exited = asyncio.Event()
        self._waiter = asyncio.ensure_future(self._wait_exit())
        self._reader = asyncio.ensure_future(self._read_output())

    @classmethod
    async def spawn(cls, number: int, config_path: Path, port: int, env: dict, cwd: Path,
                    startup_timeout_s: float, log: logging.Logger, tail: deque) -> "Generation":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reranker_ops.serving.app", str(config_path), str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: a stop kills the whole group
            env=env,
            cwd=str(cwd),
        )
        log.info("started MOSEC generation %d (pid %d, internal port %d)", number, proc.pid, port)
        return cls(number, proc, port, startup_timeout_s, log, tail)

    # One waiter for the whole life of the process: asyncio keeps every waiter of a process until it
    # exits, so waiting anew on every tick (and cancelling) would grow without bound.
    async def _wait_exit(self) -> None:
        await self.proc.wait()
        self.exited.set()

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

    async def stop(self, grace: float, mark: str) -> None:
        """SIGTERM the main process, wait ``grace``, then SIGKILL the group and every marked process."""
        self.expected_exit = True
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
