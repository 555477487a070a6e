"""``serve``, ``status``, ``stop``, ``logs``, ``watchdog``, ``systemd``."""

from __future__ import annotations

from . import app
from .common import handled
from ..errors import NotImplementedYet

for _name, _help in [
    ("serve", "Start the reranker server."),
    ("status", "Show the server's state."),
    ("stop", "Stop the server."),
    ("watchdog", "Probe a running server with a real rerank request."),
]:
    def _stub(_n: str = _name) -> None:
        raise NotImplementedYet(f"{_n} is not built yet", "see the open issues")
    app.command(name=_name, help=_help + " (not built yet)")(handled(_stub))
