"""Which address to call, and who holds a port: for the CLI, the supervisor and the front alike."""

from __future__ import annotations

import psutil


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
