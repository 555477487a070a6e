"""``serve``, ``status``, ``stop``, ``logs``, ``watchdog``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    HealthPortOpt,
    HostOpt,
    JsonOpt,
    ModelOpt,
    ModelsDirOpt,
    PortOpt,
    RunDirOpt,
    console,
    err_console,
    handled,
    settings_from,
)
from .base import app

WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-w", help="Inference workers. \\[env: RERANKER_WORKERS]")]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("--threads", help="OpenVINO threads per worker, 0 = cores/workers. \\[env: RERANKER_THREADS]")
]
ModelsOpt = Annotated[
    Optional[list[str]],
    typer.Option("--model", "-m", help="Repo id, name under the models dir, or model folder; again for several models"
                 " in one server (the first is the default; each may add ;workers=N;precision=P;aliases=a|b)."
                 " \\[env: RERANKER_MODEL, RERANKER_MODELS]"),
]
PrecisionOpt = Annotated[
    Optional[str], typer.Option("--precision", help="Which conversion to serve: auto (what convert --precision auto chose; fp32 until then), fp32, int8, bf16, fp16, int8-weights.")
]


class _JournalFormatter(logging.Formatter):
    """Lines for systemd's journal: a ``<priority>`` prefix it turns into the entry's level, no timestamp
    (the journal keeps its own)."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = self.PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def _setup_logging(log_file: Optional[Path], settings, to_stderr: bool = False) -> logging.Logger:
    """The rotated log file in the run dir, always (``rerankctl logs`` reads it); in the foreground also
    stderr, which systemd sends to the journal. RERANKER_LOG_FORMAT picks text or JSON lines; a line written
    while a request is handled carries its id either way (``observe.py``)."""
    from ..observe import LogFile, RequestContext, formatter

    log = logging.getLogger("rerankctl")
    log.setLevel(logging.DEBUG if settings.debug else logging.INFO)
    log.handlers.clear()
    plain = formatter(settings.log_format)
    context = RequestContext()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = LogFile(log_file, maxBytes=settings.log_max_bytes,
                                           backupCount=settings.log_backups, encoding="utf-8")
        handler.setFormatter(plain)
        handler.addFilter(context)
        log.addHandler(handler)
    if to_stderr or log_file is None:
        err = logging.StreamHandler(sys.stderr)
        journal = os.environ.get("JOURNAL_STREAM") and settings.log_format == "text"
        err.setFormatter(_JournalFormatter("%(levelname)s %(message)s") if journal else plain)
        err.addFilter(context)
        log.addHandler(err)
    log.propagate = False
    return log


@app.command()
@handled
def serve(
    model: ModelsOpt = None,
    models_dir: ModelsDirOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    health_port: HealthPortOpt = None,
    run_dir: RunDirOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    precision: PrecisionOpt = None,
    daemon: Annotated[bool, typer.Option("--daemon", "-d", help="Start in the background; return once healthy.")] = False,
    prepare: Annotated[
        bool, typer.Option("--prepare", help="Download and convert the model first if it is missing.")
    ] = False,
    log_file: Annotated[Optional[Path], typer.Option("--log-file", hidden=True)] = None,
) -> None:
    """Start the reranker server (foreground; --daemon for background). Stops cleanly on SIGTERM/Ctrl-C."""
    several = model is not None and len(model) > 1
    settings = settings_from(model=model[0].split(";")[0] if model else None,
                             models=",".join(model) if several else ("" if model else None), models_dir=models_dir, host=host, port=port, health_port=health_port,
                             run_dir=run_dir, workers=workers, threads=threads, precision=precision)
    _serve(settings, daemon=daemon, prepare=prepare, log_file=log_file)


def _serve(settings, *, daemon: bool, prepare: bool, log_file: Optional[Path] = None) -> None:
    from ..models.store import find_variant, resolve_model

    specs = settings.model_specs()
    if prepare:
        for i, spec in enumerate(specs):
            _prepare(settings.for_model(spec, first=i == 0))
    first = settings.for_model(specs[0], first=True)
    try:
        variant, ref_name = find_variant(first), resolve_model(first).name  # fails here, with the command to run
    except Exception as exc:
        if len(specs) == 1 or not _any_found(settings, specs):
            raise
        variant, ref_name = None, None  # the default model is down from the start; the others serve
        err_console.print(f"[yellow]warning:[/] {getattr(exc, 'message', exc)}: the other models serve without it",
                          soft_wrap=True)
    from ..startup import frozen_imports

    with frozen_imports():  # the supervisor's modules (aiohttp, psutil) live as long as it does
        from ..supervise.sdnotify import Notifier
        from ..supervise.supervisor import Supervisor

    if daemon:
        from ..control import start_daemon
        from ..addresses import url_host
        from .common import report_error

        def run_daemon(ready_fd: int) -> int:
            log = _setup_logging(settings.log_path, settings)
            sup = Supervisor(settings, variant, ref_name, Notifier(None, ready_fd=ready_fd), log)
            try:
                asyncio.run(sup.run())
                return 0
            except Exception as exc:  # noqa: BLE001 - reported in the boot log the caller reads
                return report_error(exc)

        started = start_daemon(
            settings, run_daemon, waiting=lambda: err_console.status("starting (waiting for a real rerank probe)")
        )
        for m in started.get("models", []):
            if m.get("state") == "down":
                err_console.print(f"[yellow]warning:[/] model {m['model']} is down: {m.get('reason')}", soft_wrap=True)
        console.print(
            f"[green]running[/] pid {started['pid']} · API http://{url_host(started['host'])}:{started['port']} · "
            f"health http://{url_host(started['host'])}:{started['health_port']}/health · log {started['log']}",
            soft_wrap=True,
        )
        return
    from ..supervise.rundir import ensure_private_dir

    ensure_private_dir(settings.run_dir)
    log = _setup_logging(log_file or settings.log_path, settings, to_stderr=True)
    sup = Supervisor(settings, variant, ref_name, Notifier(os.environ.get("NOTIFY_SOCKET")), log)
    if log_file is None:
        for slot in sup.slots:
            if slot.down is not None:
                err_console.print(f"[yellow]warning:[/] {slot.model_name} is down: {slot.down}", soft_wrap=True)
        shown = ", ".join(f"{sl.model_name} ({sl.precision if sl.settings.precision != 'auto' else 'auto: ' + sl.precision})"
                          for sl in sup.slots if sl.down is None)
        err_console.print(f"serving {shown} on http://{settings.host}:{settings.port}"
                          f" · health :{settings.health_port} · Ctrl-C to stop", soft_wrap=True)
    asyncio.run(sup.run())


def _any_found(settings, specs) -> bool:
    from ..models.store import find_variant

    for i, spec in enumerate(specs):
        try:
            find_variant(settings.for_model(spec, first=i == 0))
            return True
        except Exception:  # noqa: BLE001 - that one is down; another may be there
            continue
    return False


def prepare_steps(settings) -> list[list[str]]:
    """What is missing before serving: a download that is not complete (or not the pinned commit), a
    conversion that is not from the downloaded commit. Nothing asks the hub when nothing is missing."""
    from ..errors import ModelNotFound
    from ..models import store

    ref = store.resolve_model(settings)
    steps = []
    done = store.complete_download(ref.path)
    wants_revision = settings.revision and not (done and store.revision_matches(done, settings.revision))
    if ref.repo_id and (done is None or wants_revision):
        # into the folder serve uses, also when the model was given as a path
        models_dir = ref.path.parent if ref.path.name == store.local_name(ref.repo_id) else settings.models_dir
        steps.append(["download", ref.repo_id, "--models-dir", str(models_dir)]
                     + (["--revision", settings.revision] if settings.revision else []))
    elif not ref.repo_id and not ref.path.is_dir():
        raise ModelNotFound(f"no model at {ref.path}", "give a repo id or a model folder")
    # auto chooses among OpenVINO variants; ONNX is served in fp32
    precision = "fp32" if settings.precision == "auto" and settings.model_format != "openvino" else settings.precision
    if (precision == "auto" and not steps and not store.variant_is_current(ref, settings.model_format, "auto")
            and store.variant_is_current(ref, settings.model_format, "fp32") and not _can_convert()):
        # A serving-only install (an image, a unit) given a converted model: it cannot build candidates,
        # and serve --precision auto serves fp32 until a choice is made where the convert extra is.
        return steps
    if steps or not store.variant_is_current(ref, settings.model_format, precision):
        steps.append(["convert", str(ref.path), "--models-dir", str(ref.path.parent), "--precision",
                      precision, "--format", settings.model_format])
    return steps


def _can_convert() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "optimum", "nncf"))


def _prepare(settings) -> None:
    """Download and convert in child commands: torch (and its threads) never enter this process,
    which may fork into the daemon next."""
    import subprocess

    from ..errors import RerankerError

    for step in prepare_steps(settings):
        res = subprocess.run([sys.executable, "-m", "reranker_ops", *step])
        if res.returncode != 0:
            raise RerankerError(f"'rerankctl {step[0]}' failed (exit {res.returncode}); see its message above",
                                "fix that, then run the same command again")


@app.command()
@handled
def prepare(
    model: ModelOpt = None,
    models_dir: ModelsDirOpt = None,
    precision: PrecisionOpt = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Pin or upgrade to this revision.")] = None,
) -> None:
    """Download and convert what serve needs, only what is missing (a no-op, offline, when all is there)."""
    settings = settings_from(model=model, models_dir=models_dir, precision=precision, revision=revision)
    steps = prepare_steps(settings)
    if not steps:
        console.print(f"ready: {settings.model} ({settings.model_format}-{settings.precision}) is downloaded and"
                      " converted")
        return
    _prepare(settings)


@app.command()
@handled
def upgrade(
    revision: Annotated[str, typer.Option("--revision", help="Branch, tag or commit to move to.")],
    model: ModelOpt = None,
    models_dir: ModelsDirOpt = None,
    precision: PrecisionOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Move to another revision of the model: download it, convert it, and reload a running server."""
    from ..control import reload_server
    from ..supervise.rundir import lock_is_held

    settings = settings_from(model=model, models_dir=models_dir, precision=precision, revision=revision,
                             run_dir=run_dir)
    _prepare(settings)
    if lock_is_held(settings.lock_path):
        res = reload_server(settings, {k: v for k, v in {"model": _absolute_model(model),
                                                          "precision": precision}.items() if v})
        console.print(f"upgraded and reloaded: {res.get('reason')}", soft_wrap=True)
    else:
        console.print("upgraded; no server is running here (start one with: rerankctl serve --daemon)")


@app.command()
@handled
def reload(
    run_dir: RunDirOpt = None,
    model: ModelOpt = None,
    precision: PrecisionOpt = None,
    model_format: Annotated[Optional[str], typer.Option("--format", help="openvino or onnx.")] = None,
    models_dir: ModelsDirOpt = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Wait this long for the verdict (s).")] = None,
    models: Annotated[Optional[str], typer.Option("--models", help="Serve this list of models from now on"
                      " (RERANKER_MODELS' syntax): new and changed ones start beside the others, removed ones are"
                      " drained and stopped. \\[env: RERANKER_MODELS]")] = None,
) -> None:
    """Swap the running server to a new model or variant without dropping a request.

    A new MOSEC generation loads it and must answer the canary; then the gate switches to it and the old
    one is drained and stopped. If the new one fails, the old one keeps serving and this exits non-zero.
    With no option, the server reloads what its model and precision point to now (e.g. after convert); with
    several models, --model names the one to reload (the others are not touched), and without it each is
    reloaded in turn. When RERANKER_MODELS here differs from the server's, the server takes the new list.
    """
    from ..control import reload_server

    settings = settings_from(run_dir=run_dir, models_dir=models_dir)
    request = {k: v for k, v in {"model": _absolute_model(model), "precision": precision,
                                  "model_format": model_format, "models": models}.items() if v}
    if not request:
        # the list of models changed where the server reads its settings (/etc/rerankctl/env, a .env, the
        # environment systemd's ExecReload= gives): serve the new list
        from ..supervise.rundir import read_pidfile

        info, _ = read_pidfile(settings.pidfile_path)
        recorded = (info.data.get("settings") or {}) if info is not None else {}
        if settings.models and settings.models != recorded.get("models"):
            request = {"models": settings.models}
    res = reload_server(settings, request, timeout)
    from .statusview import _fmt_bytes

    pss = res.get("overlap_pss_bytes")
    console.print(f"reloaded: {res.get('reason')}" + (f" (both generations together: {_fmt_bytes(pss)} PSS)" if pss else ""),
                  soft_wrap=True)


@app.command()
@handled
def restart(
    model: ModelOpt = None,
    models_dir: ModelsDirOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    health_port: HealthPortOpt = None,
    run_dir: RunDirOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    precision: PrecisionOpt = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Drain deadline of the stop (s).")] = None,
) -> None:
    """Stop the running server (draining), then start it again in the background. To swap the model without
    a gap, use reload instead."""
    from ..errors import ConfigError
    from ..control import stop_server
    from ..supervise.rundir import read_pidfile

    settings = settings_from(run_dir=run_dir)
    info, _ = read_pidfile(settings.pidfile_path)
    if info is not None and info.data.get("under_systemd"):
        raise ConfigError("this server runs under systemd", "use: systemctl restart rerankctl")
    # the same server again: its recorded settings (never a secret: the API key comes from the environment),
    # with the options given here on top
    recorded = dict(info.data.get("settings") or {}) if info is not None else {}
    given = {k: v for k, v in dict(model=model, models_dir=models_dir, host=host, port=port, health_port=health_port,
                                   workers=workers, threads=threads, precision=precision).items() if v is not None}
    new = settings_from(**{**recorded, **given, "run_dir": settings.run_dir})
    if info is not None and info.data.get("api_key_required") and not new.api_key:
        # checked before anything is stopped: the running server stays as it is
        raise ConfigError("the running server requires an API key, and none is set here: restarting would bring it"
                          " back unauthenticated; nothing was stopped",
                          "set RERANKER_API_KEY (in the environment or a .env) as the server had it, then restart")
    res = stop_server(settings, timeout)
    if res["was_running"]:
        console.print(f"stopped: pid {res['pid']} in {res['seconds']}s")
    _serve(new, daemon=True, prepare=False)


def _absolute_model(model: Optional[str]) -> Optional[str]:
    """A model folder given relative to here means the same folder to the server, wherever it runs."""
    if model and Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    return model


@app.command()
@handled
def stop(
    run_dir: RunDirOpt = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Drain deadline before SIGKILL (s).")] = None,
) -> None:
    """Stop the server: drain in-flight requests, then make sure no process of it is left."""
    from ..control import stop_server

    settings = settings_from(run_dir=run_dir)
    res = stop_server(settings, timeout)
    if not res["was_running"]:
        extra = " (removed a stale pidfile)" if res["stale_pidfile"] else ""
        if res["killed_leftovers"]:
            extra += f"; killed leftover processes {res['killed_leftovers']}"
        console.print(f"not running{extra}")
        return
    how = "killed after the deadline" if res["forced"] else "stopped"
    console.print(f"{how}: pid {res['pid']} in {res['seconds']}s")


@app.command()
@handled
def status(run_dir: RunDirOpt = None, as_json: JsonOpt = False) -> None:
    """Show the server's state. Exit codes (LSB): 0 running and healthy, 1 dead but a pidfile is left,
    3 not running (stopped or failed), 4 unknown, 150 degraded (serving, not fully), 151 starting,
    restarting or stopping."""
    from ..control import collect_status, status_exit_code

    settings = settings_from(run_dir=run_dir)
    try:
        st = collect_status(settings)
    except Exception as exc:  # noqa: BLE001 - LSB: 4 is "status unknown"
        err_console.print(f"[bold red]error:[/] cannot tell: {type(exc).__name__}: {exc}")
        raise typer.Exit(4)
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        from .statusview import print_status

        print_status(st)
    raise typer.Exit(status_exit_code(st))


@app.command()
@handled
def logs(
    run_dir: RunDirOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines to show.")] = 50,
) -> None:
    """Show the daemon's log (rotated, so it cannot fill the disk)."""
    from ..control import tail_file

    settings = settings_from(run_dir=run_dir)
    path = settings.log_path
    if not path.exists():
        console.print(f"no log yet at {path} (the log is written by serve --daemon)")
        return
    for line in tail_file(path, lines):
        print(line)
    if not follow:
        return
    fh = open(path, "r", encoding="utf-8", errors="replace")
    fh.seek(0, os.SEEK_END)
    inode = os.fstat(fh.fileno()).st_ino
    try:
        while True:
            line = fh.readline()
            if line:
                print(line, end="", flush=True)
                continue
            time.sleep(0.25)
            try:
                if os.stat(path).st_ino != inode:  # rotated: follow the new file
                    fh.close()
                    fh = open(path, "r", encoding="utf-8", errors="replace")
                    inode = os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                pass
    finally:
        fh.close()


@app.command()
@handled
def watchdog(
    url: Annotated[Optional[str], typer.Option("--url", help="Base URL of the API (default: the configured one).")] = None,
    interval: Annotated[float, typer.Option("--interval", help="Probe every N seconds (0: once).")] = 0.0,
    count: Annotated[int, typer.Option("--count", help="Stop after N probes (0: forever, with --interval).")] = 0,
    failures: Annotated[int, typer.Option("--failures", help="Exit non-zero after N failures in a row.")] = 1,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Deadline of one probe (s).")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Probe a running server with a real rerank request; exit 0 if it answered correctly."""
    import httpx

    from ..supervise.canary import probe_sync

    settings = settings_from(host=host, port=port)
    from ..addresses import base_url

    base = url or base_url(settings.host, settings.port)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    deadline = timeout or settings.probe_timeout_s
    done = bad = 0
    # one client for every probe (a new one builds a TLS context each time); a fresh connection per probe,
    # as before, so a server restarted between probes is never met on a dead kept-alive connection
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while True:
            res = probe_sync(client, base, deadline, key)
            done += 1
            bad = 0 if res.ok else bad + 1
            if as_json:
                print(json.dumps(res.to_dict()), flush=True)
            else:
                lat = f"{res.latency_s * 1000:.0f} ms" if res.latency_s is not None else "—"
                console.print(f"{'[green]ok[/]' if res.ok else '[red]FAIL[/]'} {base} {lat}"
                              + ("" if res.ok else f" — {res.error}"))
            if bad >= failures:
                raise typer.Exit(1)
            if interval <= 0 or (count and done >= count):
                raise typer.Exit(0 if res.ok else 1)
            time.sleep(interval)
