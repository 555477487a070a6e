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
import os
import re
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


class TextFormatter(logging.Formatter):
    def __init__(self, fmt: str = "%(asctime)s %(levelname)s %(message)s") -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, pid, and request_id when the line
    belongs to a request; a traceback as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
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
