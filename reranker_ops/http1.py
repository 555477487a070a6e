"""The one HTTP/1.1 client parser of the project: h11's state machine, shared by the gate's upstream client
(asyncio, to MOSEC's controller) and the load generator's lean client (blocking sockets).

h11 does the framing (Content-Length, chunked, up to the end of the stream, ``Connection: close``,
HTTP/1.0 peers) and says when a connection may carry the next request; this module only says how a
``POST`` goes out and how its answer comes back, and turns h11's protocol errors into ``BadAnswer``. It never
touches a socket: each caller does its own I/O.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import h11

HEAD_LIMIT = 64 * 1024  # an answer's status line and headers: MOSEC's are ~150 bytes


class BadAnswer(ConnectionError):
    """The peer's bytes are not an HTTP/1.x answer (or it closed the connection mid-answer)."""


class NoAnswer(ConnectionError):
    """The peer closed the connection before any byte of the answer."""


class ClientConnection:
    """One client connection's HTTP state: ``request`` gives the bytes to send, ``receive`` takes the bytes
    that came back (``b""`` at the end of the stream) until it returns ``(status, body)``."""

    __slots__ = ("_h", "_status", "_body", "answered", "headers")

    def __init__(self, head_limit: int = HEAD_LIMIT) -> None:
        self._h = h11.Connection(h11.CLIENT, max_incomplete_event_size=head_limit)
        self._status = 0
        self._body: list = []
        self.answered = False  # a byte of the current answer came
        self.headers: list = []  # the last answer's, as h11 gives them: (lowercase name, value) bytes

    def request(self, target: str, headers: Iterable[tuple[str, str]], body: Sequence[bytes | bytearray | memoryview],
                method: str = "POST") -> list:
        """The buffers to send for one request with ``body`` (its parts back to back): the parts themselves,
        not copies."""
        h = self._h
        length = sum(len(b) for b in body)
        out = h.send_with_data_passthrough(
            h11.Request(method=method, target=target, headers=[*headers, ("Content-Length", str(length))]))
        for part in body:
            if len(part):
                out += h.send_with_data_passthrough(h11.Data(data=part))
        out += h.send_with_data_passthrough(h11.EndOfMessage())
        self._status, self._body, self.answered = 0, [], False
        return out

    def receive(self, data: bytes) -> Optional[tuple[int, bytes]]:
        """Feed what the socket gave (``b""``: it ended); the answer once whole, else None (send more)."""
        if data:
            self.answered = True
        h = self._h
        try:
            h.receive_data(data)
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    return None
                if isinstance(event, h11.Response):
                    self._status, self.headers = event.status_code, event.headers
                elif isinstance(event, h11.Data):
                    self._body.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return self._status, b"".join(self._body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise self._ended()
                # InformationalResponse (100 Continue and the like): wait for the real answer
        except h11.RemoteProtocolError as exc:
            if not data and not self.answered:
                raise NoAnswer("the server closed the connection without an answer") from exc
            raise BadAnswer(f"an unreadable answer (not HTTP/1.x as it should be): {exc}") from exc

    def _ended(self) -> ConnectionError:
        if self.answered:
            return BadAnswer("the server closed the connection mid-answer")
        return NoAnswer("the server closed the connection without an answer")

    def reusable(self) -> bool:
        """Whether the exchange ended cleanly and both sides keep the connection: then it is ready for the
        next request."""
        h = self._h
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            return True
        return False
