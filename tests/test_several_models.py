"""Several models behind one endpoint, each supervised on its own (RERANKER_MODELS): real servers with two
real models, the tiny random one and the one trained here, each checked against its own reference scores.

Routing by ``model`` on every route; a hung worker of one model healed while the other's clients see nothing;
one model broken at start while the other serves (and ``status`` says which is down); a reload of one model
under load, and models added and removed by a reload of the list, with no failed request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import DOCS, QUERY, Clients, ServerHandle, ended, run_cli, sample, wait_until

pytestmark = [pytest.mark.timeout(420), pytest.mark.e2e]

FAST = dict(probe_interval_s=1, probe_timeout_s=2, request_timeout_s=8, worker_hang_s=3, stop_timeout_s=10)
TOL = 1e-3  # FP32 IR against transformers


@pytest.fixture(scope="module")
def trained_fp32(trained_model_dir, tmp_path_factory) -> Path:
    """The trained model converted to OpenVINO FP32 by the real convert code (parity checked)."""
    from reranker_ops.models.convert import convert
    from reranker_ops.settings import Settings

    work = tmp_path_factory.mktemp("trained-conv") / "trained"
    shutil.copytree(trained_model_dir, work)
    results = convert(Settings(models_dir=work.parent, model=str(work)), str(work), formats=["openvino"],
                      precision="fp32", bench_seconds=0.2)
    return Path(results[0]["dir"])


def reference(variant: Path):
    """sigmoid(logits) of the transformers model a variant was converted from."""
    from reranker_ops.models.reference import load_reference, model_max_length, reference_scores

    source = Path(json.loads((variant / "manifest.json").read_text())["source"]["path"])
    tok, model = load_reference(source)
    limit = model_max_length(tok, model)
    return lambda query, passages: [float(x) for x in reference_scores(tok, model, query, passages, limit)]


@pytest.fixture(scope="module")
def refs(tiny_fp32, trained_fp32):
    return {"tiny-model": reference(tiny_fp32), "trained": reference(trained_fp32)}


def two_models(tiny: Path, trained: Path, tiny_opts: str = "", trained_opts: str = "") -> str:
    return f"{tiny}{tiny_opts}, {trained}{trained_opts}"


def model_row(server, name: str) -> dict:
    return next(m for m in server.status()["models"] if m["model"] == name)


def score_workers(server, name: str) -> list[int]:
    """The pids of one model's score workers: the processes of its MOSEC tree that status calls score."""
    st = server.status()
    mosec = next(m for m in st["models"] if m["model"] == name)["mosec_pid"]
    tree = {p.pid for p in psutil.Process(mosec).children(recursive=True)}
    return [p["pid"] for p in st["processes"] if p["role"] == "score" and p["pid"] in tree]


def ranked(body: dict, n: int) -> list[float]:
    """A Cohere-shaped answer's scores, in input order."""
    out = [0.0] * n
    for r in body["results"]:
        out[r["index"]] = r["relevance_score"]
    return out


@pytest.fixture(scope="module")
def pair(tiny_fp32, trained_fp32, tmp_path_factory):
    """One server of both models for the read-only tests: the tiny one the default, each with an alias."""
    h = ServerHandle(tiny_fp32.parent, tmp_path_factory.mktemp("two-run"),
                     models=two_models(tiny_fp32.parent, trained_fp32.parent, ";aliases=tiny-alias",
                                       ";aliases=rerank-trained|trained-v2"))
    h.start()
    yield h
    h.cleanup()


def test_requests_are_routed_by_model_on_every_route(pair, refs):
    want = {name: ref(QUERY, DOCS) for name, ref in refs.items()}
    assert max(abs(a - b) for a, b in zip(want["tiny-model"], want["trained"])) > 0.01  # they can be told apart
    for name, said in (("tiny-model", "tiny-model"), ("tiny-model", "tiny-alias"), ("trained", "trained"),
                       ("trained", "rerank-trained"), ("trained", "trained-v2")):
        r = httpx.post(pair.base + "/rerank", json={"model": said, "query": QUERY, "documents": DOCS}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        assert r.json()["scores"] == pytest.approx(want[name], abs=TOL), (said, r.json())
        for route in ("/v1/rerank", "/v2/rerank"):
            r = httpx.post(pair.base + route, json={"model": said, "query": QUERY, "documents": DOCS, "top_n": 3},
                           timeout=30)
            assert r.status_code == 200, (route, r.text)
            assert ranked(r.json(), 3) == pytest.approx(want[name], abs=TOL), (route, said)
    # a request that names no model, and /inference (a list: no room for one), go to the default model
    r = httpx.post(pair.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    assert r.json()["scores"] == pytest.approx(want["tiny-model"], abs=TOL)
    r = httpx.post(pair.base + "/inference", json=[{"query": QUERY, "passage": d} for d in DOCS], timeout=30)
    assert r.json() == pytest.approx(want["tiny-model"], abs=TOL)
    # a large request (split into chunks by the gate) goes to the model it names, whole
    many = [f"{DOCS[i % 3]} {i}" for i in range(120)]
    r = httpx.post(pair.base + "/rerank", json={"model": "trained", "query": QUERY, "documents": many}, timeout=60)
    assert r.status_code == 200 and r.json()["scores"] == pytest.approx(refs["trained"](QUERY, many), abs=TOL)


def test_an_unknown_model_is_a_404_that_lists_the_served_names(pair):
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = httpx.post(pair.base + route, json={"model": "gpt-4", "query": QUERY, "documents": DOCS}, timeout=30)
        assert r.status_code == 404, (route, r.text)
        text = json.dumps(r.json())
        assert all(n in text for n in ("tiny-model", "tiny-alias", "trained", "rerank-trained")), text
    # a name that is not a string is the worker's to refuse, with its reason; a malformed body too
    r = httpx.post(pair.base + "/rerank", json={"model": 7, "query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 422
    r = httpx.post(pair.base + "/rerank", content=b'{"model": "trained", "query": ', timeout=30)
    assert r.status_code in (400, 422)
    # hostile: a huge name, a name that is not UTF-8, a name in a deep nest; each fails alone, nothing restarts
    r = httpx.post(pair.base + "/rerank", json={"model": "м" * 200_000, "query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 404 and len(r.content) < 2000
    r = httpx.post(pair.base + "/rerank", content=b'{"model": "\xff\xfe", "query": "q", "documents": ["d"]}',
                   timeout=30)
    assert 400 <= r.status_code < 500
    deep = b'{"model": "trained", "query": "q", "documents": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    assert 400 <= httpx.post(pair.base + "/rerank", content=deep, timeout=30).status_code < 500
    assert pair.status()["restarts"] == {"worker": 0, "server": 0}
    for name in ("tiny-model", "trained"):
        r = httpx.post(pair.base + "/rerank", json={"model": name, "query": QUERY, "documents": DOCS}, timeout=30)
        assert r.status_code == 200


def test_every_view_shows_each_model(pair):
    models = httpx.get(pair.base + "/v1/models", timeout=10).json()["data"]
    assert {m["id"] for m in models} >= {"tiny-model", "tiny-alias", "trained", "rerank-trained", "trained-v2"}
    info = httpx.get(pair.base + "/info", timeout=10).json()
    assert info["model_id"] == "tiny-model"
    assert [(m["model"], m["default"], m["precision"]) for m in info["rerankctl"]["models"]] == [
        ("tiny-model", True, "fp32"), ("trained", False, "fp32")]
    wait_until(lambda: httpx.get(pair.health + "/health", timeout=10).status_code == 200, 30, what="healthy")
    health = httpx.get(pair.health + "/health", timeout=10).json()
    assert {m["model"]: m["state"] for m in health["models"]} == {"tiny-model": "running", "trained": "running"}
    assert health["capacity"]["score"] == {"live": 2, "expected": 2}  # both models' workers
    ready = httpx.get(pair.health + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["models"] == {"tiny-model": True, "trained": True}
    text = httpx.get(pair.health + "/metrics", timeout=10).text
    for name in ("tiny-model", "trained"):
        assert sample(text, "reranker_model_up", model=name) == 1
        assert sample(text, "reranker_model_state", model=name, state="running") == 1
        assert sample(text, "reranker_model_workers", model=name, stage="score") == 1
        assert sample(text, "reranker_model_info", model=name, precision="fp32",
                      default="true" if name == "tiny-model" else "false") == 1
        assert sample(text, "reranker_model_memory_bytes", model=name) > 10 * 2**20
    st = pair.status()
    assert st["state"] == "running"
    assert [(m["model"], m["state"]) for m in st["models"]] == [("tiny-model", "running"), ("trained", "running")]
    assert all(m["pss_bytes"] and m["pss_bytes"] > 10 * 2**20 for m in st["models"])
    shown = pair.cli("status")
    assert "models" in shown.stdout and "trained" in shown.stdout and "tiny-model (default)" in shown.stdout


@pytest.mark.parametrize("victim_workers", [1, 2])
def test_a_hung_worker_of_one_model_is_healed_and_the_other_model_sees_nothing(make_server, tiny_fp32,
                                                                               trained_fp32, victim_workers):
    """SIGSTOP of one of the trained model's score workers, under load on both models: the watchdog kills it,
    MOSEC replaces it, and the tiny model's clients get every answer."""
    server = make_server(models=two_models(tiny_fp32.parent, trained_fp32.parent,
                                           trained_opts=f";workers={victim_workers}"), **FAST)
    other_before = model_row(server, "tiny-model")
    victim = score_workers(server, "trained")[0]
    with Clients(server.base, FAST["request_timeout_s"], n=2, model="tiny-model") as other, \
            Clients(server.base, FAST["request_timeout_s"], n=2, model="trained") as hit:
        wait_until(lambda: sum(1 for *_, o in other.records if o == 200) >= 5
                   and sum(1 for *_, o in hit.records if o == 200) >= 5, 60, what="traffic to both models")
        t0 = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: ended(victim), 15 + FAST["worker_hang_s"], what="the hung worker killed")
        wait_until(lambda: len(score_workers(server, "trained")) == victim_workers
                   and victim not in score_workers(server, "trained"), 60, 0.3, what="its replacement")
        wait_until(lambda: server.status()["state"] == "running", 60, 0.3, what="running again")
        healed = time.monotonic()
        wait_until(lambda: sum(1 for t, _, o in hit.records if o == 200 and t > healed) >= 5, 30,
                   what="the healed model answering")
    failed = [o for t, _, o in other.records if o != 200]
    assert failed == [], f"the other model's clients saw {failed}"
    assert sum(1 for t, _, o in other.records if t > t0) >= 5  # it was asked while the fault lasted
    assert "wrong answer" not in {o for *_, o in hit.records}
    assert max(d for *_, d, _ in hit.records) <= FAST["request_timeout_s"] + 2.5
    other_after, victim_row = model_row(server, "tiny-model"), model_row(server, "trained")
    assert other_after["generation"] == other_before["generation"]
    assert other_after["mosec_pid"] == other_before["mosec_pid"]  # the other model's MOSEC untouched
    assert other_after["restarts"] == {"worker": 0, "server": 0}
    assert victim_row["restarts"]["worker"] >= 1


def test_a_crash_of_one_models_mosec_is_that_models_restart_alone(make_server, tiny_fp32, trained_fp32):
    """kill -9 of the trained model's MOSEC main process under load: a new generation of it (its restart budget
    spent by one), the tiny model's MOSEC and clients untouched."""
    server = make_server(models=two_models(tiny_fp32.parent, trained_fp32.parent), **FAST)
    before = {m["model"]: m for m in server.status()["models"]}
    with Clients(server.base, FAST["request_timeout_s"], n=2, model="tiny-model") as other:
        wait_until(lambda: len(other.records) >= 5, 60, what="traffic")
        os.kill(before["trained"]["mosec_pid"], signal.SIGKILL)
        wait_until(lambda: model_row(server, "trained")["restarts"]["server"] == 1
                   and server.status()["state"] == "running", 90, 0.3, what="the trained model back")
        back = time.monotonic()
        wait_until(lambda: sum(1 for t, _, o in other.records if t > back) >= 5, 30, what="traffic after")
    assert [o for *_, o in other.records if o != 200] == []
    after = {m["model"]: m for m in server.status()["models"]}
    assert after["trained"]["generation"] != before["trained"]["generation"]
    assert after["tiny-model"]["mosec_pid"] == before["tiny-model"]["mosec_pid"]
    assert after["tiny-model"]["restarts"] == {"worker": 0, "server": 0}
    r = httpx.post(server.base + "/rerank", json={"model": "trained", "query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 200


def test_one_model_broken_at_start_the_other_serves_and_status_says_which(make_server, tiny_fp32, trained_fp32,
                                                                          tmp_path, refs):
    broken = tmp_path / "models" / "broken"
    shutil.copytree(trained_fp32.parent, broken)
    xml = broken / trained_fp32.name / "openvino_model.xml"
    good = xml.read_bytes()
    xml.write_bytes(b"<net>this is not a model</net>")
    missing = tmp_path / "models" / "nowhere"
    # the default (first) model's folder is missing: serve says so and starts the others
    server = make_server(models=f"{missing}, {tiny_fp32.parent}, {broken}", start_attempts=2, **FAST)
    st = server.status()
    assert st["state"] == "degraded", st
    rows = {m["model"]: m for m in st["models"]}
    assert rows["tiny-model"]["state"] == "running"
    assert rows["broken"]["state"] == "down" and rows["broken"]["reason"], rows["broken"]
    assert rows["nowhere"]["state"] == "down" and "nowhere" in rows["nowhere"]["reason"]
    assert "broken" in st["reason"] and "down" in st["reason"]
    r = httpx.post(server.base + "/rerank", json={"model": "tiny-model", "query": QUERY, "documents": DOCS},
                   timeout=30)
    assert r.json()["scores"] == pytest.approx(refs["tiny-model"](QUERY, DOCS), abs=TOL)
    r = httpx.post(server.base + "/rerank", json={"model": "broken", "query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 503 and "down" in r.json()["message"]
    r = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 503 and "default model" in r.json()["message"]  # names none: the default's, down
    assert httpx.get(server.base + "/info", timeout=10).json()["model_id"] == "nowhere"
    ready = httpx.get(server.health + "/ready", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["models"] == {"nowhere": False, "tiny-model": True, "broken": False}
    health = httpx.get(server.health + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    text = httpx.get(server.health + "/metrics", timeout=10).text
    assert sample(text, "reranker_model_up", model="broken") == 0
    assert sample(text, "reranker_model_state", model="broken", state="failed") == 1
    shown = server.cli("status")
    assert shown.returncode == 150 and "down" in shown.stdout
    # mended, the model comes back by a reload of that model alone
    xml.write_bytes(good)
    res = server.cli("reload", "--model", "broken", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    r = httpx.post(server.base + "/rerank", json={"model": "broken", "query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 200 and r.json()["scores"] == pytest.approx(refs["trained"](QUERY, DOCS), abs=TOL)
    assert model_row(server, "broken")["state"] in ("running", "degraded", "starting")


def test_reload_of_one_model_under_load_fails_no_request(make_server, tiny_fp32, trained_fp32):
    server = make_server(models=two_models(tiny_fp32.parent, trained_fp32.parent), **FAST)
    before = {m["model"]: m for m in server.status()["models"]}
    with Clients(server.base, FAST["request_timeout_s"], n=2, model="tiny-model") as a, \
            Clients(server.base, FAST["request_timeout_s"], n=2, model="trained") as b:
        wait_until(lambda: len(a.records) >= 5 and len(b.records) >= 5, 60, what="traffic to both models")
        res = server.cli("reload", "--model", "trained", timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        after_reload = time.monotonic()
        wait_until(lambda: sum(1 for t, _, o in b.records if t > after_reload and o == 200) >= 5, 30,
                   what="answers from the new generation")
    for name, clients in (("tiny-model", a), ("trained", b)):
        failed = [o for *_, o in clients.records if o != 200]
        assert failed == [], f"{name}: {failed}"
    after = {m["model"]: m for m in server.status()["models"]}
    assert after["trained"]["generation"] != before["trained"]["generation"]
    assert after["tiny-model"]["generation"] == before["tiny-model"]["generation"]  # not touched
    assert after["tiny-model"]["mosec_pid"] == before["tiny-model"]["mosec_pid"]
    # a name not served is refused, and says what is
    res = server.cli("reload", "--model", "gpt-4", timeout=60)
    assert res.returncode != 0 and "not served" in res.stdout + res.stderr
    # no model named: each model's generation is replaced, one after the other
    res = server.cli("reload", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    again = {m["model"]: m for m in server.status()["models"]}
    assert all(again[n]["generation"] != after[n]["generation"] for n in again), (after, again)


def test_models_are_added_and_removed_by_a_reload_of_the_list_under_load(make_server, tiny_fp32, trained_fp32,
                                                                          refs):
    server = make_server(**FAST)  # the tiny model alone
    with Clients(server.base, FAST["request_timeout_s"], n=2, model="tiny-model") as a:
        wait_until(lambda: len(a.records) >= 5, 60, what="traffic")
        res = server.cli("reload", "--models", two_models(tiny_fp32.parent, trained_fp32.parent), timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        r = httpx.post(server.base + "/rerank", json={"model": "trained", "query": QUERY, "documents": DOCS},
                       timeout=30)
        assert r.status_code == 200 and r.json()["scores"] == pytest.approx(refs["trained"](QUERY, DOCS), abs=TOL)
        assert [m["model"] for m in server.status()["models"]] == ["tiny-model", "trained"]
    assert [o for *_, o in a.records if o != 200] == []
    # the list changed where the server's settings come from (the environment, /etc/rerankctl/env): a plain
    # reload takes it, as systemd's ExecReload= would
    server.env["RERANKER_MODELS"] = f"{trained_fp32.parent}, {tiny_fp32.parent}"
    res = server.cli("reload", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [m["model"] for m in server.status()["models"]] == ["trained", "tiny-model"]  # the default moved
    r = httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
    assert r.json()["model"] == "trained"
    del server.env["RERANKER_MODELS"]
    with Clients(server.base, FAST["request_timeout_s"], n=2, model="trained") as b:
        wait_until(lambda: len(b.records) >= 5, 60, what="traffic")
        res = server.cli("reload", "--models", str(trained_fp32.parent), timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        stopped_at = time.monotonic()
        wait_until(lambda: sum(1 for t, _, o in b.records if t > stopped_at) >= 5, 30, what="traffic after")
    assert [o for *_, o in b.records if o != 200] == []
    assert [m["model"] for m in server.status()["models"]] == ["trained"]
    r = httpx.post(server.base + "/rerank", json={"model": "tiny-model", "query": QUERY, "documents": DOCS},
                   timeout=30)
    assert r.status_code == 404
    wait_until(lambda: len(server.processes().get("score", [])) == 1, 30, what="the removed model's MOSEC gone")
    assert json.loads((server.run_dir / "rerankctl.pid.json").read_text())["settings"]["model"] == str(
        trained_fp32.parent)
    # a list that cannot be served changes nothing
    res = server.cli("reload", "--models", f"{trained_fp32.parent};workers=zero", timeout=60)
    assert res.returncode != 0 and "workers" in res.stdout + res.stderr


def test_restart_after_kill_9_of_a_server_of_two_models(make_server, tiny_fp32, trained_fp32):
    """A hard death of everything leaves nothing that blocks the next start, with a folder of heartbeats per
    model."""
    server = make_server(models=two_models(tiny_fp32.parent, trained_fp32.parent), **FAST)
    pids = [server.pidfile()["pid"], *(p["pid"] for p in server.status()["processes"])]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: all(ended(p) for p in pids), 20, what="everything dead")
    assert any((server.run_dir / "workers").iterdir())  # what the dead server left
    res = server.cli("serve", "--daemon", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [(m["model"], m["state"]) for m in server.status()["models"]] == [("tiny-model", "running"),
                                                                            ("trained", "running")]


def test_serve_takes_the_model_option_again_for_several(tiny_fp32, trained_fp32, tmp_path):
    from conftest import clean_env, free_port

    run_dir = tmp_path / "run"
    env = clean_env(RERANKER_RUN_DIR=str(run_dir), RERANKER_PORT=str(free_port()),
                    RERANKER_HEALTH_PORT=str(free_port()))
    try:
        res = run_cli(["serve", "--daemon", "--model", str(tiny_fp32.parent), "--model",
                       f"{trained_fp32.parent};aliases=t2"], env=env, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        st = json.loads(run_cli(["status", "--json"], env=env, timeout=30).stdout)
        assert [(m["model"], m["aliases"]) for m in st["models"]] == [("tiny-model", []), ("trained", ["t2"])]
    finally:
        run_cli(["stop", "--timeout", "10"], env=env, timeout=60)
        from conftest import kill_marked

        kill_marked(run_dir)
