"""The Typer app: the root options, and the modules that register the commands on it."""

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


from . import models as _models  # noqa: E402,F401  (registers download, convert)
from . import server as _server  # noqa: E402,F401  (serve, status, stop, logs, watchdog, systemd)
from . import tools as _tools  # noqa: E402,F401  (bench, compare)
