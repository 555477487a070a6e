"""The gate's client for MOSEC's port, at the edges a keep-alive pool meets: a connection the server closed
while it sat idle, ``Connection: close``, chunked bodies, an answer that never comes, an answer cut short.

Each case runs a small asyncio HTTP server on a loopback port that behaves the way the case needs (MOSEC
itself is behind every end-to-end test; these are the cases it does not produce on demand)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from conftest import free_port
from reranker_ops.serving.upstream import UpstreamClient

pytestmark = pytest.mark.timeout(60)


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return await reader.readexactly(length)


def serve(behaviour):
    """Run ``behaviour(reader, writer, body, n)`` for each request; count connections."""
    stats = {"connections": 0, "requests": 0}

    async def handle(reader, writer):
        stats["connections"] += 1
        try:
            while True:
                body = await _read_request(reader)
                if body is None:
                    return
                stats["requests"] += 1
                if not await behaviour(reader, writer, body, stats["requests"]):
                    return
        finally:
            writer.close()

    return handle, stats


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def run_case(behaviour, calls):
    handle, stats = serve(behaviour)
    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    client = UpstreamClient()
    try:
        return await calls(client, f"http://127.0.0.1:{port}/score"), stats
    finally:
        await client.close()
        server.close()


def test_keep_alive_is_reused_and_large_bodies_arrive_whole():
    async def echo(reader, writer, body, n):
        writer.write(ok(body[::-1]))
        return True

    async def calls(client, url):
        out = [await client.post(url, b"abc%d" % i, 5) for i in range(5)]
        big = bytes(range(256)) * 1000  # over the size written in one buffer
        out.append(await client.post(url, bytearray(big), 5))
        return out, big

    (out, big), stats = asyncio.run(run_case(echo, calls))
    assert out[:5] == [(200, b"%dcba" % i) for i in range(5)]
    assert out[5] == (200, big[::-1])
    assert stats["connections"] == 1 and stats["requests"] == 6


def test_a_connection_the_server_dropped_while_idle_is_replaced_without_an_error():
    async def once_per_connection(reader, writer, body, n):
        writer.write(ok(b"r%d" % n))  # keep-alive promised, then closed: what a server's idle timeout does
        await writer.drain()
        return False

    async def calls(client, url):
        out = []
        for i in range(4):
            out.append(await client.post(url, b"x", 5))
            await asyncio.sleep(0.05)  # the server's close reaches us while the connection is pooled
        return out

    out, stats = asyncio.run(run_case(once_per_connection, calls))
    assert [s for s, _ in out] == [200] * 4 and stats["connections"] == 4


def test_connection_close_and_chunked_answers():
    async def mixed(reader, writer, body, n):
        if n % 2:
            writer.write(b"HTTP/1.1 422 Unprocessable\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            return True
        writer.write(ok(b"bye", b"Connection: close\r\n"))
        await writer.drain()
        return False

    async def calls(client, url):
        return [await client.post(url, b"x", 5) for _ in range(4)]

    out, stats = asyncio.run(run_case(mixed, calls))
    assert out == [(422, b"hello world"), (200, b"bye")] * 2
    assert stats["connections"] == 2


def test_no_answer_is_a_timeout_and_the_connection_is_not_reused():
    async def stall_first(reader, writer, body, n):
        if n == 1:
            await asyncio.sleep(30)
        writer.write(ok(b"late-but-fine"))
        return True

    async def calls(client, url):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await client.post(url, b"x", 0.3)
        took = loop.time() - t0
        return took, await client.post(url, b"y", 5)

    (took, second), stats = asyncio.run(run_case(stall_first, calls))
    assert took < 5 and second == (200, b"late-but-fine") and stats["connections"] == 2


def test_refused_and_cut_answers_are_connection_errors():
    async def cut(reader, writer, body, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        return False

    async def calls(client, url):
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.post(url, b"x", 5)  # an answer that had begun is not retried behind the caller's back
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.post(f"http://127.0.0.1:{free_port()}/score", b"x", 5)
        return True

    ok_, stats = asyncio.run(run_case(cut, calls))
    assert ok_ and stats["requests"] == 1
