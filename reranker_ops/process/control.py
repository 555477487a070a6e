"""Start a supervisor in the background, stop one, and tell the truth about its state."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager, Optional

import psutil

from ..config import Settings
from ..errors import AlreadyRunning, ServerStartError, StopError
from .runstate import (
    identify,
    kill_instance,
    lock_is_held,
    read_pidfile,
    remove_pidfile_if_ours,
)

POLL = 0.05


def _http_ready(settings: Settings, timeout: float = 1.0) -> Optional[dict]:
    import httpx

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    try:
        r = httpx.get(f"http://{host}:{settings.health_port}/health", timeout=timeout)
        body = r.json()
        return body if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def tail_file(path: Path, lines: int = 20) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return data.splitlines()[-lines:]


def start_daemon(settings: Settings, run: Callable[[], int],
                 waiting: Optional[Callable[[], ContextManager]] = None) -> dict:
    """Fork ``run`` (the supervisor) into a new session; return once its first real probe succeeded, or raise.

    A fork, not a new interpreter: the supervisor starts with everything this process already imported,
    which takes a Python start-up off the time to healthy. Nothing here has started a thread yet.
    """
    if lock_is_held(settings.lock_path):
        info, _ = read_pidfile(settings.pidfile_path)
        where = f" (pid {info.pid}, port {info.data.get('port')})" if info else ""
        raise AlreadyRunning(f"a server is already running{where}", "see: rerankctl status; stop it with: rerankctl stop")
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    boot = settings.run_dir / f"boot-{os.getpid()}-{time.monotonic_ns()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.setsid()  # detached: its own session, survives this terminal
            out = os.open(boot, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.closerange(3, 4096)  # nothing of the caller's (pipes, sockets) stays open in the daemon
            os.environ.pop("NOTIFY_SOCKET", None)
            code = run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a daemon must report, then exit
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + settings.startup_timeout_s + 15
    try:
        with (waiting() if waiting else contextlib.nullcontext()):
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    raise _start_failure(settings, os.waitstatus_to_exitcode(status), boot)
                health = _http_ready(settings)
                if health is not None:
                    info, _ = read_pidfile(settings.pidfile_path)
                    if info is not None and info.pid == pid:
                        return {"pid": pid, "host": settings.host, "port": settings.port,
                                "health_port": settings.health_port, "model": health.get("model"),
                                "log": str(settings.log_path)}
                time.sleep(POLL)
            # Not healthy in time: stop it, leave nothing behind.
            os.kill(pid, signal.SIGTERM)
            t_end = time.monotonic() + settings.stop_timeout_s + 5
            while time.monotonic() < t_end and os.waitpid(pid, os.WNOHANG)[0] == 0:
                time.sleep(POLL)
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        raise ServerStartError(
            f"the server was not healthy within {settings.startup_timeout_s:g}s; it was stopped",
            "see the log: " + " | ".join(tail_file(settings.log_path, 3)),
        )
    finally:
        boot.unlink(missing_ok=True)


def _start_failure(settings: Settings, code: int, boot: Path):
    lines = [l for l in tail_file(boot, 40) if l.strip()]
    message = next((l.split("error:", 1)[1].strip() for l in reversed(lines) if "error:" in l), None)
    if code == AlreadyRunning.exit_code:
        return AlreadyRunning(message or "a server is already running", "see: rerankctl status")
    tail = tail_file(settings.log_path, 15)
    err = ServerStartError(
        message or f"the server exited with code {code}",
        "log tail:\n    " + "\n    ".join(tail[-10:] or lines[-10:]) if (tail or lines) else "see: rerankctl logs",
    )
    err.exit_code = code if code > 0 else err.exit_code
    return err


def stop_server(settings: Settings, timeout: Optional[float] = None) -> dict:
    """SIGTERM the supervisor (it drains, then kills MOSEC's group); SIGKILL everything past the deadline."""
    timeout = settings.stop_timeout_s if timeout is None else timeout
    info, why = read_pidfile(settings.pidfile_path)
    if not lock_is_held(settings.lock_path):
        killed: list[int] = []
        if info is not None:
            killed = kill_instance(info.instance)  # orphans of a dead supervisor, found by their mark
        if info is not None or why not in ("missing",):
            settings.pidfile_path.unlink(missing_ok=True)
            return {"was_running": False, "stale_pidfile": True, "killed_leftovers": killed}
        return {"was_running": False, "stale_pidfile": False, "killed_leftovers": []}
    # Running. The pidfile is written right after the lock is taken: give a starting server a moment.
    t_end = time.monotonic() + 5
    while info is None and time.monotonic() < t_end:
        time.sleep(POLL)
        info, why = read_pidfile(settings.pidfile_path)
    if info is None:
        raise StopError(f"a server holds {settings.lock_path} but its pidfile is {why}",
                        "find it with: fuser " + str(settings.lock_path))
    proc = identify(info.pid, info.create_time)
    if proc is None:
        raise StopError(f"pid {info.pid} in the pidfile is not the running server",
                        "find it with: fuser " + str(settings.lock_path))
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    forced = False
    try:
        proc.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        forced = True
        proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except psutil.TimeoutExpired:
            pass
    leftovers = kill_instance(info.instance)
    remove_pidfile_if_ours(settings.pidfile_path, info.pid)
    return {"was_running": True, "pid": info.pid, "forced": forced, "seconds": round(time.monotonic() - t0, 2),
            "killed_leftovers": leftovers}


def _read_state(settings: Settings) -> dict:
    try:
        return json.loads(settings.state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _process_rows(sup: psutil.Process, settings: Settings) -> list[dict]:
    from ..serving.heartbeat import read_worker_dir

    beats = read_worker_dir(settings.worker_dir)
    try:
        tree = [sup] + sup.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in tree:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.2)
    rows = []
    for p in tree:
        try:
            with p.oneshot():
                if p.pid == sup.pid:
                    role = "supervisor"
                elif p.pid in beats:
                    role = beats[p.pid].get("stage", "worker")
                elif p.ppid() == sup.pid:
                    # MOSEC's main process is the supervisor's only child. (Not by cmdline: a worker
                    # between fork and exec briefly shows its parent's.)
                    role = "mosec"
                elif os.path.basename(p.exe()) == "mosec":
                    role = "controller"
                else:
                    role = "helper"
                try:
                    pss = p.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    pss = None
                beat = beats.get(p.pid, {})
                rows.append({
                    "role": role,
                    "pid": p.pid,
                    "status": p.status(),
                    "rss_bytes": p.memory_info().rss,
                    "pss_bytes": pss,
                    "cpu_percent": p.cpu_percent(None),
                    "requests": beat.get("requests"),
                    "pairs": beat.get("pairs"),
                    "busy": beat.get("busy_since") is not None,
                })
        except psutil.Error:
            continue
    return rows


def collect_status(settings: Settings) -> dict:
    """The truth, from the kernel first (lock, process identity), then the supervisor's published state."""
    held = lock_is_held(settings.lock_path)
    info, why = read_pidfile(settings.pidfile_path)
    out: dict = {"run_dir": str(settings.run_dir), "healthy": False}
    if not held:
        last = _read_state(settings)
        if info is None and why == "missing":
            if last.get("state") == "failed":
                out.update(state="failed", reason=f"not running; the last server gave up: {last.get('reason')}")
            else:
                out.update(state="stopped", reason="not running")
        else:
            detail = f"pid {info.pid} is not a running rerankctl" if info else f"pidfile is {why}"
            out.update(state="stale", reason=f"stale pidfile ({detail}); serve will replace it",
                       pid=info.pid if info else None)
        return out
    proc = identify(info.pid, info.create_time) if info else None
    if info is None or proc is None:
        out.update(state="starting", reason="a server holds the lock; its pidfile is not written yet")
        return out
    state = _read_state(settings)
    if state.get("pid") != info.pid:
        state = {}
    out.update(
        state=state.get("state", "starting"),
        reason=state.get("reason", ""),
        pid=info.pid,
        uptime_s=round(time.time() - info.create_time, 1),
        address=f"http://{info.data.get('host')}:{info.data.get('port')}",
        health=f"http://{info.data.get('host')}:{info.data.get('health_port')}/health",
        model=info.data.get("model"),
        precision=info.data.get("precision"),
        version=info.data.get("version"),
        last_probe=state.get("last_probe"),
        restarts=state.get("restarts", {}),
        outages=state.get("outages", []),
        log=info.data.get("log"),
    )
    # Published state older than a few probe periods means the supervisor's loop is stuck: not healthy.
    age = time.time() - state.get("updated_at", 0)
    stale_after = 2 * settings.probe_interval_s + settings.probe_timeout_s + 5
    if out["state"] == "running" and age > stale_after:
        out.update(state="degraded", reason=f"supervisor has not published a probe for {age:.0f}s")
    out["healthy"] = out["state"] == "running" and bool(state.get("healthy"))
    if out["state"] == "running" and not out["healthy"]:
        out["state"] = "degraded"
    out["processes"] = _process_rows(proc, settings)
    pss = [r["pss_bytes"] for r in out["processes"] if r["pss_bytes"] is not None]
    out["total_pss_bytes"] = sum(pss) if pss else None
    return out
