"""Pure logic: settings precedence, request schemas, micro-batching, the CLI's help."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from reranker_ops.cli import app
from reranker_ops.config import Settings, SettingsError, load_settings
from reranker_ops.health.probe import CANARY, judge
from reranker_ops.serving.engine import plan_cost, plan_microbatches
from reranker_ops.serving.schema import Limits, RequestError, build_response, parse_job

pytestmark = pytest.mark.timeout(60)


# --- settings ---------------------------------------------------------------------------------------------
def test_settings_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k in list(os.environ):
        if k.startswith("RERANKER_"):
            monkeypatch.delenv(k)
    s = load_settings()
    assert (s.model, s.host, s.port, s.health_port) == ("DiTy/cross-encoder-russian-msmarco", "127.0.0.1", 8080, 8081)
    assert s.models_dir == tmp_path / "models"  # made absolute where it is read: recorded paths mean one place
    (tmp_path / ".env").write_text("RERANKER_PORT=9000\nRERANKER_WORKERS=2\n")
    assert load_settings().port == 9000
    monkeypatch.setenv("RERANKER_PORT", "9100")
    assert load_settings().port == 9100  # env beats .env
    assert load_settings(port=9200).port == 9200  # a given option beats env
    assert load_settings(port=None).port == 9100  # an option not given does not
    assert load_settings().workers == 2
    s = load_settings(run_dir=tmp_path / "r")
    assert s.lock_path.parent == s.pidfile_path.parent == tmp_path / "r"


def test_dotenv_lines_names_and_secrets(monkeypatch, tmp_path):
    """The .env forms people write (export, quotes, comments), names in any case, and a key that never
    shows in a repr or in what the pidfile records."""
    monkeypatch.chdir(tmp_path)
    for k in list(os.environ):
        if k.upper().startswith("RERANKER_"):
            monkeypatch.delenv(k)
    (tmp_path / ".env").write_text(
        "# settings\n\nexport RERANKER_PORT=9300\nRERANKER_HOST=\"10.0.0.1\"\nRERANKER_WORKERS=3  # three\n"
        "RERANKER_API_KEY='s3cret key'  # the key\nOTHER_TOOL=1\nRERANKER_PIN_THREADS=yes\n")
    monkeypatch.setenv("reranker_threads", "3")
    s = load_settings()
    assert (s.port, s.host, s.workers, s.threads, s.pin_threads) == (9300, "10.0.0.1", 3, 3, True)
    assert s.api_key.get_secret_value() == "s3cret key"
    assert "s3cret" not in repr(s) and "s3cret" not in json.dumps(s.as_json())
    assert "api_key" not in s.as_json(exclude=("api_key",))
    assert s.replace(workers=1).workers == 1 and s.replace(workers=1).port == 9300
    with pytest.raises(SettingsError):
        s.replace(precision="int4")  # a copy is checked like any settings


def test_every_bad_setting_is_reported_at_once(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as err:
        Settings(port=0, workers="many", precision="int4", pin_threads="maybe", request_timeout_s="0")
    assert [p.split(":")[0] for p in err.value.problems] == [
        "precision", "port", "workers", "pin_threads", "request_timeout_s"]  # in the order env.example lists them
    with pytest.raises(SettingsError) as err:
        Settings(port=8090, health_port=8090)
    assert err.value.problems == ["port and health_port are both 8090; give them different ports"]


def test_invalid_setting_is_one_line(monkeypatch):
    monkeypatch.setenv("RERANKER_PORT", "99999")
    res = subprocess.run([sys.executable, "-m", "reranker_ops", "status"], capture_output=True, text=True,
                         env=dict(os.environ), timeout=60)
    assert res.returncode != 0 and "invalid setting: port" in res.stderr and "Traceback" not in res.stderr


def test_threads_default_splits_cores():
    s = Settings(workers=2, threads=0)
    assert s.effective_threads() == max(1, (os.cpu_count() or 1) // 2)
    assert Settings(threads=3).effective_threads() == 3


# --- CLI ----------------------------------------------------------------------------------------------------
COMMANDS = ["download", "convert", "serve", "status", "stop", "logs", "watchdog", "bench", "compare",
            "systemd", "systemd print", "systemd install"]


@pytest.mark.parametrize("command", [""] + COMMANDS)
def test_help_of_every_command(command):
    res = CliRunner().invoke(app, [*command.split(), "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_shared_options_spelled_the_same():
    runner = CliRunner()
    for cmd in ("serve",):
        out = runner.invoke(app, [cmd, "--help"], terminal_width=200).output
        for opt in ("--model", "--models-dir", "--host", "--port", "--health-port", "--run-dir"):
            assert opt in out, (cmd, opt)
    assert "--models-dir" in runner.invoke(app, ["download", "--help"]).output
    assert "--run-dir" in runner.invoke(app, ["status", "--help"]).output


def test_debug_shows_traceback_only_when_asked():
    plain = subprocess.run([sys.executable, "-m", "reranker_ops", "download", "../x"], capture_output=True,
                           text=True, timeout=60)
    debug = subprocess.run([sys.executable, "-m", "reranker_ops", "--debug", "download", "../x"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 2
    assert "Traceback" in debug.stderr


# --- schemas ------------------------------------------------------------------------------------------------
LIM = Limits(max_documents=3, max_document_chars=10)


def test_rerank_parsing_and_aliases():
    job = parse_job("/rerank", json.dumps({"query": "q", "documents": ["a", "b"], "top_n": 1}).encode(), LIM)
    assert job.queries == ["q", "q"] and job.passages == ["a", "b"] and job.top_n == 1
    job = parse_job("/rerank", json.dumps({"query": "q", "documents": ["a"], "top_k": 2, "extra": 1}).encode(), LIM)
    assert job.top_n == 2  # unknown fields are ignored, top_k is an alias
    job = parse_job("/v1/rerank", json.dumps({"query": "q", "documents": [{"text": "a"}, "b"]}).encode(), LIM)
    assert job.passages == ["a", "b"]


@pytest.mark.parametrize("body,status,fragment", [
    (b"", 400, "empty body"),
    (b"\xff", 400, "UTF-8"),
    (b"{", 400, "malformed JSON"),
    (b"[" * 50000, 400, "nested too deeply"),
    (b'{"documents": ["a"]}', 422, "query is required"),
    (b'{"query": "q"}', 422, "documents is required"),
    (b'{"query": "q", "documents": ["a", "b", "c", "d"]}', 422, "RERANKER_MAX_DOCUMENTS"),
    (b'{"query": "q", "documents": ["aaaaaaaaaaaaaaa"]}', 422, "RERANKER_MAX_DOCUMENT_CHARS"),
    (b'{"query": "q", "documents": ["a"], "top_k": 1.5}', 422, "top_k must be an integer"),
    (b'{"query": "q", "documents": [" "]}', 422, "documents[0] must not be empty"),
])
def test_rerank_rejections(body, status, fragment):
    with pytest.raises(RequestError) as err:
        parse_job("/rerank", body, LIM)
    assert err.value.status == status and fragment in err.value.message


def test_inference_parsing():
    job = parse_job("/inference", b'[{"query": "q1", "passage": "p1"}, {"query": "q2", "passage": "p2"}]', LIM)
    assert job.queries == ["q1", "q2"] and job.passages == ["p1", "p2"]
    with pytest.raises(RequestError, match=r"\[1\]\.passage is required"):
        parse_job("/inference", b'[{"query": "q", "passage": "p"}, {"query": "q"}]', LIM)
    with pytest.raises(RequestError, match="must be a list"):
        parse_job("/inference", b'{"query": "q"}', LIM)


def test_responses_order_and_cut():
    job = parse_job("/rerank", b'{"query": "q", "documents": ["a", "b", "c"], "top_k": 2, "return_documents": true}', LIM)
    job.passages = ["a", "b", "c"]
    out = build_response(job, [0.0, 2.0, 2.0], tokens=9, model_name="m")
    assert [r["index"] for r in out["results"]] == [1, 2]  # ties keep input order
    assert out["results"][0]["document"] == "b" and len(out["scores"]) == 3
    assert judge(200, out) is not None  # three scores: not the canary's shape
    job = parse_job("/v2/rerank", b'{"query": "q", "documents": ["a", "b"]}', LIM)
    out = build_response(job, [-1.0, 1.0], tokens=4, model_name="m")
    assert out["results"][0] == {"index": 1, "relevance_score": pytest.approx(0.7310585786)}
    assert out["meta"]["api_version"]["version"] == "2"


def test_canary_judge():
    ok = {"scores": [0.9, 0.1], "results": [{"index": 0}, {"index": 1}]}
    assert judge(200, ok) is None
    assert "HTTP 500" in judge(500, "boom")
    assert judge(200, {"scores": [0.9, float("nan")], "results": ok["results"]})
    assert judge(200, {"scores": [1.5, 0.1], "results": ok["results"]})
    assert len(CANARY["documents"]) == 2
    # every start waits for it and every probe runs it: the smallest real rerank of two documents
    assert len(CANARY["query"]) + sum(len(d) for d in CANARY["documents"]) <= 24


# --- micro-batching -----------------------------------------------------------------------------------------
def test_microbatches_sorted_and_within_budget():
    lengths = [500, 10, 12, 300, 11, 9, 700, 20]
    batches = plan_microbatches(lengths, token_budget=1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(-(-lengths[i] // 8) * 8 for i in b)
        assert len(b) == 1 or width * len(b) <= 1024
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    assert plan_microbatches([2000], 512) == [[0]]  # a pair longer than the budget runs alone


def _cheapest_plan_by_brute_force(lengths, token_budget, attention_budget):
    """Every way to cut the sorted pairs into runs, each run within the budgets (or alone)."""
    import itertools

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = None
    for cuts in itertools.product((False, True), repeat=len(order) - 1):
        runs, run = [], [order[0]]
        for i, cut in zip(order[1:], cuts):
            if cut:
                runs.append(run)
                run = []
            run.append(i)
        runs.append(run)
        ok = all(len(r) == 1 or (len(r) * -(-max(lengths[i] for i in r) // 8) * 8 <= token_budget and
                                 len(r) * (-(-max(lengths[i] for i in r) // 8) * 8) ** 2 <= attention_budget)
                 for r in runs)
        if ok and (best is None or plan_cost(lengths, runs) < best):
            best = plan_cost(lengths, runs)
    return best


def test_microbatches_are_the_cheapest_plan():
    """Pairs of one-line length mixed with paragraph-long ones: filling every call to the budget pads the
    short ones to the long ones. The plan is the exact optimum of the cost model, checked by brute force."""
    import random

    rng = random.Random(3)
    for _ in range(40):
        lengths = [rng.choice((rng.randint(5, 40), rng.randint(100, 300))) for _ in range(rng.randint(1, 9))]
        plan = plan_microbatches(lengths, token_budget=1024, attention_budget=512 * 512)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        assert plan_cost(lengths, plan) == pytest.approx(_cheapest_plan_by_brute_force(lengths, 1024, 512 * 512))
    # one call would pad 9..12 to 300 tokens (4 x 300 = 1200 token-units); the plan runs them apart
    lengths = [9, 10, 11, 12, 300]
    assert sorted(map(sorted, plan_microbatches(lengths, token_budget=4096))) == [[0, 1, 2, 3], [4]]


def test_help_names_the_env_twins():
    out = CliRunner().invoke(app, ["serve", "--help"], terminal_width=240).output
    for var in ("RERANKER_MODEL", "RERANKER_PORT", "RERANKER_HEALTH_PORT", "RERANKER_RUN_DIR", "RERANKER_WORKERS"):
        assert var in out, var


def test_the_command_imports_without_collector_passes_and_leaves_the_collector_on():
    """`main` imports the app with the cyclic collector off and freezes what it imported (start-up time,
    see reranker_ops/startup.py); a command must still run with the collector on (a foreground `serve`
    runs for months), and a failing import must not leave it off."""
    code = ("import atexit, gc, sys\n"
            "from reranker_ops.cli import main\n"
            "atexit.register(lambda: print('enabled', gc.isenabled(), 'frozen', gc.get_freeze_count()))\n"
            "sys.argv = ['rerankctl', 'serve', '--help']\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    enabled, frozen = out.stdout.split()[-3], int(out.stdout.split()[-1])
    # ~48 000 objects since the settings no longer import pydantic (72 000 with it)
    assert enabled == "True" and frozen > 40_000, out.stdout[-200:]

    from reranker_ops.startup import frozen_imports

    with pytest.raises(ImportError):
        with frozen_imports():
            import reranker_ops_no_such_module  # noqa: F401
    assert gc.isenabled()
