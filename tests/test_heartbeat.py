"""Worker heartbeats (``protocol/heartbeat.py``): the record's round trip, and torn reads never taken for
consistent ones."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.timeout(60)


def test_heartbeat_record_roundtrip_and_torn_reads(tmp_path, monkeypatch):
    import struct

    from reranker_ops.protocol import heartbeat as hbmod
    from reranker_ops.protocol.heartbeat import (
        Heartbeat,
        forget_worker,
        read_heartbeat,
        read_worker_dir,
    )

    hb = Heartbeat(str(tmp_path), "score")
    hb.publish_info(heavy_modules=[])
    hb.write(busy_since=123.5, progress_at=124.0, pairs=7, tokens=70, ready=1)
    path = next(tmp_path.glob("score-*.hb"))
    got = read_heartbeat(path)
    assert got["busy_since"] == 123.5 and got["pairs"] == 7 and got["tokens"] == 70 and got["ready"] == 1
    hb.write(busy_since=None)
    assert read_heartbeat(path)["busy_since"] is None
    [(pid, rec)] = read_worker_dir(tmp_path).items()
    assert pid == os.getpid() and rec["stage"] == "score" and rec["heavy_modules"] == []
    # a write caught half-way (odd sequence number) is never taken for a consistent record: while the sequence
    # stays odd (its writer was killed or stopped half-way), the record is torn: its process is still seen, but
    # nothing the write may have half-changed is (no busy, no envelope, no progress, no counters)
    hb.write(busy_since=200.0, envelope=77)
    struct.pack_into("<Q", hb._mm, 0, 41)
    hb._mm.flush()
    torn = read_heartbeat(path)
    assert torn == {"torn": True, "ready": 1, "busy_since": None, "progress_at": None, "envelope": 0}, torn
    [(pid, rec)] = read_worker_dir(tmp_path).items()
    assert pid == os.getpid() and rec["stage"] == "score" and rec["torn"] and "pairs" not in rec
    hb.write(pairs=8, busy_since=None, envelope=0)
    assert read_heartbeat(path)["pairs"] == 8 and "torn" not in read_heartbeat(path)
    # a write that starts and ends between the reader's two looks (the sequence moved): torn, rejected
    real_pread = os.pread
    calls = {"n": 0}

    def racing_pread(fd, n, off):
        calls["n"] += 1
        data = real_pread(fd, n, off)
        if n == 8:  # the re-read of the sequence: a writer finished a whole update meanwhile
            hb.write(pairs=hb.data["pairs"] + 1)
            return real_pread(fd, n, off)
        return data

    monkeypatch.setattr(hbmod.os, "pread", racing_pread)
    assert read_heartbeat(path, attempts=3) is None
    monkeypatch.undo()
    assert read_heartbeat(path)["pairs"] == hb.data["pairs"]
    forget_worker(tmp_path, os.getpid())
    assert read_worker_dir(tmp_path) == {}
