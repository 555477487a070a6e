"""A fleet in bad weather: three replicas behind Debian's nginx running deploy/nginx/rerankctl.conf as shipped,
clients throughout; one replica's whole tree killed with SIGKILL and left down, then deploy/rolling-restart.sh
over the other two. No request may fail: not the ones the dead replica held (nginx sends them on), and not
while the others restart one at a time (the script never takes the last ready one down, and waits out nginx's
fail_timeout before the next). The same with --reload."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import REPO, Clients, ServerHandle, clean_env, ended, free_port, kill_marked, wait_until
from nginxkit import Nginx, nginx_binary

pytestmark = [pytest.mark.timeout(420), pytest.mark.e2e]

SCRIPT = REPO / "deploy" / "rolling-restart.sh"


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _oks_since(clients: Clients, t: float) -> int:
    return sum(1 for t0, _, outcome in list(clients.records) if t0 >= t and outcome == 200)


@pytest.mark.parametrize("mode", ["restart", "reload"])
def test_a_rolling_restart_with_one_replica_already_down_fails_no_request(tiny_fp32, tmp_path, mode):
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's)")
    replicas = [ServerHandle(tiny_fp32.parent, tmp_path / f"r{i}", workers=1, probe_interval_s=1, stop_timeout_s=10)
                for i in range(3)]
    dead, others = replicas[0], replicas[1:]
    nginx = None
    try:
        for r in replicas:
            r.start()
        nginx = Nginx(tmp_path / "nginx", [r.port for r in replicas], free_port())
        wait_until(lambda: _answers(nginx.base), timeout=30, what="nginx answering")
        before = {id(r): r.pidfile()["pid"] for r in others}
        with Clients(nginx.base, deadline_s=30, n=6) as clients:
            start = time.monotonic()
            wait_until(lambda: _oks_since(clients, start) >= 20, timeout=60, what="load through nginx")
            # a replica dies hard, whole tree, and stays down
            pid = dead.pidfile()["pid"]
            killed_at = time.monotonic()
            kill_marked(dead.run_dir)
            wait_until(lambda: ended(pid), timeout=30, what="the killed replica gone")
            wait_until(lambda: _oks_since(clients, killed_at) >= 30, timeout=60, what="load with a replica down")
            env = clean_env(RERANKCTL=str(Path(sys.executable).parent / "rerankctl"),
                            PYTHONPATH=os.environ.get("PYTHONPATH", ""))
            args = [str(SCRIPT), *(["--reload"] if mode == "reload" else []),
                    *[f"{r.run_dir}:{r.health_port}" for r in others]]
            rolled_at = time.monotonic()
            res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stdout + res.stderr
            done_at = time.monotonic()
            wait_until(lambda: _oks_since(clients, done_at) >= 20, timeout=60, what="load after the rollout")
        outcomes = Counter(outcome for _, _, outcome in clients.records)
        during = sum(1 for t0, _, _ in clients.records if rolled_at <= t0 < done_at)
        assert during >= 20, "the clients must send throughout the rollout"
        assert set(outcomes) == {200}, (outcomes, nginx.error_log.read_text()[-3000:])
        # the rollout did what it says: new supervisors (restart) or a new model generation (reload)
        for r in others:
            pid_before = before[id(r)]
            if mode == "restart":
                assert r.pidfile()["pid"] != pid_before
            else:
                assert r.pidfile()["pid"] == pid_before and r.status()["reload"]["state"] == "ok"
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.cleanup()


def test_the_script_never_takes_down_the_last_ready_replica(tiny_fp32, tmp_path):
    """Two replicas listed, the other one dead: restarting this one would leave the balancer nothing."""
    alive, gone = (ServerHandle(tiny_fp32.parent, tmp_path / f"r{i}", workers=1) for i in range(2))
    try:
        alive.start()
        gone.start()
        pid = gone.pidfile()["pid"]
        kill_marked(gone.run_dir)
        wait_until(lambda: ended(pid), timeout=30, what="the killed replica gone")
        alive_pid = alive.pidfile()["pid"]
        env = clean_env(RERANKCTL=str(Path(sys.executable).parent / "rerankctl"),
                        PYTHONPATH=os.environ.get("PYTHONPATH", ""))
        res = subprocess.run([str(SCRIPT), f"{alive.run_dir}:{alive.health_port}", f"{gone.run_dir}:{gone.health_port}"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and "no other replica is ready" in res.stderr, res.stdout + res.stderr
        assert alive.pidfile()["pid"] == alive_pid and _answers(alive.base)  # untouched
    finally:
        alive.cleanup()
        gone.cleanup()


def test_the_manifests_rollout_never_goes_below_the_replicas_ready():
    import yaml

    spec = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]
    rolling = spec["strategy"]["rollingUpdate"]
    assert spec["strategy"]["type"] == "RollingUpdate" and rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    assert spec["minReadySeconds"] >= 5
