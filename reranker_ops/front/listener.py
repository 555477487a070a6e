"""The listening socket in front of aiohttp: who gets a connection, and how long a connection may sit.

aiohttp parses HTTP (on the API port, after the fast lane of ``fastlane.py``, which begins each connection and
hands it over at the first request it does not take); this decides, for each new connection once its peer is
known, whether it is served or refused, and keeps deadlines on every connection it holds:
- at most ``max_connections`` open at once; the last ``reserve`` of them only for loopback peers (the
  supervisor's canary, a local balancer or sidecar, an operator's curl), and at most ``per_peer`` from one
  other address. When the door is full, the connection that has waited longest without a request in
  progress (a kept-alive one between requests, or one that has sent no whole request for a second) is closed
  to make room: idle sockets cannot lock anyone out. Only when nothing can be closed is a new connection
  answered ``429`` + ``Retry-After`` and closed after its request was read and thrown away (closing on unread
  data would reset the client);
- a new connection must deliver its request headers within ``header_timeout_s``, and a kept-alive one its
  next request within ``idle_timeout_s``, or it is closed (with a ``408`` if it never sent a request). While a
  request is being handled (``busy``) no connection deadline runs: the handler has its own body and answer
  deadlines;
- an answer must leave: a client that reads none of it for ``send_timeout_s`` (nginx's ``send_timeout``) is
  cut (abort: its unsent bytes are dropped, not waited for);
- a connection is counted from the moment it is accepted until it is closed, its answer's writing included.

So a slow, silent or non-reading client costs one descriptor for seconds, never forever, and a flood of
connections cannot take the descriptors the canary and the upstream connections need.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REJECT_LINGER_S = 2.0
EVICT_GRACE_S = 1.0  # a connection that has sent no whole request this long after opening may be closed for room
SWEEP_S = 0.25


def raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    kinds = {408: "timeout", 429: "overloaded", 503: "unavailable"}
    body = json.dumps({"error": kinds.get(status, "error"), "message": message, "status": status}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body


def is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == ""  # a Unix socket has no address: local
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


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


class _Gatekeeper(asyncio.Protocol):
    """What asyncio makes for each new connection: once the peer is known (``connection_made``), the door
    hands the transport to aiohttp's handler or to a refusal. asyncio reads from a socket only after
    ``connection_made`` returns, so no byte reaches this object."""

    def __init__(self, door: "FrontDoor") -> None:
        self.door = door

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.door._arrive(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:  # pragma: no cover - see the class's note
        pass


class _Watched(asyncio.Protocol):
    """Between the transport and aiohttp's handler: passes every event of the asyncio protocol on, and tells
    the door when the connection is gone (after any answer still buffered has left, or been dropped). The door
    so knows each connection's transport and end from asyncio itself, not from the handler's attributes."""

    __slots__ = ("door", "handler", "key")

    def __init__(self, door: "FrontDoor", handler: asyncio.Protocol, key: int) -> None:
        self.door = door
        self.handler = handler
        self.key = key

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.door._lost(self.key)
        self.handler.connection_lost(exc)


@dataclass
class _Conn:
    handler: Any  # aiohttp's RequestHandler, or the fast lane's protocol (fastlane.py) until it hands over
    transport: Optional[asyncio.Transport]  # None once the connection is gone
    peer: str
    deadline: float  # monotonic; meaningful only while not busy
    busy: int = 0
    served: int = 0
    body_deadline: float = 0.0  # while a body is being read: when it must have arrived
    opened: float = field(default_factory=time.monotonic)
    idle_since: float = field(default_factory=time.monotonic)
    unsent: int = 0  # bytes of the answer waiting in the transport's buffer at the last sweep
    stalled_since: Optional[float] = None  # since when the unsent bytes have not gone down


class FrontDoor:
    def __init__(self, server_factory: Callable[[], asyncio.Protocol], *, max_connections: int,
                 header_timeout_s: float, idle_timeout_s: float, send_timeout_s: float = 10.0,
                 per_peer: int = 0, reserve: int = 0, name: str = "api", fast: Any = None) -> None:
        """``fast``: a ``fastlane.FastLane`` whose protocol each connection begins with (it hands a connection
        to aiohttp's handler at the first request it does not take); None: aiohttp's from the start."""
        self.server_factory = server_factory
        self.fast = fast
        self.max_connections = max_connections
        self.per_peer = per_peer  # 0: no limit per address
        self.reserve = min(reserve, max_connections // 2)
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.send_timeout_s = send_timeout_s
        self.name = name
        self.conns: dict[int, _Conn] = {}  # id(handler) -> state, from accept until the transport is closed
        self.peers: Counter[str] = Counter()
        self.rejecting = 0
        self.rejected_total = 0
        self.timed_out_total = 0
        self.evicted_total = 0
        self.send_timed_out_total = 0
        self.server: Optional[asyncio.base_events.Server] = None
        self._sweeper: Optional[asyncio.Task] = None

    # --- accepting ---------------------------------------------------------------------------------------
    def _factory(self) -> asyncio.Protocol:
        return _Gatekeeper(self)

    def _arrive(self, transport: asyncio.Transport) -> None:
        """A new connection, its peer known: aiohttp's, or refused."""
        peer = _peer_of(transport)
        local = is_loopback(peer)
        limit = self.max_connections if local else self.max_connections - self.reserve
        refusal = None
        if not local and self.per_peer and self.peers[peer] >= self.per_peer:
            refusal = (f"too many open connections from {peer} ({self.per_peer},"
                       f" {'RERANKER_MAX_CONNECTIONS_PER_PEER' if self.name == 'api' else 'per address'});"
                       " retry shortly")
        elif len(self.conns) >= limit and not self._evict_one():
            refusal = (f"too many open connections ({self.max_connections}"
                       f"{', RERANKER_MAX_CONNECTIONS' if self.name == 'api' else ''}); retry shortly")
        if refusal is not None:
            self.rejected_total += 1
            # even the refusals are too many: answer and close at once, holding nothing
            reject = _Reject(self, raw_response(429, "Too Many Requests", refusal, "Retry-After: 1\r\n"),
                             linger=self.rejecting < 2 * self.max_connections)
            transport.set_protocol(reject)
            reject.connection_made(transport)
            return
        now = time.monotonic()
        self.peers[peer] += 1
        if self.fast is not None:
            fast = self.fast.protocol(self)
            self.conns[id(fast)] = _Conn(fast, transport, peer, now + self.header_timeout_s)
            transport.set_protocol(fast)
            fast.connection_made(transport)
            return
        handler = self.server_factory()
        key = id(handler)
        self.conns[key] = _Conn(handler, transport, peer, now + self.header_timeout_s)
        watched = _Watched(self, handler, key)
        transport.set_protocol(watched)
        watched.connection_made(transport)

    def hand_over(self, fast: asyncio.Protocol, transport: asyncio.Transport, data: bytes) -> None:
        """The fast lane gives this connection to aiohttp, with ``data``: the bytes of the request it did not
        take and of all after it. The connection waits for a request again (its head deadline runs until
        aiohttp's handler begins it, on the loop's next turns)."""
        conn = self.conns.pop(id(fast), None)
        handler = self.server_factory()
        key = id(handler)
        if conn is not None:
            conn.handler, conn.busy, conn.body_deadline = handler, 0, 0.0
            conn.deadline = time.monotonic() + self.header_timeout_s
            self.conns[key] = conn
        watched = _Watched(self, handler, key)
        transport.set_protocol(watched)
        watched.connection_made(transport)
        if data:
            handler.data_received(data)

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest with no request in progress, to make room for a new
        one: a kept-alive connection between requests, or one that has sent no whole request for
        ``EVICT_GRACE_S`` (a client that means to send does so at once). False when every one is busy."""
        now = time.monotonic()
        candidates = [c for c in self.conns.values() if not c.busy and c.transport is not None
                      and not c.transport.is_closing() and (c.served or now - c.opened >= EVICT_GRACE_S)]
        if not candidates:
            return False
        victim = min(candidates, key=lambda c: c.idle_since)
        self.evicted_total += 1
        self._close(victim, None if victim.served else self._late)
        return True

    def _lost(self, key: int) -> None:
        """The connection is closed: counted no more."""
        conn = self.conns.pop(key, None)
        if conn is None:
            return
        conn.transport = None
        self.peers[conn.peer] -= 1
        if self.peers[conn.peer] <= 0:
            del self.peers[conn.peer]

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
        """The handler returned its answer (aiohttp writes it next): the connection is idle again, counted
        until closed, and its answer is watched by the send deadline."""
        conn = self.conns.get(id(handler))
        if conn is not None:
            conn.busy = max(0, conn.busy - 1)
            conn.served += 1
            conn.idle_since = time.monotonic()
            conn.deadline = conn.idle_since + self.idle_timeout_s

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
        return len(self.conns)

    _late = raw_response(408, "Request Timeout", "no complete request within the connection's deadline; "
                         "send the request at once after connecting")
    _slow_body = raw_response(408, "Request Timeout", "the request body did not arrive in time "
                              "(RERANKER_BODY_TIMEOUT_S); send it at once")

    @staticmethod
    def _close(conn: _Conn, last_words: Optional[bytes] = None) -> None:
        """Close a connection; an answer still unsent is dropped (abort), not waited for."""
        transport = conn.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
            return
        if last_words:
            transport.write(last_words)
        transport.close()

    def _unsent_stalled(self, conn: _Conn, now: float) -> bool:
        """Whether the client has read nothing of its answer for ``send_timeout_s``."""
        transport = conn.transport
        unsent = transport.get_write_buffer_size() if transport is not None else 0
        if not unsent:
            conn.unsent, conn.stalled_since = 0, None
            return False
        if conn.stalled_since is None or unsent < conn.unsent:
            conn.stalled_since = now  # progress: the deadline is between two reads, as nginx's
        conn.unsent = unsent
        return now - conn.stalled_since > self.send_timeout_s

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for conn in list(self.conns.values()):
                transport = conn.transport
                if transport is None:
                    continue
                if transport.is_closing() and not transport.get_write_buffer_size():
                    continue  # closing now; forgotten once closed
                if self._unsent_stalled(conn, now):
                    self.send_timed_out_total += 1
                    transport.abort()  # the answer is dropped: the client would not take it
                    continue
                if conn.busy:
                    if conn.body_deadline and now > conn.body_deadline:  # a body that trickles in
                        self.timed_out_total += 1
                        conn.body_deadline = 0.0
                        self._close(conn, self._slow_body)
                    continue
                if now < conn.deadline or conn.unsent:
                    continue  # an answer still leaving is the send deadline's
                if not conn.served:  # never sent a whole request: say why; an idle keep-alive just closes
                    self.timed_out_total += 1
                    self._close(conn, self._late)
                else:
                    self._close(conn)


def _peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def tracked(door_of: Callable[[], Optional[FrontDoor]]):
    """An aiohttp middleware that tells the door when a request is in progress on a connection (no connection
    deadline runs then), for an app whose requests need no more than that (the health port's)."""
    from aiohttp import web

    @web.middleware
    async def middleware(request, handler):
        door = door_of()
        if door is not None:
            door.begin(request.protocol)
        try:
            return await handler(request)
        finally:
            if door is not None:
                door.end(request.protocol)

    return middleware
