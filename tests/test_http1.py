"""The project's one HTTP/1.1 client parser (``http1.py``, httptools underneath), fed byte by byte and whole:
every framing MOSEC or a server behind a balancer may use, and the ways an answer goes wrong."""

from __future__ import annotations

import pytest

from reranker_ops.http1 import BadAnswer, ClientConnection, NoAnswer

HEADERS = (("Host", "127.0.0.1:1"), ("Content-Type", "application/json"))


def exchange(raw: bytes, *, bytewise: bool, end: bool = True):
    conn = ClientConnection(head_limit=1024)
    sent = b"".join(conn.request("/score", HEADERS, (b"abc", bytearray(b"de"))))
    assert sent.startswith(b"POST /score HTTP/1.1\r\n") and sent.endswith(b"\r\n\r\nabcde")
    assert b"Content-Length: 5\r\n" in sent
    pieces = [raw[i:i + 1] for i in range(len(raw))] if bytewise else [raw]
    for piece in pieces + ([b""] if end else []):
        answer = conn.receive(piece)
        if answer is not None:
            return answer, conn
    return None, conn


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("raw, status, body, keep", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, b"hello", True),
    (b"HTTP/1.1 422 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nTrailer: t\r\n\r\n",
     422, b"hello", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
    (b"HTTP/1.0 200 OK\r\n\r\nto the end", 200, b"to the end", False),  # delimited by the end of the stream
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
])
def test_every_framing_gives_the_whole_answer_and_says_whether_to_keep_the_connection(raw, status, body, keep,
                                                                                      bytewise):
    answer, conn = exchange(raw, bytewise=bytewise, end=not keep)
    assert answer == (status, body)
    assert conn.reusable() is keep
    if keep:  # the next request goes out on the same state machine
        assert b"".join(conn.request("/score", HEADERS, (b"x",))).startswith(b"POST /score")


@pytest.mark.parametrize("raw, error", [
    (b"", NoAnswer),  # an idle connection the server had closed: safe to send again
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", BadAnswer),  # cut mid-answer: not safe
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", BadAnswer),  # not HTTP at all
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", BadAnswer),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 4096, BadAnswer),  # a head past the limit, however it ends
    (b"HTTP/1.1 200 OK\r\n" + b"X-Many: a\r\n" * 120 + b"Content-Length: 0\r\n\r\n", BadAnswer),  # whole, too big
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n", BadAnswer),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", BadAnswer),  # not a chunk size
])
def test_a_broken_answer_is_one_typed_error(raw, error):
    with pytest.raises(error):
        exchange(raw, bytewise=False)


def test_a_connection_whose_answer_was_unreadable_is_not_used_again():
    conn = ClientConnection()
    conn.request("/score", HEADERS, (b"x",))
    with pytest.raises(BadAnswer):
        conn.receive(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    assert not conn.reusable()
    with pytest.raises(BadAnswer):
        conn.request("/score", HEADERS, (b"x",))


def test_bytes_after_the_answer_leave_the_answer_and_close_the_connection():
    conn = ClientConnection()
    conn.request("/score", HEADERS, (b"x",))
    answer = conn.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 500 Oops\r\n\r\n")
    assert answer == (200, b"ok")
    assert not conn.reusable()


def test_the_answers_headers_are_kept_lowercase_and_only_the_last_answers():
    conn = ClientConnection()
    conn.request("/score", HEADERS, (b"x",))
    assert conn.receive(b"HTTP/1.1 100 Continue\r\nX-Early: 1\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nX-Compute-Tokens: 7\r\nContent-Length: 0\r\n\r\n") == (200, b"")
    assert conn.headers == [(b"x-compute-tokens", b"7"), (b"content-length", b"0")]


@pytest.mark.parametrize("target, headers", [
    ("/score", (("Authorization", "Bearer k\r\nX-Evil: 1"),)),  # a value that would add a header
    ("/score", (("X-A", "a\nb"),)),
    ("/score", (("X-A", "a\0b"),)),
    ("/score", (("X-A\r\nX-Evil", "1"),)),  # a name that would
    ("/score", (("X A", "1"),)),
    ("/score", (("X-A", "é"),)),  # not ASCII: not sent as some other bytes
    ("/score HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /", ()),  # a target that would add a request
    ("", ()),
])
def test_no_header_or_target_can_smuggle_a_line(target, headers):
    conn = ClientConnection()
    with pytest.raises(ValueError):
        conn.request(target, (("Host", "h"), *headers), (b"",))
