"""The watchdog heals hung and dead workers; health never lies; sd_notify follows real probes."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import (
    DOCS,
    QUERY,
    Clients,
    clean_env,
    ended,
    free_port,
    proc_env,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

FAST = dict(probe_interval_s=1, probe_timeout_s=2, request_timeout_s=8, worker_hang_s=3, stop_timeout_s=10)


def score_workers(server) -> list[int]:
    return server.processes().get("score", [])


def restarts(server) -> dict:
    return server.status().get("restarts", {})


def test_sigstop_of_the_inference_worker_heals(make_server):
    server = make_server(**FAST)
    [victim] = score_workers(server)
    with Clients(server.base, FAST["request_timeout_s"]) as clients:
        wait_until(lambda: any(o == 200 for *_, o in clients.records), 30, what="traffic flowing")
        t_stop = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: restarts(server).get("worker", 0) >= 1, 15, 0.2, what="watchdog detection")
        detected = time.monotonic() - t_stop
        wait_until(lambda: clients.first_success_after(t_stop), 60, 0.2, what="answers resume")
        resumed = clients.first_success_after(t_stop) - t_stop
        wait_until(lambda: len([1 for t0, *_ in clients.records if t0 > t_stop + resumed]) >= 3, 30,
                   what="more answers after recovery")
    print(f"SIGSTOP: detected in {detected:.1f}s, answers resumed after {resumed:.1f}s")
    assert detected <= 15 and resumed <= 60
    # no client waited past the request deadline (plus transport slack)
    assert max(d for _, d, _ in clients.records) <= FAST["request_timeout_s"] + 2.5
    assert all(o in (200, 408, 503, 504) for *_, o in clients.records), {o for *_, o in clients.records}
    # the stopped process is gone, a new worker serves
    assert ended(victim)
    assert score_workers(server) and victim not in score_workers(server)
    st = server.status()
    assert st["healthy"] and st["outages"] and st["outages"][-1]["seconds"] is not None


def test_native_hang_in_forward_heals(make_server, tmp_path):
    hang = tmp_path / "hang-now"
    server = make_server(start=False, **FAST)
    server.inject_faults(hang=hang)
    server.start()
    [victim] = score_workers(server)
    hang.touch()
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(httpx.post, server.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
        from reranker_ops.protocol.heartbeat import read_heartbeat

        beat = server.run_dir / "workers" / f"score-{victim}.hb"
        wait_until(lambda: (read_heartbeat(beat) or {}).get("busy_since"), 10, what="worker inside forward")
        assert Path(str(hang) + ".taken").exists()  # that worker is hung until it is killed
        r = fut.result(timeout=30)
    # with one worker the kill ends MOSEC; the gate holds the request through the restart and, if the new
    # generation is up before the deadline, it is answered (200); never later than the deadline
    assert r.status_code in (200, 408, 503, 504)
    assert time.monotonic() - t0 <= FAST["request_timeout_s"] + 2.5
    wait_until(lambda: restarts(server).get("worker", 0) >= 1, 20, 0.2, what="hang detected")
    wait_until(lambda: httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS},
                                  timeout=10).status_code == 200, 60, 0.5, what="service restored")
    assert ended(victim)


@pytest.mark.parametrize("workers,keep_last", [(1, True), (2, True), (1, False)],
                         ids=["1-worker", "2-workers", "1-worker-mosec-unverified"])
def test_sigkill_of_a_worker_restores_service(make_server, workers, keep_last):
    server = make_server(start=False, workers=workers, **FAST)
    if not keep_last:  # a MOSEC version the last-worker respawn was not verified on: MOSEC's own Runtime
        server.inject_faults()
        server.env["RERANKER_TEST_UNVERIFIED_MOSEC"] = "1"
    server.start()
    before = score_workers(server)
    assert len(before) == workers
    with Clients(server.base, FAST["request_timeout_s"], n=2) as clients:
        wait_until(lambda: any(o == 200 for *_, o in clients.records), 30, what="traffic flowing")
        t_kill = time.monotonic()
        os.kill(before[0], signal.SIGKILL)
        wait_until(lambda: clients.first_success_after(t_kill + 0.5), 60, 0.2, what="service restored")
        wait_until(lambda: len(score_workers(server)) == workers and before[0] not in score_workers(server), 60, 0.2,
                   what="worker replaced")
    failed = [(t0, d, o) for t0, d, o in clients.records if t0 >= t_kill and o != 200]
    outage = (max(t0 + d for t0, d, _ in failed) - t_kill) if failed else 0.0
    # A canary that was in the killed worker's batch is lost with it (MOSEC sends nobody's work again): the
    # outage it opened closes at the next canary. Healthy again within a deadline, not at this very instant.
    wait_until(lambda: server.status().get("healthy"), 30, 0.2, what="healthy again")
    st = server.status()
    print(f"SIGKILL with {workers} worker(s), last-worker respawn {'on' if keep_last else 'off'}: client-side"
          f" outage {outage:.1f}s, {len(failed)} failed request(s), supervisor outages {st['outages']}")
    if keep_last:
        # MOSEC replaces the worker, the lone one too: no new generation, and no request lost (the envelope the
        # dead worker held is sent again)
        assert st["restarts"]["server"] == 0
        assert failed == [], failed
    else:
        # MOSEC's own rule: the lone worker's death ends MOSEC; the supervisor starts a new generation
        assert st["restarts"]["server"] >= 1
    if workers == 1:  # no worker could answer for a while: an outage, recorded and closed
        assert st["outages"] and st["outages"][-1]["seconds"] > 0
    assert all(o in (200, 408, 500, 503, 504) for *_, o in clients.records)


def _broken_model(tiny_fp32: Path, tmp_path: Path) -> Path:
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_fp32.parent, model, ignore=shutil.ignore_patterns("onnx-*", "openvino-int8*", "openvino-fp16"))
    weights = model / "openvino-fp32" / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    return model


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, token: str) -> list[float]:
        return [t for t, m in self.messages if token in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.mark.e2e
def test_a_model_that_crashes_at_every_start_makes_the_supervisor_give_up(tiny_fp32, tmp_path):
    model = _broken_model(tiny_fp32, tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    port, hport = free_port(), free_port()
    env = clean_env(RERANKER_MODEL=str(model), RERANKER_RUN_DIR=str(tmp_path / "run"), RERANKER_PORT=str(port),
                    RERANKER_HEALTH_PORT=str(hport), NOTIFY_SOCKET=str(notify.path), RERANKER_START_ATTEMPTS="2")
    try:
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "reranker_ops", "serve"], env=env, capture_output=True,
                             text=True, timeout=180)
        assert res.returncode != 0
        assert "failed to start 2 time(s)" in res.stderr, res.stderr[-2000:]
        assert time.monotonic() - t0 < 120
        assert not notify.times("READY=1") and not notify.times("WATCHDOG=1")
        # daemon mode: same verdict, the reason and the log tail printed, nothing left behind
        env.pop("NOTIFY_SOCKET")
        res = subprocess.run([sys.executable, "-m", "reranker_ops", "serve", "--daemon"], env=env,
                             capture_output=True, text=True, timeout=180)
        assert res.returncode != 0 and "failed to start" in res.stderr and "log tail" in res.stderr
        assert not (tmp_path / "run" / "rerankctl.pid.json").exists()
        leftovers = [p for p in psutil.process_iter() if proc_env(p).get("RERANKER_RUN_DIR") == str(tmp_path / "run")]
        assert leftovers == []
    finally:
        notify.close()


def test_restart_budget_is_bounded(make_server):
    """A server that dies after being healthy is restarted with backoff, and not forever."""
    server = make_server(restart_budget=2, restart_window_s=600, **FAST)
    for i in range(3):
        wait_until(lambda: server.status().get("healthy"), 60, 0.2, what=f"healthy before kill {i}")
        st = server.status()
        mosec = [p["pid"] for p in st["processes"] if p["role"] == "mosec"]
        if not mosec:
            break
        os.kill(mosec[0], signal.SIGKILL)
        if i < 2:
            wait_until(lambda: server.status()["restarts"]["server"] >= i + 1, 30, 0.2, what="restart counted")
    wait_until(lambda: server.status()["state"] == "failed", 60, 0.3, what="supervisor gave up")
    assert "gave up" in server.status()["reason"]
    assert server.cli("status").returncode != 0
    log = (server.run_dir / "rerankctl.log").read_text()
    assert "giving up: gave up: 2 restarts" in log


@pytest.mark.e2e
def test_sd_notify_contract(tiny_fp32, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    port, hport = free_port(), free_port()
    env = clean_env(RERANKER_MODEL=str(tiny_fp32.parent), RERANKER_RUN_DIR=str(tmp_path / "run"),
                    RERANKER_PORT=str(port), RERANKER_HEALTH_PORT=str(hport), NOTIFY_SOCKET=str(notify.path),
                    RERANKER_PROBE_INTERVAL_S="0.25", RERANKER_PROBE_TIMEOUT_S="1.5", RERANKER_WORKER_HANG_S="60",
                    RERANKER_PROBE_FAILURES="3")
    proc = subprocess.Popen([sys.executable, "-m", "reranker_ops", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: notify.times("READY=1"), 90, what="READY=1")
        [ready_at] = notify.times("READY=1")
        # READY comes with or after the first successful probe: the probe counter proves a real one ran
        metrics = httpx.get(f"http://127.0.0.1:{hport}/metrics").text
        assert 'reranker_probe_total{result="success"} ' in metrics
        assert not [t for t in notify.times("WATCHDOG=1") if t < ready_at]
        wait_until(lambda: len(notify.times("WATCHDOG=1")) >= 3, 10, what="watchdog pings")
        # SIGSTOP the scoring worker: pings stop until the watchdog has healed it
        st = json.loads(subprocess.run([sys.executable, "-m", "reranker_ops", "status", "--json"], env=env,
                                       capture_output=True, text=True, timeout=30).stdout)
        [victim] = [p["pid"] for p in st["processes"] if p["role"] == "score"]
        t_stop = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        before = [t for t in notify.times("WATCHDOG=1") if t <= t_stop]
        normal_gap = max(b - a for a, b in zip(before, before[1:]))

        def outage() -> tuple[float, float] | None:
            """When the unit's status went bad after the stop, and when it was 'running' again."""
            bad = [t for t, m in notify.messages if t >= t_stop and m.startswith("STATUS=degraded")]
            good = [t for t, m in notify.messages if bad and t > bad[0] and m == "STATUS=running"]
            return (bad[0], good[0]) if good else None

        def resumed() -> bool:
            window = outage()
            return window is not None and any(t > window[1] for t in notify.times("WATCHDOG=1"))

        wait_until(resumed, 60, 0.1, what="degraded, healed, and pings again")
        t_bad, t_good = outage()
        pings = notify.times("WATCHDOG=1")
        # a ping follows a successful probe only: with its one worker stopped, then replaced, no probe can
        # succeed, so no ping while the status said degraded or restarting (systemd sees the unit hang). The
        # probe that heals it pings a moment before the status says 'running' again.
        t_last_bad = max(t for t, m in notify.messages if t < t_good and m.startswith("STATUS=") and m != "STATUS=running")
        assert not [t for t in pings if t_bad < t <= t_last_bad], (t_bad, t_last_bad, pings)
        last_before = max(t for t in pings if t <= t_bad)
        first_after = min(t for t in pings if t >= t_good)
        # The watchdog kills a stopped worker at its next tick and MOSEC starts another: on a fast machine the
        # worker can be back before the next probe is due (0.5 s apart: seen once in four runs), and then no probe
        # failed and no ping was missed. A probe begun after the stop cannot succeed before the worker is back, so
        # once the stop lasted a whole cadence, one was begun in it and its ping is missing. Probes every 0.25 s
        # (the supervisor's tick) keep the cadence under the stops seen (0.32-0.6 s from SIGSTOP to 'running'):
        # at 0.5 s, gated on the status's outage alone, this line was never checked here.
        if t_good - t_stop >= normal_gap:
            assert first_after - last_before > normal_gap, (first_after - last_before, normal_gap, t_good - t_bad)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert notify.times("STOPPING=1")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        from conftest import kill_marked

        kill_marked(tmp_path / "run")
        notify.close()


def test_health_is_red_while_rerank_hangs(make_server, tmp_path):
    """infinity_emb's failure: health green while rerank hangs. Here health follows the canary.

    The watchdog is told not to act (huge thresholds), so the hang stays and health must show it.
    """
    hang = tmp_path / "hang-now"
    server = make_server(start=False, probe_interval_s=1, probe_timeout_s=2, worker_hang_s=600, probe_failures=100,
                         request_timeout_s=30)
    server.inject_faults(hang=hang)
    server.start()
    assert httpx.get(server.health + "/health").status_code == 200
    hang.touch()
    taken = Path(str(hang) + ".taken")
    try:
        wait_until(lambda: httpx.get(server.health + "/health").status_code == 503, 15, 0.2, what="health red")
        assert taken.exists()
        body = httpx.get(server.health + "/health").json()
        # 'degraded': it served before and a probe fails now (503 all the same)
        assert body["status"] == "degraded" and "probe" in body["reason"]
        assert httpx.get(server.health + "/ready").status_code == 503
        assert httpx.get(server.health + "/live").status_code == 200  # the supervisor itself is fine
        assert server.cli("status").returncode != 0
        assert server.status()["state"] == "degraded"
    finally:
        taken.unlink(missing_ok=True)
    wait_until(lambda: httpx.get(server.health + "/health").status_code == 200, 60, 0.2, what="health green again")


def test_watchdog_command(make_server):
    server = make_server()
    res = server.cli("watchdog", "--url", server.base)
    assert res.returncode == 0 and "ok" in res.stdout
    res = server.cli("watchdog", "--url", server.base, "--interval", "0.2", "--count", "3", "--json")
    assert res.returncode == 0 and len(res.stdout.strip().splitlines()) == 3
    res = server.cli("watchdog", "--url", server.base + "/nope", "--timeout", "1")
    assert res.returncode == 1 and "FAIL" in res.stdout
    port = free_port()
    res = server.cli("watchdog", "--url", f"http://127.0.0.1:{port}", "--timeout", "1")
    assert res.returncode == 1
