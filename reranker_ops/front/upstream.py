"""The gate's HTTP/1.1 client to MOSEC's controller: kept-alive loopback connections, one POST per use.

The gate sends every request it admits to one peer it knows: MOSEC's controller on a loopback port,
``POST /score`` with a body the gate built, answered with a status and a body of known length. aiohttp's
client, built for any server on the internet (redirects, cookies, tracing hooks, a connector with limits,
per-request timer objects), spent a large share of the supervisor's CPU on each such call (figures in
benchmarks/HISTORY.md): on two cores that time is taken from the model. This client does only what that one exchange needs:

- a pool of idle connections per port (a reload's new generation listens on a new port; the pool for an
  old one is closed when a new one is asked for);
- the request head written with the body in one ``send`` (small bodies) or two (large ones), no copy of
  the body beyond what the kernel takes;
- the answer read by httptools (``http1.py``, the project's one HTTP/1.1 parser): by ``Content-Length``, chunked,
  or to the end of the stream if the peer says neither, its head bounded in size;
- a connection that is not in a known state after an exchange (an error, a deadline, ``Connection:
  close``) is closed, never reused;
- a kept-alive connection the peer closed while it sat idle fails before any byte of the answer: that one
  exchange is tried once more on a new connection, as any HTTP client does with stale connections;
- a port that refuses (MOSEC still booting, or restarting) is watched by one task that tries to connect
  every ``PORT_POLL_S`` for as long as somebody waits (``wait_listening``): every waiting request goes
  on the moment the port listens, and a hundred waiting requests still cost one connect attempt a poll.

- before the first byte goes to a port (and again after a connection to it failed), the process listening
  on it is checked to be the generation's (``verify``): MOSEC's controller binds its port only once the
  model is loaded, and another local process that took the port first would get every document. A port held
  by anyone else is ``Foreign``: nothing is sent to it.

Failures are ``UpstreamError`` (nothing answered: refused, reset, cut mid-answer; ``Refused`` when nothing
listens on the port, ``Foreign`` when someone else does) or ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..http1 import HEAD_LIMIT, BadAnswer, ClientConnection, NoAnswer

READ_BYTES = 64 * 1024
COALESCE_BYTES = 64 * 1024  # bodies up to this size go out in the same write as the head
IDLE_PER_PORT = 64
PORT_POLL_S = 0.01  # a refused loopback connect is cheap: ~1 % of a core at this rate while somebody waits
FOREIGN_POLL_S = 0.25  # a port another process holds is looked at again this often (each look reads /proc)


@dataclass(frozen=True)
class Upstream:
    """Where the current MOSEC generation listens (a loopback port), and the secret its worker expects."""

    port: int
    secret: bytes
    generation: int = 0
    model_name: str = ""
    max_length: int = 0  # tokens of the model's window (0: not known)
    pid: int = 0  # MOSEC's main process: the listener on ``port`` must be it or under it


class UpstreamError(ConnectionError):
    """MOSEC did not answer: the connection was refused, reset or cut before a whole answer came."""


class Refused(UpstreamError):
    """Nothing listens on the port (yet, or any more): nothing was sent."""


class Foreign(Refused):
    """A process that is not the generation's listens on the port: nothing was sent."""


# (port, the generation's main pid) -> whether the process listening on the port is that generation's: True,
# False (another one's), None (nothing listens)
Verify = Callable[[int, int], Optional[bool]]


def listening_inode(port: int, host: str = "127.0.0.1") -> Optional[int]:
    """The inode of the socket listening on ``host:port`` (IPv4), from the kernel's table."""
    want = "%s:%04X" % ("".join(f"{int(x):02X}" for x in reversed(host.split("."))), port)
    try:
        with open("/proc/net/tcp", encoding="ascii") as fh:
            next(fh, None)
            for line in fh:
                f = line.split()
                if len(f) > 9 and f[1] == want and f[3] == "0A":  # 0A: LISTEN
                    return int(f[9])
    except (OSError, ValueError):
        return None
    return None


def listener_is_ours(port: int, main_pid: int) -> Optional[bool]:
    """Whether the socket listening on ``port`` belongs to ``main_pid`` or a process under it (MOSEC's Rust
    controller is its main process's child): None when nothing listens. A process of another user cannot be
    looked into, and so is never ours."""
    inode = listening_inode(port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    try:
        import psutil

        tree = [main_pid] + [p.pid for p in psutil.Process(main_pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil.Error: the generation is gone
        return False
    for pid in tree:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


if sys.version_info >= (3, 11):
    _deadline = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    import async_timeout

    _deadline = async_timeout.timeout


class _Conn:
    __slots__ = ("reader", "writer", "reused", "http")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False
        self.http = ClientConnection(HEAD_LIMIT)

    def close(self) -> None:
        self.writer.close()


class UpstreamClient:
    def __init__(self, host: str = "127.0.0.1", verify: Optional[Verify] = None,
                 on_foreign: Optional[Callable[[int], None]] = None) -> None:
        self.host = host
        self.verify = verify
        self.on_foreign = on_foreign
        self._verified: set[int] = set()  # ports whose listener was checked since the last failure on them
        self._idle: dict[int, list[_Conn]] = {}
        self._closed = False
        self._watchers: dict[int, asyncio.Future] = {}  # port -> True once it listens, False when given up
        self._watch_tasks: set[asyncio.Task] = set()
        self._waiting: dict[int, int] = {}  # port -> how many wait for it

    async def wait_listening(self, port: int, timeout: float, owner: int = 0) -> bool:
        """Whether ``port`` accepts connections (from the generation whose main process is ``owner``) within
        ``timeout`` seconds: True the moment it does."""
        listening = self._watchers.get(port)
        if listening is None or listening.done():
            listening = self._watchers[port] = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._watch(port, owner, listening))
            self._watch_tasks.add(task)
            task.add_done_callback(self._watch_tasks.discard)
        self._waiting[port] = self._waiting.get(port, 0) + 1
        try:
            return await asyncio.wait_for(asyncio.shield(listening), max(0.0, timeout))
        except asyncio.TimeoutError:
            return False
        finally:
            left = self._waiting[port] - 1
            if left:
                self._waiting[port] = left
            else:
                del self._waiting[port]

    async def _watch(self, port: int, owner: int, listening: asyncio.Future) -> None:
        """Try to connect every PORT_POLL_S while somebody waits; the first connection that succeeds (to the
        generation's own listener) goes to the port's idle pool, for the first request that goes on. Never
        cancels a waiter: closing the client resolves ``listening`` to False."""
        try:
            while not self._closed:
                try:
                    conn = await self._connect(port, owner)
                except Refused as exc:  # nothing listens yet, or someone else does: nothing was sent
                    await asyncio.sleep(FOREIGN_POLL_S if isinstance(exc, Foreign) else PORT_POLL_S)
                    if not self._waiting.get(port):
                        break  # nobody waits any more (a deadline, or another generation)
                    continue
                if self._closed:
                    conn.close()
                else:
                    self._release(port, conn)  # closes it if the port has no pool any more
                listening.set_result(True)
                return
        finally:
            if not listening.done():
                listening.set_result(False)
            if self._watchers.get(port) is listening:
                del self._watchers[port]  # one entry per port being waited for, not per port ever seen

    async def post(self, port: int, path: str, body: Sequence[bytes | bytearray], timeout: float,
                   owner: int = 0) -> tuple[int, bytes]:
        """``POST path`` to ``host:port`` with the buffers of ``body`` back to back; returns (status, body).
        ``owner``: the generation's main pid, whose process tree the port's listener must be in. Raises
        ``UpstreamError`` or ``TimeoutError`` (the deadline covers connecting, sending and the whole
        answer)."""
        async with _deadline(timeout):
            while True:
                conn = await self._acquire(port, owner)
                try:
                    status, data, keep = await self._exchange(conn, port, path, body)
                except _Stale:
                    conn.close()
                    continue  # an idle connection the peer had closed: once more on a new one
                except BaseException:
                    conn.close()  # an error, a deadline or a cancel mid-exchange: its state is unknown
                    self._verified.discard(port)  # the listener may have changed: checked again next time
                    raise
                if keep and not self._closed:
                    self._release(port, conn)
                else:
                    conn.close()
                return status, data

    async def _acquire(self, port: int, owner: int = 0) -> _Conn:
        if self._closed:
            raise UpstreamError("the gate is closing")
        idle = self._idle.get(port)
        if idle is None:
            for other in [p for p in self._idle if p != port]:  # an earlier generation's port: not used again
                for c in self._idle.pop(other):
                    c.close()
            idle = self._idle[port] = []
        while idle:
            conn = idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                conn.reused = True
                return conn
            conn.close()
        return await self._connect(port, owner)

    async def _connect(self, port: int, owner: int) -> _Conn:
        """A new connection to ``port``, checked (before a byte is sent) to reach the generation's listener."""
        try:
            reader, writer = await asyncio.open_connection(self.host, port)
        except OSError as exc:
            self._verified.discard(port)
            raise Refused(f"cannot connect to {self.host}:{port}: {exc}") from exc
        conn = _Conn(reader, writer)
        if self.verify is None or not owner or port in self._verified:
            return conn
        try:
            ours = await asyncio.get_running_loop().run_in_executor(None, self.verify, port, owner)
        except BaseException:
            conn.close()
            raise
        if ours:
            self._verified.add(port)
            return conn
        conn.close()
        if ours is None:  # it stopped listening in between
            raise Refused(f"nothing listens on {self.host}:{port} any more")
        if self.on_foreign is not None:
            self.on_foreign(port)
        raise Foreign(f"the process listening on {self.host}:{port} is not the generation's: nothing was sent")

    def _release(self, port: int, conn: _Conn) -> None:
        idle = self._idle.get(port)
        if idle is None or len(idle) >= IDLE_PER_PORT:
            conn.close()
            return
        idle.append(conn)

    async def _exchange(self, conn: _Conn, port: int, path: str, body: Sequence[bytes | bytearray]
                        ) -> tuple[int, bytes, bool]:
        w, r, http = conn.writer, conn.reader, conn.http
        try:
            out = http.request(path, (("Host", f"{self.host}:{port}"),
                                      ("Content-Type", "application/octet-stream")), body)
            if sum(len(b) for b in body) <= COALESCE_BYTES:
                w.write(b"".join(out))  # one send for a small request
            else:
                w.writelines(out)
            await w.drain()
            while True:
                answer = http.receive(await r.read(READ_BYTES))
                if answer is not None:
                    return answer[0], answer[1], http.reusable()
        except NoAnswer as exc:
            if conn.reused:
                raise _Stale() from exc
            raise UpstreamError(f"MOSEC's connection failed: {exc}") from exc
        except BadAnswer as exc:
            raise UpstreamError(f"MOSEC's answer failed: {exc}") from exc
        except ConnectionError as exc:
            if conn.reused and not http.answered:
                raise _Stale() from exc
            raise UpstreamError(f"MOSEC's connection failed: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        self._closed = True
        for task in list(self._watch_tasks):
            task.cancel()  # its waiters get False, not a cancel
        conns = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()
        for c in conns:
            c.close()
        for c in conns:
            try:
                await c.writer.wait_closed()
            except (ConnectionError, OSError):
                pass


class _Stale(Exception):
    """A reused connection failed before any byte of the answer."""
