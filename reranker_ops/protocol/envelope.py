"""The private wire format between the gate (in the supervisor) and the score worker (in MOSEC's processes).

Standard library only: both sides import it. One envelope carries the requests that waited for a free worker;
the worker answers each in its part, sealed. The comment below describes the frame.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

Buffer = Union[bytes, bytearray, memoryview]


# --- between the gate and the score worker ---------------------------------------------------------------
# The gate batches, not MOSEC: the requests that wait for a free worker go to MOSEC as ONE request, an
# envelope, and MOSEC hands each worker one envelope at a time (its own batcher is off: it would close a
# batch one timer tick after its first request, ~2 ms at c=1, and split what the gate gathered).
#
# An envelope is a head, ``RKE1 <id:016x> <mac>\n``, then parts back to back, each ``<tag> <length:010d>\n<body>``.
# The id names the envelope (the worker writes it into its heartbeat while it scores it, so a worker that dies
# tells the supervisor which envelope it took with it); the tag names the route. ``mac`` is HMAC-SHA256 of the
# id and every part under the generation's secret: only the gate knows the secret, so a request sent straight
# to MOSEC's port is refused whole, and the secret itself never travels (a listener that took the internal
# port first learns nothing it could answer with). The worker answers ``<mac>\n`` and each part in order,
# ``<length> <timing>\n<data>``, where data is the route's JSON answer or, for a request that failed its checks,
# ``!<status> <message>`` (``Failed``), and timing is what the worker measured for it (``Timing``); the answer's mac covers the envelope's id and the answers, so the gate
# takes scores only from the generation it started. One bad request never fails the others of its envelope.
SECRET_LEN = 32  # hex characters of a generation's secret
MAGIC = b"RKE1"
MAC_LEN = 64  # hex characters of an HMAC-SHA256
ENVELOPE_HEAD_LEN = len(MAGIC) + 1 + 16 + 1 + MAC_LEN + 1  # "RKE1 <id:016x> <mac>\n": a fixed length
PART_HEAD_LEN = 1 + 1 + 10 + 1  # "<tag> <length:010d>\n": a fixed length
ANSWER_HEAD_LEN = MAC_LEN + 1
REFUSED = "requests must go through the API port"


class EnvelopeError(ValueError):
    """An envelope (or an answer to one) that is not framed as the gate and the worker frame them."""


class Untrusted(EnvelopeError):
    """An envelope or an answer whose mac does not prove the generation's secret."""


def part_head(tag: str, length: int) -> bytes:
    """The same bytes for every copy of a part: the gate writes it in place into the room reserved in front of
    a body, and a copy sent again (to a new generation) never changes bytes an earlier send may still hold."""
    return b"%s %010d\n" % (tag.encode("ascii"), length)


def _mac(secret: bytes, label: bytes, envelope_id: int, parts: Sequence[Buffer]) -> bytes:
    mac = hmac.new(secret, label + b"%016x" % envelope_id, hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.hexdigest().encode("ascii")


def seal(secret: bytes, envelope_id: int, parts: Sequence[Buffer]) -> bytes:
    """The head of an envelope of ``parts`` (each a part head and its body): its id and its mac."""
    return b"%s %016x %s\n" % (MAGIC, envelope_id, _mac(secret, b"E", envelope_id, parts))


def open_envelope(secret: bytes, data: Buffer) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The id and the (tag, body) of each part of an envelope sealed with ``secret``; ``Untrusted`` if the mac
    does not match (it was not sent by the gate), ``EnvelopeError`` if it is not an envelope at all."""
    view = memoryview(data)
    head = bytes(view[:ENVELOPE_HEAD_LEN])
    fields = head[:-1].split(b" ")
    if (len(head) != ENVELOPE_HEAD_LEN or head[-1:] != b"\n" or len(fields) != 3 or fields[0] != MAGIC
            or not _is_hex(fields[1]) or not _is_hex(fields[2])):
        raise EnvelopeError("not an envelope's head")
    envelope_id = int(fields[1], 16)
    body = view[ENVELOPE_HEAD_LEN:]
    if not hmac.compare_digest(fields[2], _mac(secret, b"E", envelope_id, [body])):
        raise Untrusted("the envelope's mac does not match")
    return envelope_id, split_parts(body)


def split_parts(data: Buffer) -> list[tuple[bytes, bytes]]:
    """(tag, body) of each part of an envelope's body."""
    data = memoryview(data)
    parts, pos, end = [], 0, len(data)
    while pos < end:
        head = bytes(data[pos : pos + PART_HEAD_LEN])
        fields = head[:-1].split(b" ")
        if len(head) != PART_HEAD_LEN or head[-1:] != b"\n" or len(fields) != 2 or not fields[1].isdigit():
            raise EnvelopeError("not an envelope part's head")
        start = pos + PART_HEAD_LEN
        pos = start + int(fields[1])
        if pos > end:
            raise EnvelopeError("a part longer than the envelope")
        parts.append((fields[0], bytes(data[start:pos])))
    if not parts:
        raise EnvelopeError("an empty envelope")
    return parts


def seal_answer(secret: bytes, envelope_id: int, packed: bytes) -> bytes:
    """A worker's answer to envelope ``envelope_id``: its mac, then the packed answers."""
    return _mac(secret, b"A", envelope_id, [packed]) + b"\n" + packed


def open_answer(secret: bytes, envelope_id: int, data: bytes) -> bytes:
    """The packed answers of a sealed answer, or ``Untrusted`` when it was not sealed with ``secret`` for
    this envelope (another process answered on the internal port, or an answer to another envelope)."""
    mac, packed = data[:MAC_LEN], data[ANSWER_HEAD_LEN:]
    if len(data) < ANSWER_HEAD_LEN or data[MAC_LEN:ANSWER_HEAD_LEN] != b"\n" or not hmac.compare_digest(
            mac, _mac(secret, b"A", envelope_id, [packed])):
        raise Untrusted("the answer does not prove the generation's secret")
    return packed


def _is_hex(field: bytes) -> bool:
    return bool(field) and all(c in b"0123456789abcdef" for c in field)


@dataclass(frozen=True)
class Timing:
    """What the worker measured for one request: microseconds tokenizing it, microseconds of the model call
    its pairs were in (shared with the envelope's other requests), its tokens and its characters of text."""

    tokenize_us: int = 0
    inference_us: int = 0
    tokens: int = 0
    chars: int = 0

    def encode(self) -> bytes:
        return b"%d,%d,%d,%d" % (self.tokenize_us, self.inference_us, self.tokens, self.chars)

    @staticmethod
    def decode(field: bytes) -> "Timing":
        values = field.split(b",")
        if len(values) != 4 or not all(v.isdigit() for v in values):
            raise EnvelopeError("not an answer's timing")
        return Timing(*(int(v) for v in values))

    def __add__(self, other: "Timing") -> "Timing":
        return Timing(self.tokenize_us + other.tokenize_us, self.inference_us + other.inference_us,
                      self.tokens + other.tokens, self.chars + other.chars)


NO_TIMING = Timing()


def read_answers(data: bytes, count: int) -> list[tuple[int, bytes, Timing]]:
    """Each part's status, body and timing, from the answer to an envelope of ``count`` parts that MOSEC
    answered 200: 200 and the route's JSON, or a failed request's own status and message (``Failed``)."""
    out = []
    for answer, timing in split_answers(data, count):
        failed = Failed.decode(answer)
        out.append((200, answer, timing) if failed is None else (failed.status, failed.message.encode("utf-8"), timing))
    return out


def pack_answers(answers: Sequence[tuple[bytes, Timing]]) -> bytes:
    return b"".join(b"%d %s\n%s" % (len(a), t.encode(), a) for a, t in answers)


def split_answers(data: bytes, count: int) -> list[tuple[bytes, Timing]]:
    """The ``count`` answers of an envelope's answer, in order, each with its timing."""
    out, pos = [], 0
    while pos < len(data) and len(out) < count:
        nl = data.find(b"\n", pos, pos + 100)
        length, _, timing = data[pos:nl].partition(b" ") if nl >= 0 else (b"", b"", b"")
        if nl < 0 or not length.isdigit():
            raise EnvelopeError("not an answer's length")
        pos = nl + 1 + int(length)
        if pos > len(data):
            raise EnvelopeError("an answer longer than the envelope's answer")
        out.append((data[nl + 1 : pos], Timing.decode(timing)))
    if len(out) != count or pos != len(data):
        raise EnvelopeError(f"{len(out)} answers for {count} requests")
    return out


@dataclass(frozen=True)
class Failed:
    """Why one request of a batch was not scored."""

    status: int
    message: str
    detail: str = field(default="", compare=False)  # for the server's log only, never sent

    def encode(self) -> bytes:
        return b"!%d %s" % (self.status, self.message.encode("utf-8"))

    @staticmethod
    def decode(data: bytes) -> Optional["Failed"]:
        """The failure a worker's answer carries, or None for a JSON answer."""
        if data[:1] != b"!":
            return None
        code, _, message = data[1:].partition(b" ")
        return Failed(int(code) if code.isdigit() else 500, message.decode("utf-8", "replace"))
