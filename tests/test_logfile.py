"""The daemon's log file (``observe.LogFile``): it rotates as the standard ``RotatingFileHandler`` does, at less
cost a line (a record formatted once, the size counted instead of stat-ed and sought before every line), and
keeps every file within its bound where the standard one does not (it measures a line in characters, not
bytes). The line's time, formatted once a second, is the standard formatter's."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat
import time

import pytest

from reranker_ops.observe import JsonFormatter, LogFile, TextFormatter
from reranker_ops.supervise.rundir import reopen_log_files

pytestmark = pytest.mark.timeout(60)

MAX = 2000


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"test-logfile.{name}")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    return log


def _kept(path) -> list[str]:
    """Every line still on disk, oldest first (.2, .1, then the file itself)."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:])) + [path]
    return [line for f in files if f.exists() for line in f.read_text(encoding="utf-8").splitlines()]


def _write(log: logging.Logger, lines: list[str]) -> None:
    for line in lines:
        log.info(line)
    for h in log.handlers:
        h.close()


LINES = [f"POST /rerank 200 {i % 97}.{i % 10}ms {i * 37 % 5000} bytes" for i in range(400)]


def test_ascii_lines_rotate_exactly_as_the_standard_handler_rotates(tmp_path):
    (tmp_path / "std").mkdir()
    (tmp_path / "ours").mkdir()
    std, ours = tmp_path / "std" / "x.log", tmp_path / "ours" / "x.log"
    _write(_logger("std", logging.handlers.RotatingFileHandler(std, maxBytes=MAX, backupCount=2, encoding="utf-8")),
           LINES)
    _write(_logger("ours", LogFile(ours, maxBytes=MAX, backupCount=2, encoding="utf-8")), LINES)
    for suffix in ("", ".1", ".2"):
        assert (tmp_path / "ours" / f"x.log{suffix}").read_bytes() == (tmp_path / "std" / f"x.log{suffix}").read_bytes()
    assert not (tmp_path / "ours" / "x.log.3").exists()
    kept = _kept(ours)
    assert kept == LINES[-len(kept):] and len(kept) > 60  # the newest lines, in order, none twice


def test_every_file_stays_within_its_bound_with_cyrillic_lines(tmp_path):
    path = tmp_path / "x.log"
    # 106 bytes, 56 characters a line: counted in characters, the 19th line would take a file to 2014 bytes
    lines = [f"{i:04d} {'ё' * 50}" for i in range(300)]
    _write(_logger("cyr", LogFile(path, maxBytes=MAX, backupCount=3, encoding="utf-8")), lines)
    for f in tmp_path.glob("x.log*"):
        assert 0 < f.stat().st_size <= MAX, f
    kept = _kept(path)
    assert kept == lines[-len(kept):] and len(kept) > 40


def test_lines_another_writer_appended_are_counted_before_a_rollover(tmp_path):
    path = tmp_path / "x.log"
    log = _logger("other", LogFile(path, maxBytes=MAX, backupCount=2, encoding="utf-8"))
    log.info("first line")
    with open(path, "a", encoding="utf-8") as other:  # e.g. an operator's note, or a second process
        other.write("x" * (MAX - 40) + "\n")  # the next line crosses the bound only with these bytes
    log.info("a line that crosses the bound with the other writer's bytes")
    log.handlers[0].close()
    assert (tmp_path / "x.log.1").exists(), "the other writer's bytes were not counted"
    assert path.read_text(encoding="utf-8") == "a line that crosses the bound with the other writer's bytes\n"


def test_no_backups_means_the_file_starts_over(tmp_path):
    path = tmp_path / "x.log"
    _write(_logger("zero", LogFile(path, maxBytes=MAX, backupCount=0, encoding="utf-8")), LINES)
    assert [p.name for p in tmp_path.iterdir()] == ["x.log"]
    assert 0 < path.stat().st_size <= MAX
    kept = path.read_text(encoding="utf-8").splitlines()
    assert kept == LINES[-len(kept):]


class _Recording(LogFile):
    """Counts rollovers instead of doing them: what the tests below judge is the decision."""

    rollovers = 0

    def doRollover(self):  # noqa: N802
        self.rollovers += 1


@pytest.mark.parametrize("mode, rolled", [(stat.S_IFCHR, False), (stat.S_IFIFO, False), (stat.S_IFREG, True)])
def test_only_a_regular_file_is_ever_rolled_over(tmp_path, monkeypatch, mode, rolled):
    """bpo-45401: never roll over a device or a pipe (as root, renaming /dev/null would take it from the whole
    machine). Linux reports such files' size as 0, which never crosses a bound; the kernel's answer is stood in
    for here with a large size, so the file's kind alone decides."""
    handler = _Recording(tmp_path / "x.log", maxBytes=100, backupCount=2, encoding="utf-8")
    log = _logger(f"kind-{mode}", handler)
    real_fstat = os.fstat

    def fstat(fd):
        got = real_fstat(fd)
        if handler.stream is None or fd != handler.stream.fileno():
            return got
        fields = list(got)
        fields[stat.ST_MODE], fields[stat.ST_SIZE] = mode | 0o644, 10**6
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", fstat)
    log.info("a line")
    monkeypatch.undo()
    handler.close()
    assert handler.rollovers == (1 if rolled else 0)


def test_a_removed_log_reopened_by_the_supervisor_is_counted_from_its_new_size(tmp_path):
    path = tmp_path / "x.log"
    log = _logger("reopen", LogFile(path, maxBytes=MAX, backupCount=2, encoding="utf-8"))
    for line in LINES[:30]:
        log.info(line)
    path.unlink()
    reopen_log_files(log)  # what the supervisor does when the run dir's files are removed under it
    for line in LINES[30:]:
        log.info(line)
    log.handlers[0].close()
    for f in tmp_path.glob("x.log*"):
        assert f.stat().st_size <= MAX, f
    kept = _kept(path)
    assert kept == LINES[-len(kept):] and (tmp_path / "x.log.1").exists()


@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005, 1_700_000_001.5,
                                     1_700_003_600.25, 1_699_999_999.75])
def test_a_lines_time_is_the_standard_formatters(created):
    ours, js = TextFormatter(), JsonFormatter()
    std = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    record = logging.makeLogRecord({"msg": "m", "levelname": "INFO", "levelno": logging.INFO})
    for t in (created - 1.0, created, created + 0.3, created):  # the cached second, then another, then back
        record.created, record.msecs = t, int((t - int(t)) * 1000)
        assert ours.formatTime(record) == std.formatTime(record)
        assert ours.formatTime(record, "%H:%M") == std.formatTime(record, "%H:%M")
        assert json.loads(js.format(record))["time"] == \
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{record.msecs:03d}Z"
