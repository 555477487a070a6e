"""The app with every command on it: ``app`` (``cli/base.py``), and the modules whose commands register on it."""

from __future__ import annotations

# the order of the imports is the order of the commands in --help
from . import models, server, units, tools  # noqa: F401,I001  (download, convert; serve, status, stop, logs,
from .base import app  # watchdog; systemd; bench, compare)

__all__ = ["app"]
