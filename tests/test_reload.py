"""Reload: a new generation is probed, switched to, the old one drained; variants are never replaced in place."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import DOCS, QUERY, Clients, wait_until

pytestmark = pytest.mark.timeout(600)


def convert_into(model: Path) -> Path:
    from reranker_ops.models.convert import convert
    from reranker_ops.settings import Settings

    [res] = convert(Settings(models_dir=model.parent, model=str(model)), str(model), formats=["openvino"],
                    precision="fp32", bench_seconds=0)
    return Path(res["dir"])


def scores(server) -> list[float]:
    r = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["scores"]


def in_process(variant: Path) -> list[float]:
    from reranker_ops.worker.engine import Scorer, sigmoid

    return sigmoid(Scorer(variant.resolve()).score(QUERY, DOCS)).tolist()


@pytest.fixture()
def own_model(tiny_model_dir, tiny_fp32, tmp_path) -> Path:
    """A model folder of this test's own, converted (its pointer and builds are this test's to change)."""
    model = tmp_path / "models" / "own-model"
    shutil.copytree(tiny_model_dir, model)
    convert_into(model)
    return model


def test_convert_under_a_running_server_changes_nothing_until_reload(make_server, own_model, tmp_path):
    from modelkit.synthetic import build_model

    server = make_server(model_dir=own_model, workers=2, request_timeout_s=20)
    before = scores(server)
    first_build = (own_model / "openvino-fp32").resolve()
    assert (own_model / "openvino-fp32").is_symlink() and first_build.parent.name == ".builds"
    # new weights (another seed), converted into the same variant name while the server runs
    other = build_model(tmp_path / "other", shape="tiny", seed=7)
    shutil.copy2(other / "model.safetensors", own_model / "model.safetensors")
    convert_into(own_model)
    second_build = (own_model / "openvino-fp32").resolve()
    assert second_build != first_build and first_build.is_dir()  # the running server's build is kept
    expected_new = in_process(second_build)
    assert not np.allclose(expected_new, before, atol=1e-4)  # the test can tell the two apart
    # kill a worker: its replacement must load what the server loaded, not the new pointer
    [victim, _] = server.processes()["score"]
    import os
    import signal

    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(server.processes().get("score", [])) == 2 and victim not in server.processes()["score"],
               30, 0.2, what="worker replaced")
    for _ in range(6):
        assert np.allclose(scores(server), before, atol=1e-6)
    # reload under steady load: no request fails, and afterwards the answers are the new build's
    with Clients(server.base, 20, n=8) as clients:
        wait_until(lambda: sum(1 for *_, o in clients.records if o == 200) >= 10, 30, what="traffic flowing")
        t0 = time.monotonic()
        res = server.cli("reload", timeout=180)
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stdout + res.stderr
        n = len(clients.records)
        wait_until(lambda: len(clients.records) >= n + 16, 30, what="traffic after the switch")
    print(f"reload under c=8 took {took:.1f}s: {res.stdout.strip()}")
    outcomes = {o for *_, o in clients.records}
    assert outcomes == {200}, outcomes
    assert np.allclose(scores(server), expected_new, atol=1e-5)
    st = server.status()
    assert st["healthy"]
    assert "PSS" in res.stdout  # memory of the overlap is reported


def broken_copy(own_model: Path, tmp_path: Path) -> Path:
    """A copy of the model whose converted weights are cut short: OpenVINO refuses to load them."""
    broken = tmp_path / "models" / "broken-model"
    shutil.copytree(own_model, broken, symlinks=True)
    weights = (broken / "openvino-fp32").resolve() / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    return broken


def test_reload_to_a_broken_variant_keeps_serving_the_old_one(make_server, own_model, tmp_path):
    broken = broken_copy(own_model, tmp_path)
    server = make_server(model_dir=own_model, workers=2, request_timeout_s=20)
    before = scores(server)
    with Clients(server.base, 20, n=8) as clients:
        wait_until(lambda: sum(1 for *_, o in clients.records if o == 200) >= 10, 30, what="traffic flowing")
        res = server.cli("reload", "--model", str(broken), timeout=180)
        n = len(clients.records)
        wait_until(lambda: len(clients.records) >= n + 16, 30, what="traffic after the failed reload")
    assert res.returncode != 0
    assert "reload failed" in res.stderr and "still serving" in res.stderr, res.stderr
    # the workers' own reason, at once: with two workers MOSEC restarts each dead one while the other lives,
    # and the reload used to wait out the whole boot deadline with a model that could never load
    assert "the score worker could not start" in res.stderr and "Incorrect weights" in res.stderr, res.stderr
    assert {o for *_, o in clients.records} == {200}
    assert np.allclose(scores(server), before, atol=1e-6)
    st = server.status()
    assert st["healthy"] and st["restarts"] == {"worker": 0, "server": 0}


def test_serve_with_a_model_that_cannot_load_fails_at_once_with_the_workers_reason(make_server, own_model, tmp_path):
    """The start's boot (the supervisor's main loop, not the reload's) fails on the workers' own reason too:
    with two workers MOSEC restarts each dead one while the other lives, and each of the start's attempts
    used to wait out its boot deadline."""
    server = make_server(start=False, model_dir=broken_copy(own_model, tmp_path), workers=2)  # boot deadline: 90 s
    t0 = time.monotonic()
    res = server.cli("serve", "--daemon", timeout=300)
    took = time.monotonic() - t0
    assert res.returncode != 0
    assert "the score worker could not start" in res.stderr and "Incorrect weights" in res.stderr, res.stderr
    assert took < 90, f"{took:.0f}s: the start waited for its boot deadline"  # two attempts would be >= 180 s
    assert server.cli("status").returncode != 0  # and nothing is left running


def test_sighup_alone_reloads_what_the_pointer_names(make_server, own_model):
    server = make_server(model_dir=own_model)
    res = server.cli("reload")
    assert res.returncode == 0, res.stderr
    assert scores(server)
    res = server.cli("reload", "--precision", "int8")
    assert res.returncode != 0 and "no openvino-int8 conversion" in res.stderr, res.stderr


def test_an_old_workers_death_during_the_drain_sends_its_work_to_the_new_generation(make_server):
    """A reload switches to the new generation and drains the old one. A request still on an old worker when
    that worker dies was waited for until its deadline (nothing noticed: the watchdog looked at the current
    generation only). Its heartbeat names its envelope, whichever generation it belongs to: the request goes
    out again, to the new generation, and is answered."""
    import concurrent.futures as cf
    import json
    import os
    import signal

    server = make_server(start=False, workers=2, request_timeout_s=40)
    server.inject_faults()
    server.env.update(RERANKER_TEST_SLOW_MARKER="slow-to-score", RERANKER_TEST_SLOW_S="6")
    server.start()
    old_workers = set(server.processes()["score"])
    with cf.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(httpx.post, server.base + "/rerank", timeout=60,
                           json={"query": QUERY, "documents": ["slow-to-score"]})
        from reranker_ops.protocol.heartbeat import read_worker_dir

        busy = wait_until(lambda: [pid for pid, b in read_worker_dir(server.run_dir / "workers").items()
                                   if pid in old_workers and b.get("busy_since")], 10, 0.05, what="an old worker busy")
        reload = pool.submit(server.cli, "reload", timeout=180)
        wait_until(lambda: json.loads((server.run_dir / "state.json").read_text())["mosec"]["generation"] == 2, 60,
                   0.1, what="the switch to generation 2")
        t_kill = time.monotonic()
        os.kill(busy[0], signal.SIGKILL)  # the old worker dies with the request, during the drain
        r = slow.result(timeout=60)
        took = time.monotonic() - t_kill
        assert reload.result().returncode == 0
    assert r.status_code == 200, r.text
    assert took < 30, took  # answered by the new generation (6 s of slow scoring), not at the 40 s deadline
