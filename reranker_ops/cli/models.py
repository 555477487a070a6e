"""``download`` and ``convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..models import store
from .common import JsonOpt, ModelsDirOpt, console, err_console, handled, settings_from
from .base import app


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


@app.command()
@handled
def convert(
    model: Annotated[
        Optional[str], typer.Argument(help="Repo id, name under the models dir, or model folder.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="openvino, onnx or all.")] = "openvino",
    precision: Annotated[
        Optional[str], typer.Option("--precision", help="auto (build the candidates, measure, keep the fastest within the fidelity limits), fp32, int8, bf16, fp16 or int8-weights. \\[env: RERANKER_PRECISION]")
    ] = None,
    calibration: Annotated[
        Optional[Path], typer.Option("--calibration", help="JSONL of {query, passage} to calibrate INT8 on.")
    ] = None,
    eval_file: Annotated[
        Optional[Path], typer.Option("--eval", help='JSONL of {query, passages, grades?} to judge parity on (default: built-in).')
    ] = None,
    bench_seconds: Annotated[float, typer.Option("--bench-seconds", help="Micro-benchmark length (0: skip).")] = 3.0,
    list_: Annotated[bool, typer.Option("--list", help="List the converted variants and exit.")] = False,
    if_missing: Annotated[
        bool, typer.Option("--if-missing", help="Do nothing if this variant is converted from the downloaded commit.")
    ] = False,
    models_dir: ModelsDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert a model to OpenVINO IR / ONNX and prove it scores like the PyTorch original."""
    settings = settings_from(models_dir=models_dir, precision=precision)
    if list_:
        ref = store.resolve_model(settings, model)
        variants = store.list_variants(ref)
        if as_json:
            console.print_json(json.dumps(variants))
            return
        _variants_table(ref.name, variants)
        _auto_table(ref.path)
        return
    from ..models.convert import convert as do_convert

    if if_missing:
        ref = store.resolve_model(settings, model)
        fmts = ["openvino", "onnx"] if fmt == "all" else [fmt]
        if all(store.variant_is_current(ref, f, settings.precision) for f in fmts):
            console.print(f"already converted: {', '.join(f'{f}-{settings.precision}' for f in fmts)} of {ref.name}")
            return
    formats = ["openvino", "onnx"] if fmt == "all" else [fmt]
    with err_console.status("starting") as status:
        results = do_convert(
            settings,
            model,
            formats=formats,
            precision=settings.precision,
            calibration=calibration,
            eval_file=eval_file,
            bench_seconds=bench_seconds,
            step=lambda msg: status.update(msg),
        )
    if as_json:
        console.print_json(json.dumps(results))
        return
    if "auto" in results[0]:
        _auto_table(Path(results[0]["dir"]).parent)
        console.print(f"[green]installed[/] {results[0]['dir']} -> {results[0]['auto']['chosen']}")
        return
    _variants_table(results[0]["source"].get("repo_id") or model or settings.model, results)
    for r in results:
        console.print(f"[green]installed[/] {r['dir']}")


def _auto_table(model_dir: Path) -> None:
    """What `convert --precision auto` measured on this CPU, every candidate side by side, and its choice."""
    from ..models.auto import read_auto_choice

    record = read_auto_choice(model_dir)
    if not record:
        return
    table = Table(title=f"precision auto ({record.get('created_at', '')[:10]}, CPU: "
                        f"{', '.join(record.get('cpu_capabilities', []))}; eval set: {record.get('eval_set')})")
    for col in ("candidate", "status", "pairs/s", "× fp32", "top-1 agree", "mean Spearman", "NDCG@10 vs fp32 ref",
                "max |Δscore|"):
        table.add_column(col, no_wrap=True)
    for name, e in record.get("candidates", {}).items():
        passed = e.get("status") == "passed"
        table.add_row(
            ("[bold]" + name + " ✓[/]") if name == record.get("chosen") else name,
            e.get("status", "") if passed else f"{e.get('status')}: {e.get('reason', '')[:60]}",
            str(e.get("pairs_per_s", "—")),
            f"{e['speedup']:.2f}" if "speedup" in e else "—",
            f"{e['top1_agreement']:.0%}" if passed else "—",
            f"{e['mean_spearman']:.3f}" if passed else "—",
            f"{e['ndcg_vs_reference']:.3f}" if passed else "—",
            f"{e['max_abs_diff']:.1e}" if passed else "—",
        )
    console.print(table)
    console.print(f"chosen: [bold]{record.get('chosen')}[/] — {record.get('reason')}")


def _variants_table(name: str, variants: list[dict]) -> None:
    if not variants:
        console.print(f"{name}: nothing converted yet — run: rerankctl convert {name}")
        return
    table = Table(title=f"converted variants of {name}")
    for col in ("variant", "max |Δscore|", "mean Spearman", "top-1 agree", "pairs/s", "size MB", "created"):
        table.add_column(col, no_wrap=True)
    for v in variants:
        p = v.get("parity", {})
        b = v.get("bench", {})
        size = sum(f.get("size", 0) for f in v.get("files", [])) / 1e6
        table.add_row(
            f"{v['format']}-{v['precision']}",
            f"{p.get('max_abs_diff', float('nan')):.1e}",
            f"{p.get('mean_spearman', float('nan')):.3f}",
            f"{p.get('top1_agreement', float('nan')):.0%}",
            str(b.get("pairs_per_s", "—")),
            f"{size:.1f}",
            v.get("created_at", "")[:10],
        )
    console.print(table)
