"""``rerankctl systemd print|install``: the units, with this installation's paths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .base import app
from .common import console, handled, settings_from

systemd_app = typer.Typer(help="Print or install the systemd units, with this installation's paths.",
                          no_args_is_help=True)
app.add_typer(systemd_app, name="systemd")


@systemd_app.command("print")
@handled
def systemd_print(
    unit: Annotated[str, typer.Argument(help="rerankctl.service or rerankctl-prepare.service")] = "rerankctl.service",
    env_file: Annotated[str, typer.Option("--env-file", help="EnvironmentFile= path.")] = "/etc/rerankctl/env",
) -> None:
    """Print a unit file."""
    from ..errors import ConfigError
    from ..systemd_units import UNITS, render

    if unit not in UNITS:
        raise ConfigError(f"unknown unit {unit!r}", f"choose one of {', '.join(UNITS)}")
    print(render(unit, settings_from(), env_file=env_file), end="")


@systemd_app.command("install")
@handled
def systemd_install(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the units.")] = Path("/etc/systemd/system"),
    env_file: Annotated[Path, typer.Option("--env-file", help="Environment file to create if missing.")] = Path(
        "/etc/rerankctl/env"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing unit files.")] = False,
) -> None:
    """Write both units (and an environment file from env.example if there is none)."""
    from ..settings import render_env_example
    from ..errors import ConfigError
    from ..systemd_units import UNITS, render

    settings = settings_from()
    directory.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        target = directory / unit
        if target.exists() and not force:
            raise ConfigError(f"{target} exists", "pass --force to overwrite it")
        target.write_text(render(unit, settings, env_file=str(env_file)), encoding="utf-8")
        console.print(f"wrote {target}")
    if not env_file.exists():
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.write_text(render_env_example(), encoding="utf-8")
        env_file.chmod(0o640)
        console.print(f"wrote {env_file} (edit it: model, ports, API key)")
    console.print("next: systemctl daemon-reload && systemctl enable --now rerankctl-prepare rerankctl")
