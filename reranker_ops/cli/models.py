"""``download`` and ``convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..models import store
from . import app
from .common import JsonOpt, ModelOpt, ModelsDirOpt, console, err_console, handled, settings_from


@app.command()
@handled
def download(
    repo_id: Annotated[Optional[str], typer.Argument(help="Hub repo id (default: the configured model).")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit to pin.")] = None,
    models_dir: ModelsDirOpt = None,
) -> None:
    """Download a model: pinned to its commit, safetensors only, resumable."""
    settings = settings_from(models_dir=models_dir, revision=revision)
    repo = repo_id or settings.model
    store.validate_repo_id(repo)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        task = bar.add_task(f"{repo}", total=None)

        def progress(done: int, total: int, _desc: str) -> None:
            bar.update(task, completed=done, total=total or None)

        folder = store.download(settings, repo, settings.revision, progress=progress)
    manifest = store.read_manifest(folder)
    console.print(f"[green]downloaded[/] {repo} @ {manifest.get('commit', '?')[:12]} → {folder}")
    console.print(f"next: rerankctl convert {repo}")
