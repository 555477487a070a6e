"""``bench`` and ``compare``."""

from __future__ import annotations

from . import app
from .common import handled
from ..errors import NotImplementedYet


@app.command()
@handled
def bench() -> None:
    """Load-test a /rerank endpoint (not built yet)."""
    raise NotImplementedYet("bench is not built yet", "see issue 7")


@app.command()
@handled
def compare() -> None:
    """Compare two rerank endpoints side by side (not built yet)."""
    raise NotImplementedYet("compare is not built yet", "see issue 8")
