"""Run state: the lock that says who runs, and the pidfile that says where it is.

- The lock is ``flock`` on a file, held by the supervisor for its whole life. The kernel drops it when the
  process dies however it dies, so it can never go stale, and it is the only thing that decides "running".
- The pidfile is JSON, written atomically (temp + rename): pid, start time, process group, instance id,
  ports, model. Before any signal, ``identify`` checks pid *and* start time with psutil, so a recycled
  pid is never signalled.
- Every process of a server (MOSEC main, controller, workers) carries ``RERANKER_INSTANCE=<id>`` in its
  environment, so leftovers of a dead supervisor are found by that mark, not by guessing from names.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

from ..models.store import write_json_atomic

INSTANCE_ENV = "RERANKER_INSTANCE"
CREATE_TIME_TOLERANCE = 0.05  # seconds: psutil's create_time is derived from clock ticks


class RunLock:
    """An exclusive, non-blocking ``flock`` held until ``release`` or process death."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: children (MOSEC) must not inherit the lock and keep it alive after we die.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def lock_is_held(path: Path) -> bool:
    """True while some process holds the run lock (probing takes it for an instant if it is free)."""
    probe = RunLock(path)
    if probe.acquire():
        probe.release()
        return False
    return True


@dataclass
class PidInfo:
    pid: int
    create_time: float
    pgid: int
    instance: str
    data: dict


def read_pidfile(path: Path) -> tuple[Optional[PidInfo], Optional[str]]:
    """The pidfile's content, or (None, why it is unusable). Garbage and empty files are not errors."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    if not raw.strip():
        return None, "empty"
    try:
        data = json.loads(raw)
        return (
            PidInfo(int(data["pid"]), float(data["create_time"]), int(data["pgid"]), str(data["instance"]), data),
            None,
        )
    except (ValueError, KeyError, TypeError):
        return None, "garbage"


def write_pidfile(path: Path, data: dict) -> None:
    write_json_atomic(path, data)


def remove_pidfile_if_ours(path: Path, pid: int) -> None:
    info, _ = read_pidfile(path)
    if info is None or info.pid == pid:
        path.unlink(missing_ok=True)


def identify(pid: int, create_time: float) -> Optional[psutil.Process]:
    """The process only if it is the very one recorded: same pid and same start time."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def instance_processes(instance: str) -> list[psutil.Process]:
    """Every live process carrying our instance mark in its environment."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(INSTANCE_ENV) == instance:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def kill_instance(instance: str, sig: int = 9, timeout: float = 10.0) -> list[int]:
    """SIGKILL (by default) every process of an instance; wait until they are gone. Returns their pids."""
    procs = instance_processes(instance)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in procs]
