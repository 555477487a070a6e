"""sd_notify without libraries: one datagram on the socket systemd names in ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import os
import socket
from typing import Optional


class Notifier:
    """Silent when there is no socket (not under systemd). Never raises: a lost datagram is not fatal."""

    def __init__(self, address: Optional[str], ready_fd: Optional[int] = None) -> None:
        self.address = address or None
        self.ready_fd = ready_fd  # `serve --daemon`'s caller waits on this pipe (control.start_daemon)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        if not self.address:
            return False
        msg = "\n".join(lines)
        addr = self.address
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(addr)
                sock.sendall(msg.encode("utf-8"))
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        if self.ready_fd is not None:
            fd, self.ready_fd = self.ready_fd, None
            try:
                os.write(fd, b"R")
                os.close(fd)
            except OSError:  # the caller is gone: nobody to tell
                pass
        return self.notify("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")
