"""The one HTTP/1.1 client parser of the project, shared by the gate's upstream client (asyncio, to MOSEC's
controller) and the load generator's lean client (blocking sockets).

The answer is parsed by httptools (llhttp, Node's parser, in C): Content-Length, chunked, 1xx answers before
the real one, ``Connection: close``, HTTP/1.0 peers. It replaced h11 (pure Python), which cost ~54 us of CPU
an exchange warm and more cold, against ~3 us: at a lone request that was the gate's largest single cost
after aiohttp itself (benchmarks/HISTORY.md). What llhttp leaves to its caller is done here: a bound on an
answer's head, the end of an answer delimited by the end of the stream (llhttp's ``finish`` is not exposed),
and the request's head, whose header names and values are checked so that none can smuggle a line. This
module never touches a socket: each caller does its own I/O.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import httptools

HEAD_LIMIT = 64 * 1024  # an answer's status line and headers: MOSEC's are ~150 bytes
STATUS_LINE_BYTES = len(b"HTTP/1.1 200 ")  # a status line's bytes before its reason (llhttp gives the reason)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field-name
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")  # CR, LF, NUL and other controls; edge blanks
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class BadAnswer(ConnectionError):
    """The peer's bytes are not an HTTP/1.x answer (or it closed the connection mid-answer)."""


class NoAnswer(ConnectionError):
    """The peer closed the connection before any byte of the answer."""


class _HeadTooLarge(Exception):
    pass


class _AfterTheAnswer(Exception):
    """Bytes that begin another answer after the one asked for (never sent by MOSEC): parsing stops there."""


def _ascii(text: str, what: str) -> bytes:
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not ASCII: {text[:60]!r}") from None


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]], length: int) -> bytes:
    """The head of a request with a body of ``length`` bytes. A method, target, header name or value that could
    end a line or the head early is refused (ValueError): no value can smuggle a header or a request."""
    lines = [_ascii(method, "the method"), b" ", _ascii(target, "the target"), b" HTTP/1.1\r\n"]
    if not _TOKEN.fullmatch(lines[0]) or not lines[2] or _BAD_TARGET.search(lines[2]):
        raise ValueError(f"not a request line: {method!r} {target!r}")
    for name, value in headers:
        raw_name, raw_value = _ascii(name, "a header name"), _ascii(value, "a header value")
        if not _TOKEN.fullmatch(raw_name) or _BAD_VALUE.search(raw_value):
            raise ValueError(f"header {name[:60]!r} has a name or value that HTTP does not allow")
        lines += (raw_name, b": ", raw_value, b"\r\n")
    lines.append(b"Content-Length: %d\r\n\r\n" % length)
    return b"".join(lines)


class ClientConnection:
    """One client connection's HTTP state: ``request`` gives the bytes to send, ``receive`` takes the bytes
    that came back (``b""`` at the end of the stream) until it returns ``(status, body)``."""

    __slots__ = ("_parser", "_limit", "_status", "_body", "_done", "_keep", "_head", "_fed", "_headers_done",
                 "_framed", "_failed", "answered", "headers")

    def __init__(self, head_limit: int = HEAD_LIMIT) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._limit = head_limit
        self.answered = False  # a byte of the current answer came
        self.headers: list = []  # the last answer's: (lowercase name, value) bytes
        self._failed = False
        self._fed = 0  # bytes of the current answer fed so far (1xx answers before it included)
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._body: list = []
        self._done = False
        self._keep = False
        self._head = 0  # bytes of the current answer's head so far
        self._headers_done = False
        self._framed = False  # its end is said by a length or chunks, not by the end of the stream

    def request(self, target: str, headers: Iterable[tuple[str, str]], body: Sequence[bytes | bytearray | memoryview],
                method: str = "POST") -> list:
        """The buffers to send for one request with ``body`` (its parts back to back): the parts themselves,
        not copies."""
        if self._failed:
            raise BadAnswer("this connection's last answer was unreadable: open another")
        head = request_head(method, target, headers, sum(len(b) for b in body))
        self._reset()
        self.answered, self._fed = False, 0
        return [head, *(part for part in body if len(part))]

    # llhttp's callbacks (httptools calls them while it parses what ``receive`` feeds)
    def on_message_begin(self) -> None:
        if self._done:
            raise _AfterTheAnswer()
        self._reset()
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self._count(len(status) + STATUS_LINE_BYTES)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        name = name.lower()
        if name in (b"content-length", b"transfer-encoding"):
            self._framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._status = self._parser.get_status_code()
        self._keep = self._parser.should_keep_alive()
        if self._status in (204, 304) or 100 <= self._status < 200:
            self._framed = True  # no body, whatever the headers say

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not 100 <= self._status < 200:  # 100 Continue and the like: the real answer follows (its begin clears)
            self._done = True

    def _count(self, n: int) -> None:
        self._head += n
        if self._head > self._limit:
            raise _HeadTooLarge()

    def receive(self, data: bytes) -> Optional[tuple[int, bytes]]:
        """Feed what the socket gave (``b""``: it ended); the answer once whole, else None (send more)."""
        if not data:
            return self._at_end()
        self.answered = True
        self._fed += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._done:  # bytes after a whole answer (after Connection: close, say): that answer stands
                self._keep = False
                return self._status, b"".join(self._body)
            self._failed = True
            if isinstance(exc.__context__, _HeadTooLarge):
                raise BadAnswer(f"an answer's head over {self._limit} bytes") from None
            raise BadAnswer(f"an unreadable answer (not HTTP/1.x as it should be): {exc}") from exc
        if self._done:
            return self._status, b"".join(self._body)
        if not self._headers_done and self._fed > self._limit:
            # a head still unfinished past the limit (a header line without its end is not seen by on_header)
            self._failed = True
            raise BadAnswer(f"an answer's head over {self._limit} bytes")
        return None

    def _at_end(self) -> Optional[tuple[int, bytes]]:
        if self._done:
            return self._status, b"".join(self._body)
        if not self.answered:
            raise NoAnswer("the server closed the connection without an answer")
        if self._headers_done and not self._framed:  # an answer delimited by the end of the stream: now whole
            self._done, self._keep = True, False
            return self._status, b"".join(self._body)
        raise BadAnswer("the server closed the connection mid-answer")

    def reusable(self) -> bool:
        """Whether the exchange ended cleanly and both sides keep the connection: then it is ready for the
        next request."""
        return self._done and self._keep and not self._failed
