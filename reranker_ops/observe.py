"""Following one request: its id, and the log lines that carry it.

Every API request gets an id: the client's ``X-Request-Id`` when it sends a usable one (bounded, and cut to the
characters an id needs, so a header can never forge a log line), else a new one. The gate answers with it, puts
it in its trace, and every log line written while that request is handled carries it: the id lives in a
context variable, which asyncio copies into each task, and a logging filter adds it to each record.

``RERANKER_LOG_FORMAT=json`` writes one JSON object a line (journald and Loki read them as fields); ``text`` is
the plain ``time level message`` with ``[request <id>]`` at the end of a request's lines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import re
import stat
import time
import uuid
from typing import Optional

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128
_NOT_ID = re.compile(r"[^A-Za-z0-9._:@/+=-]")

request_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(header: Optional[str]) -> str:
    """The client's id when it is usable (at most MAX_REQUEST_ID characters of ``[A-Za-z0-9._:@/+=-]`` once
    anything else is dropped), else a new one."""
    if header:
        cleaned = _NOT_ID.sub("", header[: MAX_REQUEST_ID * 4])[:MAX_REQUEST_ID]
        if cleaned:
            return cleaned
    return new_request_id()


class RequestContext(logging.Filter):
    """Adds ``request_id`` (or None) to every record, from the context the line is written in."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class _Stamps:
    """A line's time, formatted once a second (``strftime`` of a broken-down time costs a few microseconds a
    line, and the access log writes a line per request)."""

    def __init__(self, fmt: str, convert) -> None:
        self.fmt, self.convert = fmt, convert
        self.last: tuple[int, str] = (-1, "")

    def __call__(self, created: float) -> str:
        second = int(created)
        last = self.last  # one read: another thread may replace it meanwhile
        if last[0] != second:
            last = (second, time.strftime(self.fmt, self.convert(second)))
            self.last = last
        return last[1]


class TextFormatter(logging.Formatter):
    def __init__(self, fmt: str = "%(asctime)s %(levelname)s %(message)s") -> None:
        super().__init__(fmt)
        self._stamps = _Stamps(self.default_time_format, self.converter)

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:  # noqa: N802
        if datefmt:
            return super().formatTime(record, datefmt)
        return self.default_msec_format % (self._stamps(record.created), record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, pid, and request_id when the line
    belongs to a request; a traceback as ``exc``."""

    def __init__(self) -> None:
        super().__init__()
        self._stamps = _Stamps("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": f"{self._stamps(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else TextFormatter()


class LogFile(logging.handlers.RotatingFileHandler):
    """The daemon's log file, rotated at ``maxBytes`` as the standard handler rotates it, at less cost a line.

    The standard handler formats every record twice (once only to measure it), and before every line stats
    the path twice (bpo-45401: never roll over anything but a regular file) and seeks to the file's end: about
    25 us a line, and the access log writes a line per request in the gate's own thread. Here a record is
    formatted once and measured in bytes (the standard one counts characters, so a Cyrillic line could take a
    file past its bound), and one ``fstat`` of the open file says both its size, whoever wrote to it, and
    whether it is a regular file. Every line is still flushed as it is written: a death loses none."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.stream is None:  # delay=True, or closed and written to again
                self.stream = self._open()
            if self.maxBytes > 0:
                n = len(line) if line.isascii() else len(line.encode(self.encoding or "utf-8", "replace"))
                st = os.fstat(self.stream.fileno())
                if stat.S_ISREG(st.st_mode) and st.st_size and st.st_size + n >= self.maxBytes:
                    self.doRollover()
                    if self.stream is None:  # delay=True leaves it closed
                        self.stream = self._open()
                    if not self.backupCount:
                        # the standard handler reopens the full file and rolls over again at every line;
                        # RERANKER_LOG_BACKUPS=0 keeps no old log: the file starts over
                        self.stream.truncate(0)
            self.stream.write(line)
            self.stream.flush()
        except RecursionError:  # as the standard handlers do
            raise
        except Exception:  # noqa: BLE001 - logging's own rule: a failed line is reported, never raised
            self.handleError(record)
