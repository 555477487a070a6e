"""The gate's client for MOSEC's internal port: HTTP/1.1 POST over pooled loopback keep-alive connections.

The gate sends every request it admits to MOSEC, so this client's cost is added to every request, and on
two cores it is taken from the model. aiohttp's client builds a request object, a response object, a
timer and a header multidict per call; this one writes the request in one buffer and reads the status
line, ``Content-Length`` and the body, which is all MOSEC (hyper) answers with. It speaks only to that
server: no redirects, no proxies, no compression, no TLS.

Errors are raised as aiohttp's (``ClientConnectionError``, ``ClientPayloadError``, ``asyncio.TimeoutError``)
so the gate's retry and error mapping stay the same. A connection is reused only after a complete,
well-formed exchange; one that failed, timed out or was cancelled midway is closed, never pooled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Optional
from urllib.parse import urlsplit

import aiohttp

_timeout = getattr(asyncio, "timeout", None)
MAX_IDLE_PER_HOST = 64
MAX_HEADER_BYTES = 64 * 1024


class UpstreamClient:
    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}
        self.closed = False

    def _target(self, url: str) -> tuple[str, int, bytes]:
        t = self._targets.get(url)
        if t is None:
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            head = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Content-Type: application/octet-stream\r\nContent-Length: ").encode("ascii")
            if len(self._targets) > 16:  # generations come and go; their URLs need not be kept
                self._targets.clear()
            t = self._targets[url] = (host, port, head)
        return t

    async def post(self, url: str, payload: bytes | bytearray, timeout: float) -> tuple[int, bytes]:
        """POST ``payload``; the status and body, within ``timeout`` seconds."""
        host, port, head = self._target(url)
        head = b"".join((head, str(len(payload)).encode("ascii"), b"\r\n\r\n"))
        # one write for a small request; a large body is written from its own buffer, not copied behind the head
        request = (head + payload,) if len(payload) <= 65536 else (head, payload)
        try:
            if _timeout is not None:  # Python 3.11: a deadline on this task, without a task of its own
                async with _timeout(timeout):
                    return await self._exchange(host, port, request)
            return await asyncio.wait_for(self._exchange(host, port, request), timeout)
        except asyncio.TimeoutError:
            raise
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise aiohttp.ClientConnectionError(f"MOSEC at {host}:{port}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # a status or a length that is not a number
            raise aiohttp.ClientPayloadError(f"malformed response from MOSEC at {host}:{port}: {exc}") from exc

    async def _exchange(self, host: str, port: int, request: tuple) -> tuple[int, bytes]:
        key = (host, port)
        pool = self._idle.setdefault(key, deque())
        while pool:
            reader, writer = pool.pop()
            if writer.is_closing() or reader.at_eof():
                writer.close()
                continue
            try:
                return await self._once(key, reader, writer, request)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                if getattr(exc, "partial", b""):
                    raise  # an answer had begun: not a stale keep-alive connection
                # the server closed this kept-alive connection before we wrote: try the next (or a new one)
        reader, writer = await asyncio.open_connection(host, port)
        return await self._once(key, reader, writer, request)

    async def _once(self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: tuple) -> tuple[int, bytes]:
        clean = False
        try:
            for part in request:
                writer.write(part)
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEADER_BYTES:
                raise aiohttp.ClientPayloadError("MOSEC's response headers are too large")
            lines = head.split(b"\r\n")
            status_line = lines[0].split(b" ", 2)
            if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
                raise aiohttp.ClientPayloadError(f"not an HTTP response from MOSEC: {lines[0][:80]!r}")
            status = int(status_line[1])
            length: Optional[int] = None
            chunked = False
            keep = status_line[0] == b"HTTP/1.1"  # HTTP/1.1 keeps the connection unless told otherwise
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    v = value.strip().lower()
                    keep = v == b"keep-alive" or (keep and v != b"close")
            if chunked:
                body = await _read_chunked(reader)
            elif length is not None:
                body = await reader.readexactly(length)
            else:  # no length: the body runs to the end of the connection
                body = await reader.read()
                keep = False
            clean = keep
            return status, body
        finally:
            if clean and not self.closed:
                pool = self._idle.setdefault(key, deque())
                if len(pool) < MAX_IDLE_PER_HOST:
                    pool.append((reader, writer))
                else:
                    writer.close()
            else:
                writer.close()

    async def close(self) -> None:
        self.closed = True
        for pool in self._idle.values():
            while pool:
                _, writer = pool.pop()
                writer.close()
        self._idle.clear()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
