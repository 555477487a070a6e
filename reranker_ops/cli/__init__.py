"""The ``rerankctl`` command: a thin layer over the library. The only package that prints.

The app lives in ``root`` (commands in ``models``, ``server``, ``tools``). This module stays light, so that
``main`` can import the app under ``frozen_imports``, the start-up of every command."""

from __future__ import annotations

from typing import Any


def main() -> None:
    from ..startup import freeze_before_exit, frozen_imports

    with frozen_imports():
        from .root import app
    try:
        app()
    finally:
        freeze_before_exit()


def __getattr__(name: str) -> Any:
    if name == "app":
        from .root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
