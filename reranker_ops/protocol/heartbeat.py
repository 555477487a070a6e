"""Worker heartbeats: what the watchdog reads to tell a hung worker from a busy one, and /metrics sums.

Standard library only: the supervisor reads these without importing MOSEC or numpy.
Every stamp is ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for all processes of a machine, never
stepped): a wall-clock step can neither make a busy worker look hung nor hide a hung one.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any


class Heartbeat:
    """A worker's live record: an mmapped fixed-layout file, so an update is a memory store, not a syscall.

    ``<stage>-<pid>.hb`` holds the hot fields (see ``FIELDS``) behind a sequence counter (a seqlock: odd
    while a write is under way), read with ``read_heartbeat``; ``<stage>-<pid>.json`` holds what never
    changes (pid, stage, start, heavy modules loaded), written once.
    """

    def __init__(self, worker_dir: str, stage: str) -> None:
        import mmap

        base = Path(worker_dir) / f"{stage}-{os.getpid()}"
        base.parent.mkdir(parents=True, exist_ok=True)
        self.info_path = base.with_suffix(".json")
        self.stage = stage
        self.started = time.time()  # wall clock, for display only
        with open(base.with_suffix(".hb"), "wb+") as fh:
            fh.write(b"\0" * RECORD.size)
            fh.flush()
            self._mm = mmap.mmap(fh.fileno(), RECORD.size)
        self.data: dict[str, Any] = {name: 0 for name in FIELDS}
        self.data["progress_at"] = time.monotonic()
        self._seq = 0
        self.write()

    def write(self, **changes: Any) -> None:
        self.data.update(changes)
        d = self.data
        self._seq += 1  # odd: write in progress
        SEQ.pack_into(self._mm, 0, self._seq)
        RECORD.pack_into(self._mm, 0, self._seq, d["busy_since"] or 0.0, d["progress_at"] or 0.0,
                         *(int(d[k]) for k in FIELDS[2:]))
        self._seq += 1  # even: consistent
        SEQ.pack_into(self._mm, 0, self._seq)

    def publish_info(self, **info: Any) -> None:
        data = {"pid": os.getpid(), "stage": self.stage, "started": self.started, **info}
        tmp = self.info_path.with_name(f".{self.info_path.name}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.info_path)


# envelope: the id of the envelope being scored (0 when none), so a worker that dies names what it held
FIELDS = ("busy_since", "progress_at", "ready", "batches", "requests", "pairs", "tokens", "errors", "envelope")
RECORD = struct.Struct("<Q d d q q q q q q q")
SEQ = struct.Struct("<Q")


def read_heartbeat(path: Path, attempts: int = 5) -> dict | None:
    """The hot fields of one worker's record; a torn one (see below); or None if it cannot be read.

    A seqlock read: sequence, record, sequence again; the record counts only if both reads of the
    sequence are the same even number (no write started or finished in between).

    A sequence that stays the same odd number through every attempt is a write that began and did not go on:
    its writer was killed or stopped half-way through it (a SIGKILL between the two stores of ``write``, found
    by the suite: that worker's record then never read again, the watchdog never saw it die, and the envelope
    it held was answered by nobody until its deadline), or was descheduled for the whole read. Such a record is
    returned with ``torn`` set and only what a write cannot have half-changed: ``ready`` (the one field that
    changes once, from 0 to 1: either value is true of that moment); not busy, no envelope, no progress, no
    counters. Its process is then still seen (stopped, dead or alive), and a dead one is taken to have held an
    unknown envelope. A sequence that moves between attempts is a live writer: None, read again next time.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        seen: set[int | None] = set()  # the sequences read, None for one that moved under the read
        for _ in range(attempts):
            raw = os.pread(fd, RECORD.size, 0)
            if len(raw) < RECORD.size:
                return None
            seq, *values = RECORD.unpack(raw)
            again = os.pread(fd, 8, 0)
            same = len(again) == 8 and SEQ.unpack(again)[0] == seq
            if same and seq % 2 == 0:
                data = dict(zip(FIELDS, values))
                data["busy_since"] = data["busy_since"] or None
                return data
            seen.add(seq if same else None)
        if len(seen) == 1 and (stuck := next(iter(seen))) is not None and stuck % 2 == 1:
            return {"torn": True, "ready": int(values[FIELDS.index("ready")]), "busy_since": None,
                    "progress_at": None, "envelope": 0}
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def read_worker_dir(worker_dir: Path) -> dict[int, dict]:
    """Every worker's record (hot fields and static info) by pid."""
    out: dict[int, dict] = {}
    for hb in Path(worker_dir).glob("*.hb"):
        stage, _, pid = hb.stem.rpartition("-")
        data = read_heartbeat(hb)
        if data is None or not pid.isdigit():
            continue
        data.update(pid=int(pid), stage=stage)
        try:
            data.update(json.loads(hb.with_suffix(".json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
        out[int(pid)] = data
    return out


def forget_worker(worker_dir: Path, pid: int) -> None:
    """Remove a dead worker's record, so it is never mistaken for a live one."""
    for hb in Path(worker_dir).glob(f"*-{pid}.*"):
        hb.unlink(missing_ok=True)
