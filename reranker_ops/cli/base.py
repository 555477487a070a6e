"""The Typer app and its root options. The commands register themselves on it (``models``, ``server``,
``tools``); ``root`` imports them all."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from .common import set_debug

app = typer.Typer(
    name="rerankctl",
    help="Run a cross-encoder reranker on Intel CPUs: download, convert, serve, watch, stop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rerankctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks. \\[env: RERANKER_DEBUG]")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    set_debug(debug)
