"""One way to write a JSON file that readers see whole or not at all: a private temporary file (0600 from the
moment it exists) beside it, renamed over it. Standard library only: both sides of the server use it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any, *, indent: int | None = 2, sync: bool = True) -> None:
    """``sync``: flushed to the disk before the rename (a manifest, a pidfile: they must survive a power cut);
    a file rewritten at every start can skip it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent, ensure_ascii=False)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
