"""Which process is what, and which address to call: answered once, here.

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
    process on the machine (3.5 ms a call here, more on a busy host); the kernel's per-thread ``children``
    lists walk only this tree (0.3 ms). psutil is the fallback where the kernel has no such lists."""
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


def connect_host(bind_host: str) -> str:
    """The address a local client uses to reach a server bound to ``bind_host`` (wildcards → loopback)."""
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host in ("::", "[::]"):
        return "::1"
    return bind_host.strip("[]")


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: IPv6 literals in brackets."""
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host


def base_url(bind_host: str, port: int) -> str:
    return f"http://{url_host(connect_host(bind_host))}:{port}"
