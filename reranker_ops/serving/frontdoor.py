"""The listening socket in front of aiohttp: a bound on open connections and deadlines on idle ones.

aiohttp parses HTTP; this decides who gets a connection and how long a connection may sit without a
request in progress:
- at most ``max_connections`` open at once; one more is answered ``429`` + ``Retry-After`` at once and
  closed after its request was read and thrown away (closing on unread data would reset the client);
- a new connection must deliver its request headers within ``header_timeout_s``, and a kept-alive one its
  next request within ``idle_timeout_s``, or it gets ``408`` and is closed. While a request is being
  handled (``busy``) no connection deadline runs: the handler has its own body and answer deadlines.

So a slow or silent client costs one descriptor for seconds, never forever, and a flood of connections
cannot take the descriptors the canary and the upstream connections need.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REJECT_LINGER_S = 2.0


def raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    kinds = {408: "timeout", 429: "overloaded", 503: "unavailable"}
    body = json.dumps({"error": kinds.get(status, "error"), "message": message, "status": status}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body


class _Reject(asyncio.Protocol):
    """Answers once, reads and drops whatever the client sends, closes when it does or soon after
    (``linger``: closing on unread data would make the kernel reset the connection)."""

    def __init__(self, door: "FrontDoor", payload: bytes, linger: bool = True) -> None:
        self.door = door
        self.payload = payload
        self.linger = linger
        self.transport: Optional[asyncio.Transport] = None
        self._timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.door.rejecting += 1
        self.transport.write(self.payload)  # type: ignore[union-attr]
        self._timer = asyncio.get_running_loop().call_later(REJECT_LINGER_S if self.linger else 0.05, self._close)

    def data_received(self, data: bytes) -> None:
        pass  # the request we already answered

    def eof_received(self) -> bool:
        self._close()
        return False

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.door.rejecting -= 1
        if self._timer is not None:
            self._timer.cancel()


@dataclass
class _Conn:
    handler: Any  # aiohttp's RequestHandler
    deadline: float  # monotonic; meaningful only while not busy
    busy: int = 0
    served: int = 0
    body_deadline: float = 0.0  # while a body is being read: when it must have arrived
    opened: float = field(default_factory=time.monotonic)


class FrontDoor:
    def __init__(self, server_factory: Callable[[], asyncio.Protocol], *, max_connections: int,
                 header_timeout_s: float, idle_timeout_s: float, name: str = "api") -> None:
        self.server_factory = server_factory
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.name = name
        self.conns: dict[int, _Conn] = {}  # id(handler) -> state
        self.rejecting = 0
        self.rejected_total = 0
        self.timed_out_total = 0
        self.server: Optional[asyncio.base_events.Server] = None
        self._sweeper: Optional[asyncio.Task] = None

    # --- accepting ---------------------------------------------------------------------------------------
    def _factory(self) -> asyncio.Protocol:
        if len(self.conns) >= self.max_connections:
            self._purge()
        if len(self.conns) >= self.max_connections:
            self.rejected_total += 1
            busy = raw_response(
                429, "Too Many Requests",
                f"too many open connections ({self.max_connections}, RERANKER_MAX_CONNECTIONS); retry shortly",
                "Retry-After: 1\r\n")
            # even the refusals are too many: answer and close at once, holding nothing
            return _Reject(self, busy, linger=self.rejecting < 2 * self.max_connections)
        handler = self.server_factory()
        self.conns[id(handler)] = _Conn(handler, time.monotonic() + self.header_timeout_s)
        return handler

    def _purge(self) -> None:
        for key in [k for k, c in self.conns.items() if c.handler.transport is None and c.opened < time.monotonic() - 1]:
            del self.conns[key]

    async def listen(self, host: str, port: int, backlog: int = 1024) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, sock=sock)
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()

    # --- the state of each connection --------------------------------------------------------------------
    def begin(self, handler: Any) -> None:
        conn = self.conns.get(id(handler))
        if conn is not None:
            conn.busy += 1

    def end(self, handler: Any) -> None:
        conn = self.conns.get(id(handler))
        if conn is not None:
            conn.busy = max(0, conn.busy - 1)
            conn.served += 1
            conn.deadline = time.monotonic() + self.idle_timeout_s

    def reading(self, handler: Any, seconds: float) -> None:
        conn = self.conns.get(id(handler))
        if conn is not None:
            conn.body_deadline = time.monotonic() + seconds

    def read_done(self, handler: Any) -> None:
        conn = self.conns.get(id(handler))
        if conn is not None:
            conn.body_deadline = 0.0

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self.conns.values() if c.handler.transport is not None)

    async def _sweep(self) -> None:
        late = raw_response(408, "Request Timeout", "no complete request within the connection's deadline; "
                            "send the request at once after connecting")
        slow_body = raw_response(408, "Request Timeout", "the request body did not arrive in time "
                                 "(RERANKER_BODY_TIMEOUT_S); send it at once")
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for key, conn in list(self.conns.items()):
                transport = conn.handler.transport
                if transport is None:
                    if now - conn.opened > 1:
                        del self.conns[key]
                    continue
                if conn.busy:
                    if conn.body_deadline and now > conn.body_deadline:  # a body that trickles in
                        self.timed_out_total += 1
                        del self.conns[key]
                        transport.write(slow_body)
                        transport.close()
                    continue
                if now < conn.deadline:
                    continue
                del self.conns[key]
                if not conn.served:  # never sent a whole request: say why; an idle keep-alive just closes
                    self.timed_out_total += 1
                    transport.write(late)
                transport.close()
