"""Run state: the lock that says who runs, and the pidfile that says where it is.

- The lock is ``flock`` on a file, held by the supervisor for its whole life. The kernel drops it when the
  process dies however it dies, so it can never go stale, and it is the only thing that decides "running".
- The pidfile is JSON, written atomically (temp + rename): pid, start time, process group, instance id,
  ports, model. Before any signal, ``identify`` checks pid *and* start time, so a recycled pid is never
  signalled. The start time is the kernel's own, in clock ticks since boot (``/proc/<pid>/stat`` field
  22): psutil's ``create_time`` is derived from the wall clock's boot time and moves when the clock is
  stepped, which would make a live server look like a stranger.
- Whether the lock is held is read from ``/proc/locks``, never by taking the lock (a ``status`` that
  took it for an instant could make a ``serve`` starting at that moment fail with "already running").
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
GENERATION_ENV = "RERANKER_GENERATION"


def start_ticks(pid: int) -> Optional[int]:
    """When the process started, in clock ticks since boot: immune to wall-clock steps. None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'
    fields = raw[raw.rindex(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    except (IndexError, ValueError):
        return None


class RunLock:
    """An exclusive, non-blocking ``flock`` held until ``release`` or process death."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = path
        self.create = create
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        flags = os.O_RDWR | os.O_CLOEXEC
        if self.create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags |= os.O_CREAT
        # O_CLOEXEC: children (MOSEC) must not inherit the lock and keep it alive after we die.
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            return True if not self.create else False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def is_at_path(self) -> bool:
        """Whether the file we hold the lock on is still the one at ``path``. A cleanup of the run dir (of
        ``/run/user/<uid>`` or ``/tmp``, or an operator's ``rm``) can unlink it under us: the lock is then
        held on a file nobody can find, and a second server could take a fresh one at the same path."""
        if self.fd is None:
            return False
        try:
            there = os.stat(self.path)
        except OSError:
            return False
        held = os.fstat(self.fd)
        return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def lock_holder(path: Path) -> Optional[int]:
    """The pid holding the run lock (0 if it is held by a process we cannot see), None if it is free.

    Read from ``/proc/locks`` by the lock file's device and inode: looking never takes the lock.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:  # no /proc/locks: fall back to trying (and at once releasing) the lock
        probe = RunLock(path, create=False)
        if probe.acquire():
            probe.release()
            return None
        return 0
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (blocked waiters have "->" after the number)
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[2] != "->":
            if parts[5] == ident:
                try:
                    return int(parts[4])
                except ValueError:
                    return 0
    return None


def lock_is_held(path: Path) -> bool:
    """True while some process holds the run lock. Never takes it."""
    return lock_holder(path) is not None


@dataclass
class PidInfo:
    pid: int
    start_ticks: Optional[int]
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
            PidInfo(int(data["pid"]), int(data["start_ticks"]) if data.get("start_ticks") is not None else None,
                    int(data["pgid"]), str(data["instance"]), data),
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


def identify(pid: int, ticks: Optional[int]) -> Optional[psutil.Process]:
    """The process only if it is the very one recorded: same pid and same start time in clock ticks."""
    if ticks is None or start_ticks(pid) != ticks:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def marked_processes(key: str, value: str) -> list[psutil.Process]:
    """Every live process whose environment has ``key=value`` (our instance or generation mark)."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(key) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def instance_processes(instance: str) -> list[psutil.Process]:
    return marked_processes(INSTANCE_ENV, instance)


def kill_marked(key: str, value: str, sig: int = 9, timeout: float = 10.0) -> list[int]:
    """Signal (SIGKILL by default) every process with the mark; wait until they are gone. Their pids."""
    procs = marked_processes(key, value)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in procs]


def kill_instance(instance: str, sig: int = 9, timeout: float = 10.0) -> list[int]:
    """SIGKILL (by default) every process of an instance; wait until they are gone. Returns their pids."""
    return kill_marked(INSTANCE_ENV, instance, sig, timeout)


# --- where servers run: a per-user registry, so 'status' from anywhere can point at a running server -----
def registry_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME")
    if not base:
        home = os.path.expanduser("~")
        if home == "~":  # no home directory (a service's dynamic user): no registry
            raise OSError("no home directory")
        base = os.path.join(home, ".local", "state")
    return Path(base) / "rerankctl" / "servers"


def register_server(instance: str, data: dict) -> Optional[Path]:
    """Record a running server (best effort: a read-only home just means no registry)."""
    try:
        d = registry_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{instance}.json"
        write_json_atomic(path, data)
        return path
    except OSError:
        return None


def unregister_server(instance: str) -> None:
    try:  # noqa: SIM105
        (registry_dir() / f"{instance}.json").unlink(missing_ok=True)
    except OSError:
        pass


def registered_servers() -> list[dict]:
    """Every registered server that still runs (pid and start ticks match); stale entries are dropped."""
    out: list[dict] = []
    try:
        entries = sorted(registry_dir().glob("*.json"))
    except OSError:
        return out
    for path in entries:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            alive = identify(int(data["pid"]), data.get("start_ticks")) is not None
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
            data = {}
        if alive:
            out.append(data)
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
    return out
