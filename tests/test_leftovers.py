"""Nothing a death leaves behind blocks the next start (issue 32), with real processes and a run dir kept between
runs, as systemd's RuntimeDirectoryPreserve, a container's volume or a user's ~/.local/state keep it.

The case that gave up on every later try: MOSEC's main process killed (the supervisor heals it: generation 2),
then every process of the server killed with SIGKILL (an OOM kill of the cgroup, a container runtime's kill),
then ``serve`` again: the dead server's IPC sockets made MOSEC's controller fail to bind (AddrInUse), twice, and
the start gave up. Here that sequence runs several times in one run dir, and every start is healthy."""

from __future__ import annotations

import json
import os
import signal
import socket

import httpx
import psutil
import pytest
from conftest import DOCS, QUERY, ended, wait_until

pytestmark = pytest.mark.timeout(600)

FAST = dict(probe_interval_s=1, probe_timeout_s=3, request_timeout_s=10, worker_hang_s=3, stop_timeout_s=10)


def server_tree(server) -> list[psutil.Process]:
    """The supervisor and every process under it."""
    sup = psutil.Process(server.pidfile()["pid"])
    return [sup, *sup.children(recursive=True)]


def kill_everything(server) -> None:
    """SIGKILL every process of the server at once, as the kernel's OOM killer does to a cgroup."""
    procs = server_tree(server)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    wait_until(lambda: all(ended(p.pid) for p in procs), 30, what="every process of the server dead")


def answers(server) -> bool:
    r = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    return r.status_code == 200 and len(r.json()["scores"]) == len(DOCS)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_start_after_kill_9_of_everything_is_healthy_again_and_again(make_server, workers):
    server = make_server(start=False, workers=workers, **FAST)
    for attempt in range(3):
        server.start()
        assert answers(server)
        [mosec] = server.processes()["mosec"]
        os.kill(mosec, signal.SIGKILL)  # healed: a new generation, with sockets of its own
        wait_until(lambda: server.status().get("restarts", {}).get("server", 0) >= 1, 30, 0.2,
                   what="MOSEC's main process replaced")
        wait_until(lambda: server.status().get("healthy"), 60, 0.2, what="healthy in the new generation")
        left = sorted(p.name for p in (server.run_dir / "mosec").iterdir())
        kill_everything(server)
        st = server.status()
        assert st["state"] == "stale", st  # what status says of a dead server before anything cleans up
        print(f"attempt {attempt + 1}: the dead server left {left} in mosec/")
    server.start()  # the fourth start in the same run dir
    assert answers(server) and server.status()["healthy"]


def test_a_stopped_worker_then_stop_then_serve_in_one_run_dir(make_server):
    """The ordinary sequence that hit the same wall: the watchdog kills a stopped worker, the server is
    stopped, and started again."""
    server = make_server(**FAST)
    [worker] = server.processes()["score"]
    os.kill(worker, signal.SIGSTOP)
    wait_until(lambda: server.status().get("restarts", {}).get("worker", 0) >= 1, 30, 0.2, what="watchdog kill")
    wait_until(lambda: server.status().get("healthy"), 60, 0.2, what="healthy again")
    assert server.cli("stop").returncode == 0
    server.start()
    assert answers(server)


def _bound_socket(path) -> None:
    """A Unix socket file as a killed process leaves it: bound, its process gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def test_every_kind_of_leftover_is_removed_before_anything_binds(make_server):
    """Every file a dead server could have left, each of the kinds the code writes, planted in the run dir of
    a server that never ran: the start is healthy, and none of them survives it."""
    server = make_server(start=False, **FAST)
    run = server.run_dir
    run.mkdir(mode=0o700)
    (run / "mosec").mkdir(mode=0o700)
    (run / "workers").mkdir(mode=0o700)
    planted = []
    # MOSEC's IPC sockets and config of earlier generations, in the old layout (g1, g2) and in today's
    # (<8 hex digits of the instance>.g<n>); a 12-digit tag of the release before is planted as a folder below
    for folder in ("g1", "g2", "01234567.g1"):
        _bound_socket(run / "mosec" / folder / "ipc_Score_1.socket")
        (run / "mosec" / folder / "config.json").write_text("{}")
        planted += [run / "mosec" / folder]
    (run / "mosec" / "0123456789ab.g1").mkdir()
    planted.append(run / "mosec" / "0123456789ab.g1")
    for name in ("mosec-config-1.json", "mosec/01234567.g1.json", "mosec/0123456789ab.g1.json"):
        (run / name).write_text(json.dumps({"secret": "0" * 32}))
        planted.append(run / name)
    # a worker's heartbeat and info of a pid that is not a worker of ours (this test's own)
    for suffix in (".hb", ".json"):
        (run / "workers" / f"score-{os.getpid()}{suffix}").write_bytes(b"\0" * 96 if suffix == ".hb" else b"{}")
        planted.append(run / "workers" / f"score-{os.getpid()}{suffix}")
    # requests for a supervisor that is gone, a state that says "running", writes cut short
    for name, data in (("stop-request.json", {"pid": os.getpid(), "drain_s": 0.1}),
                       ("reload-request.json", {"id": "stale", "model": "/nonexistent"}),
                       (".state.json.abc123", {}), (".rerankctl.pid.json.def456", {})):
        (run / name).write_text(json.dumps(data))
        planted.append(run / name)
    # a state that says "running" (the new server writes its own: it must not be this one)
    (run / "state.json").write_text(json.dumps({"state": "running", "pid": 1, "healthy": True}))
    # a stale pidfile naming a live process that is not a server (this test)
    (run / "rerankctl.pid.json").write_text(json.dumps({"pid": os.getpid(), "start_ticks": 1, "pgid": 1,
                                                        "instance": "0" * 32}))
    server.start()
    assert answers(server)
    survivors = [str(p.relative_to(run)) for p in planted if p.exists() or p.is_symlink()]
    assert survivors == [], survivors
    st = server.status()
    assert st["healthy"] and st["pid"] != os.getpid()
    assert server.pidfile()["pid"] == st["pid"]
    assert json.loads((run / "state.json").read_text())["pid"] == st["pid"]
    # the reload request planted before the start was never acted on
    assert (st.get("reload") or {}).get("id") != "stale"


def test_a_symlink_in_the_run_dir_is_removed_not_followed(make_server, tmp_path):
    """A leftover that is a symlink (to a folder the server must not empty) goes; what it points to stays."""
    server = make_server(start=False, **FAST)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "data").write_text("mine")
    server.run_dir.mkdir(mode=0o700)
    (server.run_dir / "mosec").symlink_to(keep)
    server.start()
    assert (keep / "data").read_text() == "mine"
    assert (server.run_dir / "mosec").is_dir() and not (server.run_dir / "mosec").is_symlink()
    assert answers(server)


def test_a_run_dir_too_long_for_a_unix_socket_is_one_clear_line(make_server, tmp_path):
    server = make_server(start=False, **FAST)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server.env["RERANKER_RUN_DIR"] = str(deep)
    server.run_dir = deep
    res = server.cli("serve", "--daemon", timeout=120)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert "too long a path for MOSEC's sockets" in res.stderr and "--run-dir" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert len(lines) <= 3, lines
    assert server.status()["state"] in ("stopped", "failed")
