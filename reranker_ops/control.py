"""The CLI side of a running server: start a supervisor in the background, stop it, reload it, and tell the
truth about its state (from the kernel first: the lock and the process's identity; then what it published)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager, Optional

import psutil

from .settings import Settings
from .errors import AlreadyRunning, ServerStartError, StopError
from . import addresses
from .supervise import roles
from .supervise.procs import identify, kill_instance
from .supervise.rundir import RunLock, lock_holder, lock_is_held, read_pidfile, remove_pidfile_if_ours

POLL = 0.05


def _http_ready(settings: Settings, timeout: float = 1.0) -> Optional[dict]:
    """``/health``'s answer if it is 200, else None. Asked every POLL seconds while the model compiles on
    the same cores, so it must cost next to nothing: the standard library's client rather than httpx, which
    builds a TLS context for every ``httpx.get`` (hundreds of times the CPU of the call itself, a large share
    of a core at this rate, taken from the compile)."""
    host = addresses.connect_host(settings.host)
    conn = http.client.HTTPConnection(host, settings.health_port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        body = json.loads(r.read())
        if not isinstance(body, dict):
            return None
        return body if r.status == 200 or settled_without_some(body) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def settled_without_some(health: dict) -> bool:
    """A server of several models that serves, degraded only because a model is down (it could not load, or
    gave up): started, the state says which (``serve`` prints it); every other model runs."""
    models = health.get("models") or []
    return (health.get("status") == "degraded" and len(models) > 1
            and all(m.get("state") in ("running", "down") for m in models)
            and any(m.get("state") == "running" for m in models))


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


READY_FD = 3  # in the daemon: the write end of the pipe that says "ready" to the caller


def start_daemon(settings: Settings, run: Callable[[int], int],
                 waiting: Optional[Callable[[], ContextManager]] = None) -> dict:
    """Fork ``run`` (the supervisor) into a new session; return once its first real probe succeeded, or raise.

    A fork, not a new interpreter: the supervisor starts with everything this process already imported,
    which takes a Python start-up off the time to healthy. Nothing here has started a thread yet.

    ``run`` gets the write end of a pipe (``READY_FD``): the supervisor writes to it when it is ready, as it
    would tell systemd, and this process wakes at once rather than at its next look at ``/health``. The
    pipe only wakes it: ready means ``/health`` answers 200 and the pidfile names the daemon, checked as
    before. The pipe also ends when the daemon dies, which wakes this process to report it.
    """
    if lock_is_held(settings.lock_path):
        info, _ = read_pidfile(settings.pidfile_path)
        where = f" (pid {info.pid}, port {info.data.get('port')})" if info else ""
        raise AlreadyRunning(f"a server is already running{where}", "see: rerankctl status; stop it with: rerankctl stop")
    from .supervise.rundir import ensure_private_dir

    ensure_private_dir(settings.run_dir)
    # The daemon's stdout and stderr: kept (never deleted under it), truncated at each start.
    boot = settings.run_dir / "daemon.out"
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
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
            os.dup2(ready_w, READY_FD, inheritable=False)  # MOSEC's processes never get it
            os.closerange(READY_FD + 1, 4096)  # nothing of the caller's (pipes, sockets) stays open in the daemon
            os.environ.pop("NOTIFY_SOCKET", None)
            code = run(READY_FD)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a daemon must report, then exit
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(ready_w)
    deadline = time.monotonic() + settings.startup_timeout_s + 15
    with (waiting() if waiting else contextlib.nullcontext()):
        try:
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
                                "log": str(settings.log_path), "models": health.get("models") or []}
                if ready_r < 0:
                    time.sleep(POLL)
                elif select.select([ready_r], [], [], POLL)[0]:
                    os.close(ready_r)  # said once (ready, or the daemon ended): from here on, look every POLL
                    ready_r = -1
        finally:
            if ready_r >= 0:
                os.close(ready_r)
        # Not healthy in time: stop it, leave nothing behind.
        os.kill(pid, signal.SIGTERM)
        t_end = time.monotonic() + settings.stop_timeout_s + 5
        reaped = False  # a child is waited for once: a second waitpid raises ChildProcessError
        while time.monotonic() < t_end and not reaped:
            reaped = os.waitpid(pid, os.WNOHANG)[0] != 0
            if not reaped:
                time.sleep(POLL)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    raise ServerStartError(
        f"the server was not healthy within {settings.startup_timeout_s:g}s; it was stopped",
        "see the log: " + " | ".join(tail_file(settings.log_path, 3)),
    )


def _start_failure(settings: Settings, code: int, boot: Path):
    lines = [l for l in tail_file(boot, 40) if l.strip()]
    at = next((i for i in range(len(lines) - 1, -1, -1) if "error:" in lines[i]), None)
    message = lines[at].split("error:", 1)[1].strip() if at is not None else None
    # the daemon printed the error as every command does: its line, then "→ what to do next"
    hint = next((l.split("→", 1)[1].strip() for l in lines[at + 1:at + 2] if "→" in l), None) if at is not None else None
    if code == AlreadyRunning.exit_code:
        return AlreadyRunning(message or "a server is already running", hint or "see: rerankctl status")
    tail = tail_file(settings.log_path, 15)
    if hint is None or "rerankctl logs" in hint:  # a failure the log explains: its tail, here
        shown = tail[-10:] or lines[-10:]
        hint = (f"{hint + '; ' if hint else ''}log tail:\n    " + "\n    ".join(shown) if shown
                else hint or "see: rerankctl logs")
    err = ServerStartError(message or f"the server exited with code {code}", hint)
    err.exit_code = code if code > 0 else err.exit_code
    return err


def _wait_ended(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def _write_request(settings: Settings, name: str, data: dict) -> None:
    """A request for the supervisor, in its run dir, readable by it and private (0600). Root (an operator next
    to a systemd service's dynamic user) writes into a folder the service user owns, so no path is trusted:
    the run dir is opened without following a link, the file is made there by that handle (O_EXCL, never an
    existing file or link), handed to the run dir's owner with fchown while it is still only ours, and then
    renamed to its name within the same folder. A link the service user swaps in afterwards is never touched:
    nothing here uses the path again."""
    run_fd = os.open(settings.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = os.fstat(run_fd)
        tmp = f".{name}.{os.getpid()}.{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=run_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
                if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
                    os.fchown(fh.fileno(), owner.st_uid, owner.st_gid)
            os.replace(tmp, name, src_dir_fd=run_fd, dst_dir_fd=run_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=run_fd)
            except OSError:
                pass
            raise
    finally:
        os.close(run_fd)


def _the_server(settings: Settings, info, error: type) -> psutil.Process:
    """The process the pidfile names, only if it is the very one recorded (pid and start time in clock ticks)
    and it is the one holding the run lock: a pidfile is a file in a folder the service user may control,
    and root must never signal a process because a file said so. Else ``error``, in one line."""
    holder = lock_holder(settings.lock_path)
    proc = identify(info.pid, info.start_ticks)
    if proc is None:
        raise error(f"pid {info.pid} in the pidfile is not the running server",
                    "see: rerankctl status; find it with: fuser " + str(settings.lock_path))
    if holder != info.pid:
        who = "a process this user cannot see" if holder == 0 else f"pid {holder}"
        raise error(f"pid {info.pid} in the pidfile does not hold the run lock ({who} does); nothing was signalled",
                    "see: rerankctl status; find the server with: fuser " + str(settings.lock_path))
    return proc


def stop_server(settings: Settings, timeout: Optional[float] = None) -> dict:
    """SIGTERM the supervisor (it drains, then kills MOSEC's group); SIGKILL everything past the deadline."""
    timeout = settings.stop_timeout_s if timeout is None else timeout
    info, why = read_pidfile(settings.pidfile_path)
    if not lock_is_held(settings.lock_path):
        # Clean up a dead server's traces while holding the lock ourselves, so that a server starting at
        # this moment cannot have its fresh pidfile removed: it would fail to take the lock, or we would.
        if not settings.run_dir.is_dir():
            return {"was_running": False, "stale_pidfile": False, "killed_leftovers": []}
        lock = RunLock(settings.lock_path)
        if lock.acquire():
            try:
                info, why = read_pidfile(settings.pidfile_path)
                killed: list[int] = []
                if info is not None:
                    killed = kill_instance(info.instance)  # orphans of a dead supervisor, found by their mark
                if info is not None or why not in ("missing",):
                    settings.pidfile_path.unlink(missing_ok=True)
                    return {"was_running": False, "stale_pidfile": True, "killed_leftovers": killed}
                return {"was_running": False, "stale_pidfile": False, "killed_leftovers": []}
            finally:
                lock.release()
        info, why = read_pidfile(settings.pidfile_path)  # a server took the lock just now: stop that one
    # Running. The pidfile is written right after the lock is taken: give a starting server a moment.
    t_end = time.monotonic() + 5
    while info is None and time.monotonic() < t_end:
        time.sleep(POLL)
        info, why = read_pidfile(settings.pidfile_path)
    if info is None:
        raise StopError(f"a server holds {settings.lock_path} but its pidfile is {why}",
                        "find it with: fuser " + str(settings.lock_path))
    proc = _the_server(settings, info, StopError)
    t0 = time.monotonic()
    # the server's own drain follows this deadline (it reads the request when SIGTERM arrives), so a short
    # --timeout is a short drain, not a SIGKILL in the middle of one
    _write_request(settings, "stop-request.json", {"drain_s": timeout, "pid": info.pid})
    proc.send_signal(signal.SIGTERM)
    forced = False
    # the server aims at `timeout`; SIGKILL only if it cannot. Ended means gone or a zombie: its parent (not
    # us) may take a while to collect it, and a zombie holds nothing.
    if not _wait_ended(proc, timeout + 3):
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


def _age_s(pid: int) -> Optional[float]:
    """How long the process has run, from the kernel's clock ticks (immune to wall-clock steps)."""
    from .supervise.procs import start_ticks

    ticks = start_ticks(pid)
    try:
        with open("/proc/uptime", encoding="ascii") as fh:
            up = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None if ticks is None else round(up - ticks / os.sysconf("SC_CLK_TCK"), 1)


def _read_state(settings: Settings) -> dict:
    try:
        return json.loads(settings.state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _process_rows(sup: psutil.Process, settings: Settings) -> list[dict]:
    from .protocol.heartbeat import read_worker_dir

    beats = read_worker_dir(settings.worker_dir)
    for sub in (settings.worker_dir.iterdir() if settings.worker_dir.is_dir() else ()):
        if sub.is_dir() and not sub.is_symlink():  # each model's workers, in a server of several
            beats.update(read_worker_dir(sub))
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
                # MOSEC's main process is the supervisor's direct child. (Not by cmdline: a worker
                # between fork and exec briefly shows its parent's.)
                mosec_pid = p.pid if p.pid != sup.pid and p.ppid() == sup.pid else None
                role = roles.role_of(p, supervisor_pid=sup.pid, mosec_pid=mosec_pid, beats=beats)
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
        from .supervise.rundir import registered_servers

        elsewhere = [r for r in registered_servers() if r.get("run_dir") != str(settings.run_dir)]
        if elsewhere:
            out["elsewhere"] = elsewhere
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
    proc = identify(info.pid, info.start_ticks) if info else None
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
        uptime_s=_age_s(info.pid),
        address=f"http://{addresses.url_host(str(info.data.get('host')))}:{info.data.get('port')}",
        health=f"http://{addresses.url_host(str(info.data.get('host')))}:{info.data.get('health_port')}/health",
        model=info.data.get("model"),
        precision=info.data.get("precision"),
        version=info.data.get("version"),
        last_probe=state.get("last_probe"),
        restarts=state.get("restarts", {}),
        worker_deaths=state.get("worker_deaths", 0),
        outages=state.get("outages", []),
        log=info.data.get("log"),
    )
    # Published state older than a few probe periods means the supervisor's loop is stuck: not healthy.
    # Both stamps are CLOCK_MONOTONIC (shared by the processes of a machine): a clock step changes nothing.
    age = time.monotonic() - state.get("updated_mono", 0)
    stale_after = 2 * settings.probe_interval_s + settings.probe_timeout_s + 5
    if out["state"] == "running" and age > stale_after:
        out.update(state="degraded", reason=f"supervisor has not published a probe for {age:.0f}s")
    out["healthy"] = out["state"] == "running" and bool(state.get("healthy"))
    if out["state"] == "running" and not out["healthy"]:
        out["state"] = "degraded"
    out["capacity"] = state.get("capacity")
    out["reload"] = state.get("reload")
    out["processes"] = _process_rows(proc, settings)
    pss = [r["pss_bytes"] for r in out["processes"] if r["pss_bytes"] is not None]
    out["total_pss_bytes"] = sum(pss) if pss else None
    out["models"] = [{**m, "pss_bytes": _tree_pss(m.get("mosec_pid"), out["processes"])}
                     for m in state.get("models") or []]
    return out


def _tree_pss(mosec_pid: Optional[int], rows: list[dict]) -> Optional[int]:
    """PSS of one model's MOSEC tree (its main process and every descendant), from the process rows."""
    if not mosec_pid:
        return None
    try:
        pids = {mosec_pid, *(p.pid for p in psutil.Process(mosec_pid).children(recursive=True))}
    except psutil.Error:
        return None
    found = [r["pss_bytes"] for r in rows if r["pid"] in pids and r["pss_bytes"] is not None]
    return sum(found) if found else None


def reload_server(settings: Settings, request: dict, timeout: Optional[float] = None) -> dict:
    """Ask the running supervisor to reload (SIGHUP + a request file) and wait for its verdict."""
    import uuid

    from .errors import ReloadError

    info, why = read_pidfile(settings.pidfile_path)
    if not lock_is_held(settings.lock_path) or info is None:
        raise ReloadError("no server is running", "start one with: rerankctl serve --daemon")
    proc = _the_server(settings, info, ReloadError)
    rid = uuid.uuid4().hex
    _write_request(settings, "reload-request.json", {"id": rid, **request})
    proc.send_signal(signal.SIGHUP)
    limit = timeout if timeout is not None else settings.startup_timeout_s + settings.request_timeout_s + 30
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        st = _read_state(settings).get("reload") or {}
        if st.get("id") == rid and st.get("state") in ("ok", "failed", "refused"):
            if st["state"] != "ok":
                raise ReloadError(f"reload {st['state']}: {st.get('reason')}", "see: rerankctl logs")
            return st
        if not proc.is_running():
            raise ReloadError("the server stopped during the reload", "see: rerankctl logs")
        time.sleep(POLL)
    raise ReloadError(f"no verdict on the reload within {limit:g}s", "see: rerankctl status; rerankctl logs")


# LSB init-script status codes (0 running, 1 dead with a pidfile, 3 not running, 4 unknown), and two of the
# range LSB leaves to applications for the states in between.
EXIT_CODES = {"running": 0, "stale": 1, "stopped": 3, "failed": 3, "degraded": 150, "starting": 151,
              "restarting": 151, "stopping": 151}


def status_exit_code(st: dict) -> int:
    if st.get("state") == "running" and not st.get("healthy"):
        return EXIT_CODES["degraded"]
    return EXIT_CODES.get(str(st.get("state")), 4)
