"""Processes: who is who (pid and start time in clock ticks), who is alive, and the ones that carry our mark.

Every process of a server (MOSEC's main process, its controller and its workers) carries
``RERANKER_INSTANCE=<id>`` in its environment, and each generation's ``RERANKER_GENERATION=<id>.<n>``, so what a
dead supervisor left behind is found by that mark, not by guessing from names. The signals the watchdog sends
go through ``OsCalls``, one small object a test can replace.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import psutil

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


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (read from /proc: no psutil object for a check made every tick)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


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


class OsCalls:
    """The signals the supervisor sends to its workers, in one place (a test fakes it)."""

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        os.kill(pid, sig)

    def killpg(self, pgid: int, sig: int = signal.SIGKILL) -> None:
        os.killpg(pgid, sig)


def reap_orphans(ours: set[int]) -> None:
    """As PID 1 (in a container), collect zombies that are not our own children: orphans are re-parented to
    us. A MOSEC generation's main process (in ``ours``) is left to asyncio's watcher, which reports its exit."""
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


def tree_pss(root: Optional[int] = None) -> Optional[int]:
    """Proportional set size of a process and all its descendants (this process by default)."""
    total = 0
    try:
        me = psutil.Process(root) if root else psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
    except psutil.Error:
        return None
    return total
