"""The API port's scoring requests, read and answered without aiohttp.

What the gate adds to a lone request was measured piece by piece (``benchmarks/gate_cost.py --floor``): the
extra loopback hop 0.34-0.47 ms, aiohttp's own parser, request object, router, middleware and response
writer 0.27-0.40 ms, the gate's path 0.45-0.59 ms. aiohttp's share is spent on generality the scoring routes
do not use. So each connection of the API port begins here, in a plain asyncio protocol:

- a request whose head llhttp (httptools, in C) accepts, that is an HTTP/1.1 ``POST`` to one of the scoring
  routes with one ``Content-Length`` of at most ``body_max`` bytes, no ``Transfer-Encoding``, no ``Expect``
  and no ``Upgrade``, is framed here by its length and handed whole to the gate's own handler
  (``Gate.handle_api``: the same key, admission, limits, deadline, metrics, tracing and answers as through
  aiohttp), and its answer is written back from here;
- anything else (every other route and method, a large, chunked or ``Expect: 100-continue`` body, HTTP/1.0, a
  head llhttp refuses or one over ``HEAD_MAX``, bare-LF line ends) is handed to aiohttp with the bytes of that
  request as they came, and the connection stays aiohttp's from then on: aiohttp answers it exactly as it
  did before this lane existed. One exception, found by the fuzz test: a head in another HTTP version
  (``HTTP/2.0`` as text) is answered 505 here, where aiohttp would have answered it as if it were that version.

The connection rules stay the front door's (``listener.py``): the head deadline while no request is in
progress, the body deadline while one arrives, the send deadline on the answer. A body's bytes count against
RERANKER_MAX_BUFFERED_BYTES as they arrive; a body that would cross it goes to aiohttp, whose reader refuses
it with the gate's 429. At most one request of a connection is handled at a time; bytes a client sends ahead
(pipelining) wait, and reading pauses while more than ``PIPELINE_MAX`` of them wait or while the client reads
none of its answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from typing import Any, Optional

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from ..protocol.api import ROUTES
from ..protocol.envelope import PART_HEAD_LEN
from .listener import REJECT_LINGER_S
from .responses import error_response

FAST_BODY_MAX = 64 * 1024  # larger bodies stream through aiohttp's reader, counted as they arrive
HEAD_MAX = 8190  # aiohttp's own bound on a request line and on a header line: a longer head is aiohttp's to refuse
PIPELINE_MAX = 256 * 1024  # bytes a client may send ahead of the request being answered before reading pauses
_ROUTES = {route.encode("ascii"): route for route in ROUTES}
_HEADERS_NOT_COPIED = frozenset(("content-length", "connection", "date", "transfer-encoding", "keep-alive"))


class FastRequest(dict):
    """What the gate's handler reads of a request (the names of aiohttp's ``web.Request`` it uses). Its body
    arrives behind room for its part head, counted in ``["reserved"]`` as it comes; ``whole()`` waits for it."""

    __slots__ = ("method", "path", "headers", "transport", "content_length", "body", "outcome", "_waiter")

    def __init__(self, path: str, headers: CIMultiDictProxy, transport: asyncio.Transport, length: int) -> None:
        super().__init__(reserved=0)
        self.method = "POST"
        self.path = path
        self.headers = headers
        self.transport: Optional[asyncio.Transport] = transport
        self.content_length = length
        self.body = bytearray(PART_HEAD_LEN)
        self.outcome: Optional[str] = None if length else WHOLE
        self._waiter: Optional[asyncio.Future] = None

    async def whole(self) -> str:
        """How the body's reading ended: ``WHOLE``; ``OVER`` (it would have taken the bytes held by all
        requests over RERANKER_MAX_BUFFERED_BYTES: the rest of it is dropped as it comes); ``GONE`` (the
        connection closed first: the client left, or the body deadline cut it)."""
        if self.outcome is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.outcome  # type: ignore[return-value]

    def finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)


WHOLE, OVER, GONE = "whole", "over", "gone"


class FastLane:
    """What every connection's ``_Fast`` shares: the gate, its limits, the log."""

    def __init__(self, gate: Any, log: logging.Logger) -> None:
        self.gate = gate
        self.log = log
        settings = gate.settings
        self.body_max = min(FAST_BODY_MAX, settings.max_body_bytes)
        self.body_timeout_s = settings.body_timeout_s
        self.max_buffered = settings.max_buffered_bytes
        self.tasks: set[asyncio.Task] = set()  # the loop holds tasks weakly: a request's lives until it is answered
        self._date = (0, b"")

    def date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode("ascii"))
        return self._date[1]

    def protocol(self, door: Any) -> "_Fast":
        return _Fast(door, self)


def serialize(resp: Any, close: bool, date: bytes) -> bytes:
    """An aiohttp ``web.Response`` with a bytes body as HTTP/1.1 bytes. A header name or value that could end a
    line is refused (ValueError), as aiohttp's writer does."""
    body = resp.body
    if body is None:
        body = b""
    elif not isinstance(body, (bytes, bytearray, memoryview)):
        raise ValueError(f"an answer body of {type(body).__name__} is not written by the fast lane")
    lines = [b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason.encode("utf-8"))]
    for name, value in resp.headers.items():
        if name.lower() in _HEADERS_NOT_COPIED:
            continue
        line = f"{name}: {value}\r\n"
        if "\r" in line[:-2] or "\n" in line[:-2]:
            raise ValueError(f"header {name[:60]!r} would end its line")
        lines.append(line.encode("utf-8"))
    lines.append(b"Content-Length: %d\r\nDate: %s\r\n%s\r\n" % (len(body), date, b"Connection: close\r\n" if close
                                                                  else b""))
    lines.append(body)
    return b"".join(lines)


class _Fast(asyncio.Protocol):
    """One connection of the API port while its requests are the fast lane's (see the module's note)."""

    def __init__(self, door: Any, lane: FastLane) -> None:
        self.door = door
        self.lane = lane
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()  # bytes received and not yet taken: a head, a body's rest, requests sent ahead
        self.req: Optional[FastRequest] = None  # the request being answered (its body may still arrive)
        self.need = 0  # bytes of its body still to come
        self.discard = 0  # bytes of a body nobody will read (its answer went first) still to drop as they come
        self.closing = False  # close once they are dropped (or after REJECT_LINGER_S)
        self.keep = True  # the client keeps the connection after the answer
        self.paused = False  # reading paused: too much sent ahead
        self.blocked = False  # writing paused: the client reads nothing of its answers
        self._url = b""
        self._fields: list = []
        self._version = ""  # the last head's HTTP version, as llhttp read it ("" when it refused the head)

    # --- asyncio's side -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._advance()

    def pause_writing(self) -> None:
        self.blocked = True

    def resume_writing(self) -> None:
        self.blocked = False
        self._advance()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None
        if self.req is not None:
            self.req.finish(GONE)
        self.door._lost(id(self))

    # --- llhttp's callbacks, while a head is parsed -------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    # --- requests -----------------------------------------------------------------------------------------
    def _advance(self) -> None:
        """Take what the buffer holds: a body's bytes for the request being answered, bytes to drop, the next
        head once the last request was answered."""
        while self.transport is not None:
            if self.discard:
                n = min(self.discard, len(self.buf))
                del self.buf[:n]
                self.discard -= n
                if self.discard:
                    break
                if self.closing:
                    self.transport.close()
                    break
            if self.req is not None:
                if self.need:
                    self._take_body()
                break  # one request at a time: the next waits until this one is answered
            if self.blocked or not self.buf or not self._begin():
                break
        transport = self.transport
        if transport is not None:
            if not self.paused and len(self.buf) > PIPELINE_MAX:
                self.paused = True
                transport.pause_reading()
            elif self.paused and len(self.buf) <= PIPELINE_MAX:
                self.paused = False
                transport.resume_reading()

    def _begin(self) -> bool:
        """A whole head in the buffer: its request handed to the gate's handler (True), or the connection to
        aiohttp; False when more bytes are needed."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > HEAD_MAX or b"\n\n" in buf:
                self._hand_over()
            return False
        req = self._fast_request(bytes(buf[:end + 4])) if end + 4 <= HEAD_MAX else None
        if req is None:
            if self._version not in ("", "1.0", "1.1"):  # aiohttp would answer "HTTP/2.0 200" to a text head
                self._refuse(505, f"HTTP/{self._version[:10]} is not served here; send HTTP/1.1")
            else:
                self._hand_over()
            return False
        del buf[:end + 4]
        self.req = req
        self.door.begin(self)  # a request in progress: no connection deadline, the body's instead
        if self.need:
            self.door.reading(self, self.lane.body_timeout_s)
        # the handler begins now, as aiohttp's does once a head is in: a full server refuses before the body
        task = asyncio.get_running_loop().create_task(self._serve(req))
        self.lane.tasks.add(task)
        task.add_done_callback(self.lane.tasks.discard)
        return True

    def _fast_request(self, head: bytes) -> Optional[FastRequest]:
        """The request this head begins, if it is the fast lane's (see the module's note); else None."""
        if head.count(b"\n") != head.count(b"\r\n"):
            return None  # a bare LF: aiohttp's parser decides what it makes of that
        self._url, self._fields, self._version = b"", [], ""
        parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:  # HttpParserUpgrade and the invalid-method error included
            return None
        self._version = parser.get_http_version()
        path = _ROUTES.get(self._url)
        if path is None or parser.get_method() != b"POST" or self._version != "1.1":
            return None
        length = -1
        for name, value in self._fields:
            lname = name.lower()
            if lname == b"content-length":
                if length >= 0:
                    return None
                try:
                    length = int(value)  # llhttp has checked it is digits
                except ValueError:
                    return None
            elif lname in (b"transfer-encoding", b"expect", b"upgrade"):
                return None
        if not 0 <= length <= self.lane.body_max:
            return None
        self.keep = parser.should_keep_alive()
        self.need = length
        headers = CIMultiDictProxy(CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in self._fields))
        return FastRequest(path, headers, self.transport, length)  # type: ignore[arg-type]

    def _take_body(self) -> None:
        """The body's bytes from the buffer, counted as held; the handler is woken once it is whole. A body that
        would take the bytes held by all requests over RERANKER_MAX_BUFFERED_BYTES is refused (the gate answers
        429) and its rest dropped as it comes."""
        req = self.req
        take = min(self.need, len(self.buf))
        if req is None or not take:
            return
        gate = self.lane.gate
        if gate.buffered + take > self.lane.max_buffered:
            self.discard, self.need = self.need, 0
            self.door.read_done(self)
            req.finish(OVER)
            return
        req.body += self.buf[:take]
        del self.buf[:take]
        gate.buffered += take
        req["reserved"] += take
        self.need -= take
        if not self.need:
            self.door.read_done(self)
            req.finish(WHOLE)

    async def _serve(self, req: FastRequest) -> None:
        close = True
        try:
            try:
                resp = await self.lane.gate.handle_api(req)
                close = not self.keep or resp.keep_alive is False or \
                    resp.headers.get("Connection", "").lower() == "close"
                data = serialize(resp, close, self.lane.date())
            except Exception as exc:  # noqa: BLE001 - a bug answers 500, never a silent connection
                self.lane.log.exception("fast lane error on %s", req.path)
                close = True
                data = serialize(error_response(500, f"internal error in the gate: {type(exc).__name__}"), True,
                                 self.lane.date())
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
        finally:
            self.door.end(self)
            if req["reserved"]:  # answered before its body was taken (refused at its head): held no more
                self.lane.gate.buffered -= req["reserved"]
                req["reserved"] = 0
            if self.need:  # its answer went before its whole body: the rest is dropped as it comes
                self.door.read_done(self)
                self.discard, self.need = self.discard + self.need, 0
            req.finish(GONE)
            self.req = None
        transport = self.transport
        if transport is None:
            return
        if close:
            if not self.discard:
                transport.close()
                return
            # closing on unread bytes would make the kernel reset the connection, answer and all: the rest of
            # the body is read and dropped first, for REJECT_LINGER_S at most
            self.closing = True
            asyncio.get_running_loop().call_later(REJECT_LINGER_S, transport.close)
        self._advance()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close: whatever else the client sends is read and dropped until the connection
        closes, at most REJECT_LINGER_S from now (closing on unread bytes would reset the answer away)."""
        transport = self.transport
        if transport is None:
            return
        self.lane.gate.metrics.observe_request("other", status, 0.0)
        transport.write(serialize(error_response(status, message), True, self.lane.date()))
        self.buf.clear()
        self.discard, self.closing = 1 << 62, True  # never reached: the timer (or the client's close) ends it
        asyncio.get_running_loop().call_later(REJECT_LINGER_S, transport.close)

    def _hand_over(self) -> None:
        """This request and everything after it on the connection to aiohttp, byte for byte as they came."""
        data, self.buf = bytes(self.buf), bytearray()
        transport, self.transport = self.transport, None  # nothing more of this object's: aiohttp has it
        if transport is None:
            return
        if self.paused:
            self.paused = False
            transport.resume_reading()
        self.door.hand_over(self, transport, data)
