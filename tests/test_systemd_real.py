"""The units under the real systemd (PID 1 in a podman container), installed the way the README tells an
operator: a venv under /opt, `rerankctl systemd install`, `systemctl enable --now`, a converted model in the
state directory. Skipped only where podman cannot run at all (the skip says why)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
import sdbox
from conftest import DOCS, QUERY, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]
RERANKCTL = "/opt/rerankctl/venv/bin/rerankctl"
STATE = "/var/lib/private/rerankctl"


@pytest.fixture(scope="module")
def box(tiny_fp32, tmp_path_factory):
    why = sdbox.why_not()
    if why:
        pytest.skip(why)
    image = sdbox.ensure_base_image()
    wheels = sdbox.build_wheels()
    b = sdbox.Box(image)
    try:
        b.install(wheels)
        model = tmp_path_factory.mktemp("sdmodel") / "tiny-model"
        shutil.copytree(tiny_fp32.parent, model, symlinks=True,
                        ignore=shutil.ignore_patterns("onnx-*", "*int8*", "*fp16*"))
        b.sh(f"mkdir -p -m 0700 /var/lib/private && mkdir -p {STATE}/models")
        b.copy_in(model, f"{STATE}/models/tiny-model")
        b.copy_in(sdbox.REPO / "tests" / "faults", "/opt/rerankctl/faults")
        b.port, b.health_port = free_port(), free_port()
        b.sh(f"{RERANKCTL} systemd install")
        b.sh("cat >> /etc/rerankctl/env <<'EOF'\n"
             "RERANKER_MODEL=/var/lib/rerankctl/models/tiny-model\n"
             f"RERANKER_PORT={b.port}\nRERANKER_HEALTH_PORT={b.health_port}\n"
             "RERANKER_PROBE_INTERVAL_S=1\nRERANKER_PROBE_TIMEOUT_S=3\n"
             "PYTHONPATH=/opt/rerankctl/faults\nRERANKER_TEST_HANG_FILE=/run/rerankctl/hang-now\n"
             "EOF")
        b.sh("systemctl daemon-reload")
        yield b
    finally:
        b.remove()


def base(box) -> str:
    return f"http://127.0.0.1:{box.port}"


def healthy(box) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{box.health_port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main_pid(box) -> int:
    return int(box.sh("systemctl show -p MainPID --value rerankctl").stdout.strip())


def test_ready_only_after_a_real_probe_and_the_tools_work_against_it(box):
    t0 = time.monotonic()
    box.sh("systemctl enable --now rerankctl-prepare rerankctl", timeout=300)  # returns once READY=1 came
    print(f"systemctl enable --now: {time.monotonic() - t0:.1f}s")
    assert box.sh("systemctl is-active rerankctl").stdout.strip() == "active"
    # READY=1 only after a real canary answered: the probe counter was already up when systemd saw it
    metrics = httpx.get(f"http://127.0.0.1:{box.health_port}/metrics").text
    assert 'reranker_probe_total{result="success"} 0' not in metrics
    journal = box.sh("journalctl -u rerankctl -o cat --no-pager").stdout
    assert journal.index("ready: first probe answered") < journal.index("Started rerankctl.service")
    assert "state starting -> running" in journal  # our log lines land in the journal
    # the hardened unit (SystemCallFilter, DynamicUser, ProtectSystem=strict) serves with OpenVINO
    r = httpx.post(base(box) + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 200 and len(r.json()["scores"]) == 3
    user = box.sh("ps -o user= -p $(systemctl show -p MainPID --value rerankctl)").stdout.strip()
    assert user not in ("root", "0")
    # rerankctl status and logs, as root, find the systemd-run server
    st = box.sh(f"{RERANKCTL} status --json", check=False)
    assert st.returncode == 0, st.stdout + st.stderr
    assert json.loads(st.stdout)["state"] == "running"
    logs = box.sh(f"{RERANKCTL} logs -n 100").stdout
    assert "state starting -> running" in logs


def test_systemctl_stop_drains_in_flight_and_leaves_no_process(box):
    box.sh("systemctl start rerankctl")
    wait_until(lambda: healthy(box), 60, 0.3, what="healthy")
    box.sh("touch /run/rerankctl/hang-now")  # the next scoring call hangs until hang-now.taken goes away
    answer: dict = {}

    def request() -> None:
        answer["r"] = httpx.post(base(box) + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60)

    t = threading.Thread(target=request)
    t.start()
    wait_until(lambda: box.sh("test -e /run/rerankctl/hang-now.taken", check=False).returncode == 0, 20, 0.2,
               what="a request in flight")
    stopping = threading.Thread(target=lambda: box.sh("systemctl stop rerankctl", timeout=120))
    stopping.start()
    wait_until(lambda: box.sh("systemctl is-active rerankctl", check=False).stdout.strip() == "deactivating",
               20, 0.1, what="stop under way")
    time.sleep(1.0)  # the request stays in flight a moment into the stop (a scenario, not a wait)
    box.sh("rm -f /run/rerankctl/hang-now.taken")
    t.join(timeout=60)
    stopping.join(timeout=120)
    assert answer["r"].status_code == 200  # drained: answered, not cut
    assert box.sh("systemctl is-active rerankctl", check=False).stdout.strip() == "inactive"
    assert box.sh("systemctl show -p Result --value rerankctl").stdout.strip() == "success"
    left = box.sh("ps -eo user,cmd | grep -E 'reranker_ops|mosec' | grep -v grep", check=False).stdout.strip()
    assert left == "", left


def test_the_watchdog_restarts_a_stopped_supervisor(box):
    # TimeoutStopSec=8: after the watchdog's SIGABRT and the final SIGKILL, systemd waits this long for the
    # cgroup to empty; in this container (cgroupfs) it is never told, so it waits all of it (40 s shipped)
    box.sh("mkdir -p /etc/systemd/system/rerankctl.service.d && printf '[Service]\\nWatchdogSec=6\\n"
           "TimeoutStopSec=8\\n' > /etc/systemd/system/rerankctl.service.d/watchdog.conf && systemctl daemon-reload")
    try:
        box.sh("systemctl start rerankctl")
        wait_until(lambda: healthy(box), 60, 0.3, what="healthy")
        before = main_pid(box)
        restarts = int(box.sh("systemctl show -p NRestarts --value rerankctl").stdout.strip())
        box.sh(f"kill -STOP {before}")
        wait_until(lambda: main_pid(box) not in (0, before), 60, 0.5, what="a new supervisor")
        wait_until(lambda: healthy(box), 60, 0.3, what="healthy again")
        assert int(box.sh("systemctl show -p NRestarts --value rerankctl").stdout.strip()) > restarts
        journal = box.sh("journalctl -u rerankctl -o cat --no-pager").stdout
        assert "Watchdog timeout" in journal, journal[-2000:]
        # the stopped supervisor's whole tree was reaped: only the new one's processes remain
        ppids = box.sh("ps -eo pid,ppid,cmd | grep 'reranker_ops.worker.app' | grep -v grep", check=False).stdout
        assert str(before) not in ppids
    finally:
        box.sh("rm -rf /etc/systemd/system/rerankctl.service.d && systemctl daemon-reload")


def test_reload_against_the_systemd_run_server(box):
    box.sh("systemctl start rerankctl")
    wait_until(lambda: healthy(box), 60, 0.3, what="healthy")
    res = box.sh(f"{RERANKCTL} reload", check=False, timeout=300)
    assert res.returncode == 0 and "reloaded" in res.stdout, res.stdout + res.stderr
    box.sh("systemctl kill -s HUP --kill-whom=main rerankctl")  # a reload with no control process
    wait_until(lambda: box.sh("journalctl -u rerankctl -o cat --no-pager").stdout.count("reload ok") >= 2, 60,
               0.5, what="the SIGHUP reload")
    assert httpx.post(base(box) + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30).status_code == 200
    # stop from the CLI works too (systemd sees a clean exit)
    assert box.sh(f"{RERANKCTL} stop", check=False).returncode == 0
    wait_until(lambda: box.sh("systemctl is-active rerankctl", check=False).stdout.strip() == "inactive", 30, 0.3)


def test_a_crash_loop_stops_at_the_start_limit(box):
    box.sh(f"cp -a {STATE}/models/tiny-model {STATE}/models/broken && "
           f"truncate -s 100 $(readlink -f {STATE}/models/broken/openvino-fp32)/openvino_model.bin")
    box.sh("mkdir -p /etc/systemd/system/rerankctl.service.d && printf '[Unit]\\nStartLimitBurst=3\\n"
           "StartLimitIntervalSec=300\\n[Service]\\nRestartSec=1\\nEnvironment=RERANKER_MODEL=/var/lib/rerankctl/"
           "models/broken\\n' > /etc/systemd/system/rerankctl.service.d/broken.conf && systemctl daemon-reload")
    # EnvironmentFile= wins over Environment=: point the env file at the broken model for this test
    box.sh("sed -i 's#^RERANKER_MODEL=.*#RERANKER_MODEL=/var/lib/rerankctl/models/broken#' /etc/rerankctl/env")
    try:
        box.sh("systemctl reset-failed rerankctl; systemctl start rerankctl", check=False, timeout=300)
        wait_until(lambda: "Start request repeated too quickly" in box.sh(
            "journalctl -u rerankctl -o cat --no-pager").stdout, 240, 1.0, what="start limit hit")
        assert box.sh("systemctl is-active rerankctl", check=False).stdout.strip() == "failed"
        assert int(box.sh("systemctl show -p NRestarts --value rerankctl").stdout.strip()) == 3
        journal = box.sh("journalctl -u rerankctl -o cat --no-pager").stdout
        assert "failed to start" in journal
        left = box.sh("ps -eo cmd | grep -E 'reranker_ops|mosec' | grep -v grep", check=False).stdout.strip()
        assert left == "", left
    finally:
        box.sh("sed -i 's#^RERANKER_MODEL=.*#RERANKER_MODEL=/var/lib/rerankctl/models/tiny-model#' /etc/rerankctl/env"
               " && rm -rf /etc/systemd/system/rerankctl.service.d && systemctl daemon-reload && "
               "systemctl reset-failed rerankctl", check=False)
