"""`rerankctl serve`: every route's contract against a real server, bad input, concurrency, overload."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import MIXED_DOCS, clean_env, free_port, in_flight, run_cli, sample, wait_until

pytestmark = pytest.mark.timeout(240)

QUERY = "Как приготовить борщ?"
DOCS = MIXED_DOCS


def post(server, route: str, body, timeout: float = 30, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(server.base + route, content=body, timeout=timeout, **kw)
    return httpx.post(server.base + route, json=body, timeout=timeout, **kw)


def test_rerank_contract_and_reference_scores(shared_server, reference_scorer):
    r = post(shared_server, "/rerank", {"query": QUERY, "documents": DOCS, "top_k": 2, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = reference_scorer(QUERY, DOCS)
    np.testing.assert_allclose(body["scores"], expected, atol=1e-4)
    best = sorted(range(len(DOCS)), key=lambda i: -expected[i])[:2]
    assert [x["index"] for x in body["results"]] == best
    assert [x["document"] for x in body["results"]] == [DOCS[i] for i in best]
    assert all(0 <= s <= 1 for s in body["scores"])
    assert body["usage"]["total_tokens"] > 0 and body["model"]
    # top_n is a synonym, raw_scores gives logits, return_documents defaults to off
    r = post(shared_server, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 1, "raw_scores": True})
    body = r.json()
    assert len(body["results"]) == 1 and "document" not in body["results"][0]
    np.testing.assert_allclose(1 / (1 + np.exp(-np.array(body["scores"]))), expected, atol=1e-4)
    # no top_k: every document, best first
    body = post(shared_server, "/rerank", {"query": QUERY, "documents": DOCS}).json()
    assert len(body["results"]) == len(DOCS)
    assert [x["relevance_score"] for x in body["results"]] == sorted(body["scores"], reverse=True)


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_cohere_routes(shared_server, reference_scorer, route):
    docs = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    served = httpx.get(shared_server.base + "/info", timeout=10).json()["model_id"]  # another name is a 404
    r = post(shared_server, route, {"model": served, "query": QUERY, "documents": docs, "top_n": 2,
                                    "return_documents": True, "rank_fields": None})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = reference_scorer(QUERY, DOCS[:3])
    best = sorted(range(3), key=lambda i: -expected[i])[:2]
    assert [x["index"] for x in body["results"]] == best
    for x in body["results"]:
        assert x["relevance_score"] == pytest.approx(expected[x["index"]], abs=1e-4)
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert body["id"] and body["meta"]["api_version"]["version"] == route[2]


def test_inference_route(shared_server, reference_scorer):
    pairs = [{"query": QUERY, "passage": d} for d in DOCS] + [{"query": "погода", "passage": DOCS[1]}]
    r = post(shared_server, "/inference", pairs)
    assert r.status_code == 200, r.text
    got = r.json()
    expected = list(reference_scorer(QUERY, DOCS)) + list(reference_scorer("погода", [DOCS[1]]))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_long_passage_truncates_like_the_reference(shared_server, reference_scorer):
    long_doc = "Борщ варят долго и со вкусом. " * 400  # far past 512 tokens
    body = post(shared_server, "/rerank", {"query": QUERY, "documents": [long_doc, DOCS[1]]}).json()
    np.testing.assert_allclose(body["scores"], reference_scorer(QUERY, [long_doc, DOCS[1]]), atol=1e-4)
    r = post(shared_server, "/rerank", {"query": QUERY, "documents": [long_doc], "truncate": False})
    assert r.status_code == 422 and "512" in r.json()["message"]


def test_fifty_concurrent_clients(shared_server, reference_scorer):
    def one(i: int):
        docs = [f"{DOCS[i % 4]} вариант {i}", DOCS[(i + 1) % 4]]
        r = post(shared_server, "/rerank", {"query": f"{QUERY} {i}", "documents": docs}, timeout=60)
        return i, docs, r.status_code, r.json()

    with cf.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    for i, docs, status, body in results:
        assert status == 200, body
        np.testing.assert_allclose(body["scores"], reference_scorer(f"{QUERY} {i}", docs), atol=1e-4)


BAD_INPUTS = [
    ("malformed", b'{"query": "q", "documents": [', 400),
    ("truncated", b'{"query": "q", "docu', 400),
    ("not json", b"hello", 400),
    ("array body", b'["q"]', 422),
    ("query int", {"query": 5, "documents": ["a"]}, 422),
    ("query missing", {"documents": ["a"]}, 422),
    ("documents string", {"query": "q", "documents": "a"}, 422),
    ("documents null", {"query": "q", "documents": None}, 422),
    ("document int", {"query": "q", "documents": ["a", 3]}, 422),
    ("document object", {"query": "q", "documents": [{"text": "a"}]}, 422),
    ("top_k string", {"query": "q", "documents": ["a"], "top_k": "2"}, 422),
    ("top_k zero", {"query": "q", "documents": ["a"], "top_k": 0}, 422),
    ("top_k bool", {"query": "q", "documents": ["a"], "top_k": True}, 422),
    ("return_documents str", {"query": "q", "documents": ["a"], "return_documents": "yes"}, 422),
    ("raw_scores int", {"query": "q", "documents": ["a"], "raw_scores": 1}, 422),
    ("truncate str", {"query": "q", "documents": ["a"], "truncate": "no"}, 422),
    ("model int", {"query": "q", "documents": ["a"], "model": 1}, 422),
    ("empty query", {"query": "", "documents": ["a"]}, 422),
    ("blank query", {"query": "   ", "documents": ["a"]}, 422),
    ("empty documents", {"query": "q", "documents": []}, 422),
    ("empty string doc", {"query": "q", "documents": ["a", ""]}, 422),
    ("10000 documents", {"query": "q", "documents": ["d"] * 10_000}, 422),
    ("5 MB document", {"query": "q", "documents": ["я" * 2_500_000]}, 413),
    ("long document", {"query": "q", "documents": ["a" * 60_000]}, 422),
    ("invalid utf-8", b'{"query": "\xff\xfe", "documents": ["a"]}', 400),
    ("NUL in document", {"query": "q", "documents": ["a\u0000b"]}, 422),
    ("NUL in query", {"query": "q\u0000", "documents": ["a"]}, 422),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 400),
    ("nested object", ("{\"a\":" * 50_000 + "1" + "}" * 50_000).encode(), 400),
    ("empty body", b"", 400),
    ("whitespace body", b"   ", 400),
]


def test_bad_input_is_answered_4xx_quickly_and_valid_work_survives(shared_server, reference_scorer):
    before = shared_server.processes()
    good_docs = DOCS[:3]
    expected = reference_scorer(QUERY, good_docs)
    # Bodies are encoded and each thread's connection opened before any clock starts: what is timed is the
    # server's answer, not this process encoding 5 MB of JSON (or building HTTP clients) under its GIL.
    cases = [(name, body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode(), want)
             for name, body, want in BAD_INPUTS]
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=shared_server.base, timeout=30)
            local.client.get("/health")  # the connection is open before the first timed request
        return local.client

    def bad(case):
        name, body, want = case
        c = client()
        t0 = time.monotonic()
        r = c.post("/rerank", content=body, headers={"Content-Type": "application/json"}, timeout=10)
        return name, want, r.status_code, r.text, time.monotonic() - t0

    def good(_):
        r = client().post("/rerank", json={"query": QUERY, "documents": good_docs})
        return r.status_code, r.json()

    with cf.ThreadPoolExecutor(16) as pool:
        goods = [pool.submit(good, i) for i in range(8)]
        bads = list(pool.map(bad, cases))
        goods = [g.result() for g in goods]
    for name, want, status, text, seconds in bads:
        assert status == want, f"{name}: {status} {text[:200]}"
        assert seconds < 1.0, f"{name} took {seconds:.2f}s"
        body = json.loads(text)
        assert body["message"] and body["status"] == status, name
    for status, body in goods:
        assert status == 200
        np.testing.assert_allclose(body["scores"], expected, atol=1e-4)
    # the limit is named in the message
    r = post(shared_server, "/rerank", {"query": "q", "documents": ["d"] * 10_000})
    assert "RERANKER_MAX_DOCUMENTS" in r.json()["message"]
    r = post(shared_server, "/rerank", {"query": "q", "documents": ["я" * 2_500_000]})
    assert "RERANKER_MAX_BODY_BYTES" in r.json()["message"]
    # same workers: no bad request crashed or restarted anything
    assert shared_server.processes() == before
    assert shared_server.status()["restarts"] == {"worker": 0, "server": 0}


def test_wrong_method_and_unknown_route(shared_server):
    assert httpx.get(shared_server.base + "/rerank").status_code == 405
    assert httpx.post(shared_server.base + "/nope", json={}).status_code == 404
    info = httpx.get(shared_server.base + "/").json()
    assert "/rerank" in info["routes"]


def test_metrics(shared_server):
    post(shared_server, "/rerank", {"query": QUERY, "documents": DOCS})
    post(shared_server, "/rerank", {"query": "", "documents": DOCS})
    for url in (shared_server.base + "/metrics", shared_server.health + "/metrics"):
        text = httpx.get(url).text
        assert sample(text, "reranker_requests_total", route="/rerank", code="200") >= 1
        assert sample(text, "reranker_requests_total", route="/rerank", code="422") >= 1
        assert sample(text, "reranker_request_duration_seconds_bucket", route="/rerank", le="+Inf") >= 1
        assert re.search(r"^reranker_pairs_scored_total [1-9]", text, re.M)
        assert re.search(r"^reranker_tokens_scored_total [1-9]", text, re.M)
        assert "mosec_service_throughput" in text  # MOSEC's own metrics are included
        assert "reranker_up 1" in text


def test_a_scrape_right_after_an_answer_counts_its_envelope(shared_server):
    """The envelope counters are read from the workers' heartbeats at scrape time, as the pairs scored are: a
    scrape right after an answer counts that answer's envelope. They were read from the watchdog's view,
    refreshed every 0.25 s, so a scrape within a tick of the answer missed it (a test of the split request's
    envelopes failed on it in a clean-clone run of the suite)."""
    def counts() -> tuple[float, float, float]:
        text = httpx.get(shared_server.health + "/metrics", timeout=10).text
        return (sample(text, "reranker_batches_total"), sample(text, "reranker_batched_requests_total"),
                sample(text, "reranker_pairs_scored_total"))

    before = counts()
    for i in range(5):  # a tick may land between an answer and its scrape once; not five times in a row
        assert post(shared_server, "/rerank", {"query": f"{QUERY} {i}", "documents": DOCS}).status_code == 200
        after = counts()
        assert after[0] >= before[0] + 1 and after[1] >= before[1] + 1, (i, before, after)
        assert after[2] >= before[2] + len(DOCS), (i, before, after)
        before = after


def test_no_heavy_imports_in_server_processes(shared_server):
    procs = shared_server.status()["processes"]
    assert {p["role"] for p in procs} >= {"supervisor", "mosec", "controller", "score"}
    for p in procs:
        maps = Path(f"/proc/{p['pid']}/maps").read_text()
        for lib in ("libtorch", "/torch/", "/transformers/", "/optimum/"):
            assert lib not in maps, f"{p['role']} (pid {p['pid']}) loaded {lib}"
    for beat in (shared_server.run_dir / "workers").glob("*.json"):
        assert json.loads(beat.read_text())["heavy_modules"] == []


def test_mosec_main_process_does_not_hold_the_api_viewer_bundle(shared_server):
    """MOSEC's own writer of its API viewer pages keeps ~36 MiB of JavaScript in its main process for
    good (issue 14): that process stays near a bare interpreter with mosec and numpy imported."""
    mosec_main = next(p for p in shared_server.status()["processes"] if p["role"] == "mosec")
    assert mosec_main["pss_bytes"] < 48 * 2**20, mosec_main
    # nor does it import what MOSEC describes its routes with (mosec.openapi: defspec, msgspec, http.server,
    # ssl), 0.04 s on the way to every worker's fork; msgspec and ssl are native libraries, seen in its maps
    maps = Path(f"/proc/{mosec_main['pid']}/maps").read_text()
    assert "msgspec" not in maps and "/_ssl." not in maps


def test_each_workers_kernel_caches_get_the_setting(make_server):
    """RERANKER_KERNEL_CACHE reaches every score worker: the bound of the CPU plugin's shape cache and oneDNN's
    (what varied traffic adds to a worker's memory; tests/test_engine_memory.py, benchmarks/shapes.py)."""
    server = make_server(kernel_cache=48, workers=2)
    infos = [json.loads(p.read_text()) for p in (server.run_dir / "workers").glob("*.json")]
    assert len(infos) == 2, infos
    assert [(i["kernel_cache"], i["onednn_cache"]) for i in infos] == [(48, "48")] * 2, infos
    assert post(server, "/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200


def test_over_capacity_burst_gets_429_then_recovers(make_server):
    server = make_server(queue_capacity=2, max_batch_requests=1)
    heavy = {"query": QUERY, "documents": ["Борщ варят долго. " * 120] * 300}

    def one(_):
        t0 = time.monotonic()
        r = post(server, "/rerank", heavy, timeout=120)
        return r.status_code, time.monotonic() - t0, r.headers.get("Retry-After")

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    codes = [c for c, _, _ in results]
    assert codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}, codes
    assert all(ra == "1" for c, _, ra in results if c == 429)
    r = post(server, "/rerank", {"query": QUERY, "documents": DOCS})
    assert r.status_code == 200
    assert "429" in httpx.get(server.base + "/metrics").text


def test_api_key(make_server):
    server = make_server(api_key="s3cret-key", api_port_ops="key")
    body = {"query": QUERY, "documents": DOCS}
    assert post(server, "/rerank", body).status_code == 401
    assert post(server, "/rerank", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(server, "/rerank", body, headers={"Authorization": "s3cret-key"}).status_code == 401
    r = post(server, "/rerank", body, headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200
    # the watchdog's probe carries the key too, so health stays truthful
    assert httpx.get(server.health + "/health").json()["status"] == "healthy"
    # and the key is never on a command line
    for p in server.status()["processes"]:
        assert "s3cret-key" not in Path(f"/proc/{p['pid']}/cmdline").read_text()
    # api_port_ops=key: the operational routes on the API port need the key; the health port's do not
    for route in ("/health", "/ready", "/live", "/metrics"):
        r = httpx.get(server.base + route)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", (route, r.text)
        assert httpx.get(server.base + route, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert httpx.get(server.health + route).status_code == 200


def test_operational_routes_can_be_kept_off_the_api_port(make_server):
    server = make_server(api_port_ops="off")
    for route in ("/health", "/metrics"):
        for method in ("GET", "POST"):
            r = httpx.request(method, server.base + route)
            assert r.status_code == 404, (method, route, r.text)
            assert r.json()["error"] == "not_found" and str(server.health_port) in r.json()["message"]
        assert httpx.get(server.health + route).status_code == 200
    assert post(server, "/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200

def test_key_only_operational_routes_without_a_key_are_refused_in_one_line(tmp_path):
    res = run_cli(["serve", "--daemon"], env=clean_env(RERANKER_API_PORT_OPS="key", RERANKER_RUN_DIR=str(tmp_path)),
                  timeout=60)
    assert res.returncode != 0
    assert "RERANKER_API_KEY" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "rerankctl.pid.json").exists()


def foreground_server(tiny_fp32, run_dir, stdout=subprocess.PIPE) -> tuple[subprocess.Popen, int, int]:
    """``rerankctl serve`` in the foreground (its own session), healthy: the process and its two ports."""
    port, hport = free_port(), free_port()
    env = clean_env(RERANKER_MODEL=str(tiny_fp32.parent), RERANKER_RUN_DIR=str(run_dir),
                    RERANKER_PORT=str(port), RERANKER_HEALTH_PORT=str(hport))
    proc = subprocess.Popen([sys.executable, "-m", "reranker_ops", "serve"], env=env,
                            stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)

    def healthy():
        assert proc.poll() is None, "the foreground server exited"
        try:
            return httpx.get(f"http://127.0.0.1:{hport}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 90, what="foreground server healthy")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, port, hport


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_serve_stops_cleanly_on_signal(tiny_fp32, tmp_path, sig):
    proc, port, hport = foreground_server(tiny_fp32, tmp_path / "run")
    try:
        pid_info = json.loads((tmp_path / "run" / "rerankctl.pid.json").read_text())
        assert pid_info["pid"] == proc.pid
        # in-flight work finishes
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(httpx.post, f"http://127.0.0.1:{port}/rerank",
                                json={"query": QUERY, "documents": ["Борщ. " * 200] * 200}, timeout=60) for _ in range(4)]
            wait_until(lambda: in_flight(f"http://127.0.0.1:{hport}") >= 1, 30, 0.02, what="requests in flight")
            proc.send_signal(sig)
            codes = [f.result().status_code for f in futs]
        assert set(codes) <= {200, 503}, codes
        assert proc.wait(timeout=30) == 0
        from reranker_ops.supervise.procs import instance_processes

        assert instance_processes(pid_info["instance"]) == []
        assert not (tmp_path / "run" / "rerankctl.pid.json").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigabrt_prints_the_supervisors_stacks_and_leaves_nothing(tiny_fp32, tmp_path):
    """systemd's watchdog sends SIGABRT to a wedged supervisor: the journal (its stderr) must say where
    every thread was, and none of its processes may outlive it."""
    from reranker_ops.supervise.procs import instance_processes

    proc, _, _ = foreground_server(tiny_fp32, tmp_path / "run", stdout=subprocess.DEVNULL)
    try:
        instance = json.loads((tmp_path / "run" / "rerankctl.pid.json").read_text())["instance"]
        assert instance_processes(instance)
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGABRT
        text = err.decode("utf-8", "replace")
        # the main thread's stack down to the supervisor's event loop, and the other threads'
        assert "Fatal Python error: Aborted" in text and "Current thread 0x" in text, text[-2000:]
        assert 'reranker_ops/cli/server.py", line' in text and "in run_forever" in text, text[-2000:]
        wait_until(lambda: instance_processes(instance) == [], 30, what="no process of the server left")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_without_conversion_names_the_command(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "fresh-model"
    shutil.copytree(tiny_model_dir, model)
    res = subprocess.run([sys.executable, "-m", "reranker_ops", "serve", "--model", str(model),
                          "--run-dir", str(tmp_path / "run")], env=clean_env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
    assert "rerankctl convert" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "reranker_ops", "serve", "--model", "nobody/nothing",
                          "--models-dir", str(tmp_path)], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "rerankctl download nobody/nothing" in res.stderr


def test_serve_prepare_converts_then_serves(tiny_model_dir, tmp_path, make_server):
    import shutil

    model = tmp_path / "prep-model"
    shutil.copytree(tiny_model_dir, model)
    server = make_server(start=False, model_dir=model)
    res = server.cli("serve", "--daemon", "--prepare", timeout=400)
    assert res.returncode == 0, res.stderr
    # the README's first command: precision auto, so the candidates were built, judged and one chosen
    choice = json.loads((model / "auto-choice.json").read_text())
    # one of those that passed (bf16 among them on a CPU that has it), never one refused or unavailable
    assert choice["candidates"]["fp32"]["status"] == "passed"
    assert choice["candidates"][choice["chosen"]]["status"] == "passed", choice
    assert (model / "openvino-auto").resolve() == (model / f"openvino-{choice['chosen']}").resolve()
    served = Path(server.pidfile()["variant_dir"]).resolve()
    assert served == (model / "openvino-auto").resolve()
    assert post(server, "/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200
