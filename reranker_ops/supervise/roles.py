"""Which process is what: answered once, here (which address to call: ``addresses.py``).

Roles: ``supervisor`` (holds the lock), ``mosec`` (MOSEC's main process, the supervisor's child),
``controller`` (MOSEC's Rust binary), ``score`` (workers, known by their heartbeat),
``helper`` (anything else in the tree, e.g. multiprocessing's resource tracker).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Optional

import psutil


def role_of(proc: psutil.Process, *, supervisor_pid: Optional[int], mosec_pid: Optional[int],
            beats: dict[int, dict]) -> str:
    if proc.pid == supervisor_pid:
        return "supervisor"
    if proc.pid == mosec_pid:
        return "mosec"
    if proc.pid in beats:
        return str(beats[proc.pid].get("stage", "worker"))
    try:
        if os.path.basename(proc.exe()) == "mosec":
            return "controller"
    except psutil.Error:
        pass
    return "helper"


def tree(root_pid: int) -> list[psutil.Process]:
    """The process and all its descendants; [] when it is gone.

    The supervisor asks several times a second. psutil finds children by reading the status of every
    process on the machine (the more processes, the slower); the kernel's per-thread ``children`` lists
    walk only this tree, an order of magnitude less. psutil is the fallback where the kernel has no such
    lists."""
    try:
        root = psutil.Process(root_pid)
    except psutil.NoSuchProcess:
        return []
    pids = _descendants(root_pid)
    if pids is None:
        try:
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
    out = [root]
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue  # exited while we looked
    return out


def _descendants(root_pid: int) -> list[int] | None:
    """Descendants' pids from /proc/<pid>/task/<tid>/children, breadth first; None if the kernel lacks them."""
    if not os.path.exists(f"/proc/{root_pid}/task/{root_pid}/children"):
        return None
    found: list[int] = []
    queue = deque([root_pid])
    seen = {root_pid}
    while queue:
        pid = queue.popleft()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                    kids = f.read().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in seen:
                    seen.add(kid)
                    found.append(kid)
                    queue.append(kid)
    return found
