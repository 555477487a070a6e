"""The gate's client to MOSEC (``front/upstream.py``) against a real HTTP/1.1 peer on a loopback port: one
that can keep connections, close them while idle, answer in chunks, stall, or cut an answer short."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from conftest import free_port

from reranker_ops.front.upstream import UpstreamClient, UpstreamError

pytestmark = pytest.mark.timeout(30)


class Peer:
    """A tiny HTTP/1.1 server. ``mode`` picks how it answers the next requests; ``connections`` counts accepts."""

    def __init__(self) -> None:
        self.mode = "length"
        self.connections = 0
        self.bodies: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> "Peer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()

    def drop_idle(self) -> None:
        """Close every connection from this side, as a peer does with idle kept-alive connections."""
        for w in self.writers:
            w.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(w)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = await r.readexactly(length)
                self.bodies.append(body)
                answer = b"echo:" + body
                if self.mode == "length":
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
                elif self.mode == "chunked":
                    w.write(b"HTTP/1.1 422 Unprocessable\r\ntransfer-encoding: chunked\r\n\r\n"
                            b"5\r\necho:\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                elif self.mode == "close":
                    w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
                    await w.drain()
                    w.close()
                    return
                elif self.mode == "cut":
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                    await w.drain()
                    w.close()
                    return
                elif self.mode == "stall":
                    await asyncio.sleep(60)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@contextlib.asynccontextmanager
async def peer_and_client():
    peer = await Peer().start()
    client = UpstreamClient()
    try:
        yield peer, client
    finally:
        await client.close()
        await peer.stop()


def test_connections_are_kept_alive_and_reused():
    async def main():
        async with peer_and_client() as (peer, client):
            for i in range(5):
                assert await client.post(peer.port, "/score", [b"x%d" % i], 5) == (200, b"echo:x%d" % i)
            big = bytes(200_000)  # past the size sent in one write with the head
            assert await client.post(peer.port, "/score", [bytearray(big)], 5) == (200, b"echo:" + big)
            assert peer.connections == 1
    run(main())


def test_an_idle_connection_the_peer_closed_is_replaced_without_an_error():
    async def main():
        async with peer_and_client() as (peer, client):
            assert (await client.post(peer.port, "/score", [b"a"], 5))[0] == 200
            peer.drop_idle()
            await asyncio.sleep(0)  # no wait for the close to arrive: the stale connection may still look open
            assert await client.post(peer.port, "/score", [b"b"], 5) == (200, b"echo:b")
            assert peer.connections == 2
    run(main())


def test_chunked_answers_and_connection_close_are_understood():
    async def main():
        async with peer_and_client() as (peer, client):
            peer.mode = "chunked"
            assert await client.post(peer.port, "/score", [b"hello"], 5) == (422, b"echo:hello")
            peer.mode = "close"
            assert await client.post(peer.port, "/score", [b"c"], 5) == (200, b"echo:c")
            peer.mode = "length"
            assert await client.post(peer.port, "/score", [b"d"], 5) == (200, b"echo:d")
            assert peer.connections == 2  # the one the peer closed was not reused
    run(main())


def test_failures_are_upstream_errors_or_deadlines_and_never_reused():
    async def main():
        async with peer_and_client() as (peer, client):
            peer.mode = "cut"  # a fresh connection cut mid-answer: an error, not tried again
            with pytest.raises(UpstreamError):
                await client.post(peer.port, "/score", [b"x"], 5)
            assert len(peer.bodies) == 1
            peer.mode = "stall"
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                await client.post(peer.port, "/score", [b"y"], 0.3)
            assert loop.time() - t0 < 2
            peer.mode = "length"
            assert await client.post(peer.port, "/score", [b"z"], 5) == (200, b"echo:z")
            assert peer.connections == 3  # neither the cut nor the stalled connection was used again
            port = peer.port
        with pytest.raises(UpstreamError):  # closed client
            await client.post(port, "/score", [b"z"], 5)
        with pytest.raises(UpstreamError, match="cannot connect"):  # nothing listens any more
            await UpstreamClient().post(port, "/score", [b"z"], 5)
    run(main())


def test_a_new_port_closes_the_idle_connections_to_the_old_one():
    async def main():
        old, new = await Peer().start(), await Peer().start()
        client = UpstreamClient()
        try:
            await client.post(old.port, "/score", [b"a"], 5)
            await client.post(new.port, "/score", [b"b"], 5)
            assert old.port not in client._idle and len(client._idle[new.port]) == 1
        finally:
            await client.close()
            await old.stop()
            await new.stop()
    run(main())


def test_requests_waiting_for_a_port_go_on_the_moment_it_listens_with_one_watcher():
    """MOSEC's controller binds its port only once its workers are ready: a request (the first canary, or
    any during a restart) that finds it refused waits for it, and goes on when it listens, not at the
    next step of a back-off."""
    async def main():
        port = free_port()  # nothing listens on it (yet)
        client = UpstreamClient()
        peer = Peer()
        try:
            with pytest.raises(UpstreamError, match="cannot connect"):
                await client.post(port, "/score", [b"a"], 5)
            assert not await client.wait_listening(port, 0.05)  # nothing listens: False at the timeout
            waiters = [asyncio.ensure_future(client.wait_listening(port, 10)) for _ in range(50)]
            await asyncio.sleep(0.6)  # refused for a while, as during a model's compile
            assert len(client._watchers) == 1 and not any(w.done() for w in waiters)
            await peer.start(port)
            listening = time.monotonic()
            assert all(await asyncio.gather(*waiters))
            assert time.monotonic() - listening < 0.2  # PORT_POLL_S is 0.01: not a back-off of 0.25 s
            assert await client.post(port, "/score", [b"b"], 5) == (200, b"echo:b")
            assert peer.connections == 1  # the watcher's connection was the one used
            # nobody waits: the watcher of a port that refuses ends on its own
            await peer.stop()
            gone = free_port()
            assert not await client.wait_listening(gone, 0.05)
            given_up = client._watchers[gone]
            t_end = time.monotonic() + 2
            while client._watch_tasks and time.monotonic() < t_end:
                await asyncio.sleep(0.01)
            assert not client._watch_tasks and given_up.result() is False and not client._watchers
            # closing the client answers whoever still waits with False, and cancels nobody
            waiting = asyncio.ensure_future(client.wait_listening(gone, 10))
            await asyncio.sleep(0.05)
            await client.close()
            assert await asyncio.wait_for(waiting, 2) is False
        finally:
            await client.close()
    run(main())
