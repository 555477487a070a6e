"""sd_notify: the datagrams systemd gets, silence outside systemd, and nothing kept per message."""

from __future__ import annotations

import socket
import tracemalloc

import pytest

from reranker_ops.supervise.sdnotify import Notifier

pytestmark = pytest.mark.timeout(60)


def test_sd_notify_datagrams_and_bounded_memory(tmp_path):
    addr = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(addr))
    sock.settimeout(2)
    try:
        n = Notifier(str(addr))
        assert n.ready("serving") and sock.recv(100) == b"READY=1\nSTATUS=serving"
        assert n.watchdog() and sock.recv(100) == b"WATCHDOG=1"
        assert n.stopping() and sock.recv(100).startswith(b"STOPPING=1")
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _ in range(500):  # a year of pings keeps nothing
            n.watchdog()
            sock.recv(100)
        grown = tracemalloc.take_snapshot().compare_to(before, "filename")
        tracemalloc.stop()
        kept = sum(d.size_diff for d in grown if d.traceback[0].filename.endswith("sdnotify.py"))
        assert kept < 1024, kept
    finally:
        sock.close()
    assert Notifier(None).ready("x") is False  # silent outside systemd
    assert Notifier(str(tmp_path / "gone.sock")).watchdog() is False  # never raises
