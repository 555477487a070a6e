"""The run dir: the lock that says who runs, the pidfile that says where it is, and everything else a server
keeps there (its state, its log, MOSEC's sockets, the workers' heartbeats, requests from ``rerankctl``).

- The lock is ``flock`` on a file, held by the supervisor for its whole life. The kernel drops it when the
  process dies however it dies, so it can never go stale, and it is the only thing that decides "running".
- The pidfile is JSON, written atomically (temp + rename): pid, start time, process group, instance id,
  ports, model. Before any signal, ``identify`` checks pid *and* start time, so a recycled pid is never
  signalled. The start time is the kernel's own, in clock ticks since boot (``/proc/<pid>/stat`` field
  22): psutil's ``create_time`` is derived from the wall clock's boot time and moves when the clock is
  stepped, which would make a live server look like a stranger.
- Whether the lock is held is read from ``/proc/locks``, never by taking the lock (a ``status`` that
  took it for an instant could make a ``serve`` starting at that moment fail with "already running").
- A start owns its run dir (``RunDir.prepare``): under the lock, whatever a dead server left is removed before
  anything binds, and each generation's paths carry the server's instance.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import AlreadyRunning, ServerStartError
from ..protocol.atomic import write_json_atomic
from .procs import identify, kill_instance


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


# --- the supervisor's side: one object for everything it keeps in its run dir ------------------------------
UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path is 108, with its NUL)
# What a server leaves in its run dir besides the worker and MOSEC folders (the log stays: it is the record; a
# pidfile is read first, to reap what its server left running, and then replaced; ``.*.json.*`` are the
# temporary files of a write cut short)
LEFTOVERS = ("state.json", "stop-request.json", "reload-request.json", "mosec-config-*.json", ".*.json.*")


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


def remove_tree(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a folder and all it holds; nothing if absent."""
    import shutil

    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


class RunDir:
    """What the supervisor keeps in its run dir, and the lock it holds on it for its whole life."""

    def __init__(self, settings, instance: str) -> None:
        self.settings = settings
        self.instance = instance
        self.lock = RunLock(settings.lock_path)
        self.lost = False  # removed and not ours any more: nothing of ours goes there

    def take(self) -> None:
        """The run lock, or ``AlreadyRunning`` naming the server that holds it."""
        if not self.lock.acquire():
            info, _ = read_pidfile(self.settings.pidfile_path)
            where = f" (pid {info.pid}, port {info.data.get('port')})" if info else ""
            raise AlreadyRunning(f"a server is already running{where}",
                                 "see: rerankctl status; stop it with: rerankctl stop")

    def reap_previous(self, log) -> None:
        """We hold the lock, so any recorded server is dead: kill what its supervisor left running."""
        info, why = read_pidfile(self.settings.pidfile_path)
        killed = kill_instance(info.instance) if info is not None else []
        if killed:
            log.warning("killed %d leftover process(es) of a dead server: %s", len(killed), killed)
        if info is not None or why not in ("missing", None):
            log.info("replacing a %s pidfile%s", why or "stale", f" (pid {info.pid})" if info else "")

    def stop_deadline(self, pid: int) -> Optional[float]:
        """The drain deadline ``rerankctl stop --timeout S`` left for the server ``pid``, if it left one."""
        req = self.take_request("stop-request.json")
        try:
            if req.get("pid") == pid and float(req.get("drain_s", 0)) > 0:
                return float(req["drain_s"])
        except (TypeError, ValueError):
            pass
        return None

    def prepare(self) -> None:
        """A start owns its run dir: under the lock, everything a previous server could have left there is
        removed before anything binds. A server killed with SIGKILL (an OOM kill of its cgroup, a container
        runtime's kill) leaves MOSEC's IPC sockets, which its controller refuses to bind over (AddrInUse),
        its generations' configs, the workers' heartbeats, request files, its state. The log stays. And each
        generation's paths carry this server's instance (``generation_paths``): a dead server's can never be
        taken for ours, even if one could not be removed."""
        s = self.settings
        ensure_private_dir(s.run_dir)
        for d in (s.worker_dir, s.mosec_dir):
            remove_tree(d)
        for pattern in LEFTOVERS:
            for path in s.run_dir.glob(pattern):
                remove_tree(path)
        self.make_dirs()

    def make_dirs(self) -> None:
        s = self.settings
        ensure_private_dir(s.run_dir)
        for d in (s.worker_dir, s.mosec_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def generation_paths(self, number: int) -> tuple[Path, Path]:
        """(config file, MOSEC's folder) of generation ``number``: unique to this server and generation."""
        # 8 hex digits of the instance tell this server's generations from a dead one's, and leave a Unix
        # socket's 107 bytes as much of the run dir's path as they can
        tag = f"{self.instance[:8]}.g{number}"
        folder = self.settings.mosec_dir / tag
        # MOSEC puts its IPC sockets in the folder: a Unix socket's path has at most 107 bytes
        socket = folder / "ipc_Score_1.socket"
        if len(os.fsencode(socket)) > UNIX_PATH_MAX:
            raise ServerStartError(f"the run dir {self.settings.run_dir} is too long a path for MOSEC's sockets"
                                   f" ({len(os.fsencode(socket))} bytes, at most {UNIX_PATH_MAX})",
                                   "choose a shorter --run-dir (RERANKER_RUN_DIR)")
        return self.settings.mosec_dir / f"{tag}.json", folder

    def forget_generation(self, number: int) -> None:
        """Its config (which holds its secret) and MOSEC's folder (which MOSEC removes only when it ends well)."""
        if self.lost:
            return  # the run dir is not ours any more: its files may be another server's
        config, folder = self.generation_paths(number)
        config.unlink(missing_ok=True)
        remove_tree(folder)

    def write_pidfile(self, data: dict) -> None:
        register_server(self.instance, {k: data.get(k) for k in ("pid", "start_ticks", "host", "port")}
                        | {"run_dir": str(self.settings.run_dir)})
        write_pidfile(self.settings.pidfile_path, data)

    def publish(self, state: dict, log) -> None:
        """``state.json``: what ``status`` reads (never written into a run dir that is not ours any more).
        Rewritten every second on the supervisor's loop, so not flushed to the disk: the rename still shows
        readers a whole file, and after a power cut there is no server for it to describe. Flushing cost the
        loop (and every request waiting on it) ~0.35 ms a second more on this machine's disk, and a disk
        write a second for as long as the server runs (benchmarks/HISTORY.md)."""
        if self.lost:
            return
        try:
            write_json_atomic(self.settings.state_path, state, sync=False)
        except OSError:
            log.exception("cannot write %s", self.settings.state_path)

    def take_request(self, name: str) -> dict:
        """A request ``rerankctl`` left for us (``stop-request.json``, ``reload-request.json``), read once and
        removed; {} when there is none or it cannot be read."""
        path = self.settings.run_dir / name
        try:
            request = json.loads(path.read_text(encoding="utf-8"))
            path.unlink(missing_ok=True)
        except (OSError, ValueError):
            return {}
        return request if isinstance(request, dict) else {}

    def lock_is_here(self) -> bool:
        return self.lock.is_at_path()

    def restore(self, log, pidfile: dict) -> Optional[str]:
        """The run dir (or the lock file in it) was removed under the running server: make it again, take a
        new lock there, open the log files again and write the pidfile. None when done; else why not (and
        ``lost`` is set)."""
        s = self.settings
        try:
            self.make_dirs()
            lock = RunLock(s.lock_path)
            taken = lock.acquire()
        except (OSError, ServerStartError) as exc:
            self.lost = True
            return (f"the run dir {s.run_dir} was removed and cannot be made again "
                    f"({getattr(exc, 'message', None) or exc}); stopping: nothing could find or stop this server")
        if not taken:
            self.lost = True
            return f"the run dir {s.run_dir} was removed and another server holds it now; stopping this one"
        old, self.lock = self.lock, lock
        old.release()
        reopen_log_files(log)
        self.write_pidfile(pidfile)
        log.warning("the run dir %s was removed under the running server: its lock, pidfile and state are back;"
                    " moving MOSEC to a new generation in it", s.run_dir)
        return None

    def close(self, pid: int) -> None:
        """The end: the pidfile (if it is still ours), the registry entry, the lock."""
        if not self.lost:
            remove_pidfile_if_ours(self.settings.pidfile_path, pid)
        unregister_server(self.instance)
        self.lock.release()


def reopen_log_files(log) -> None:
    """Log files whose path was removed are opened again at that path (a handler otherwise goes on writing to
    the removed file, which nobody can read). Public logging API only: ``setStream`` swaps the stream."""
    import logging

    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler) and not os.path.exists(handler.baseFilename):
            stream = open(handler.baseFilename, handler.mode, encoding=handler.encoding,  # noqa: SIM115
                          errors=handler.errors)
            old = handler.setStream(stream)
            if old is not None:
                old.close()
