"""What every command shares: option aliases, settings from options, the error mapper, the consoles."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..settings import Settings, SettingsError, load_settings
from ..errors import RerankerError

console = Console()
err_console = Console(stderr=True)

# Options spelled the same in every command, each with its RERANKER_* twin (read by Settings, not here).
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Repo id, name under the models dir, or model folder. \\[env: RERANKER_MODEL]"),
]
ModelsDirOpt = Annotated[
    Optional[Path], typer.Option("--models-dir", help="Models folder. \\[env: RERANKER_MODELS_DIR]")
]
HostOpt = Annotated[Optional[str], typer.Option("--host", help="API address. \\[env: RERANKER_HOST]")]
PortOpt = Annotated[Optional[int], typer.Option("--port", "-p", help="API port. \\[env: RERANKER_PORT]")]
HealthPortOpt = Annotated[
    Optional[int], typer.Option("--health-port", help="Health/metrics port. \\[env: RERANKER_HEALTH_PORT]")
]
RunDirOpt = Annotated[
    Optional[Path], typer.Option("--run-dir", help="Lock, pidfile, logs. \\[env: RERANKER_RUN_DIR]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_debug = {"on": False}


def set_debug(on: bool) -> None:
    _debug["on"] = on or os.environ.get("RERANKER_DEBUG", "").lower() in ("1", "true", "yes")


def settings_from(**options: Any) -> Settings:
    from .. import settings as config

    try:
        settings = load_settings(**options)
    except SettingsError as exc:  # every bad setting, on one line
        raise RerankerError(
            "invalid setting: " + "; ".join(exc.problems), "fix the option or its RERANKER_* variable"
        ) from exc
    if config.ENV_FILE_IGNORED and not _warned["env"]:
        _warned["env"] = True
        err_console.print(f"[yellow]warning:[/] {escape(config.ENV_FILE_IGNORED)}", highlight=False, soft_wrap=True)
    return settings


_warned = {"env": False}


def report_error(exc: BaseException) -> int:
    if isinstance(exc, RerankerError):
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"  [yellow]→[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        code = exc.exit_code
    else:
        err_console.print(
            f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        err_console.print("  [yellow]→[/] run again with --debug for the traceback", highlight=False)
        code = 70
    if _debug["on"]:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return code


def handled(fn: Callable) -> Callable:
    """Run a command so that any error reaches the user as one line plus a hint, exit code non-zero."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
            raise typer.Exit(report_error(exc)) from None

    return wrapper
