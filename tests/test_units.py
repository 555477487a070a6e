"""Pure logic: settings precedence, request schemas, micro-batching, watchdog policy, run state, sd_notify."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from reranker_ops.cli import app
from reranker_ops.config import Settings, load_settings
from reranker_ops.health.probe import CANARY, judge
from reranker_ops.health.watchdog import WatchdogPolicy, WorkerView
from reranker_ops.process.runstate import RunLock, identify, lock_is_held, read_pidfile, write_pidfile
from reranker_ops.process.sdnotify import Notifier
from reranker_ops.serving.engine import plan_microbatches
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
    assert s.models_dir.as_posix() == "models"
    (tmp_path / ".env").write_text("RERANKER_PORT=9000\nRERANKER_WORKERS=2\n")
    assert load_settings().port == 9000
    monkeypatch.setenv("RERANKER_PORT", "9100")
    assert load_settings().port == 9100  # env beats .env
    assert load_settings(port=9200).port == 9200  # a given option beats env
    assert load_settings(port=None).port == 9100  # an option not given does not
    assert load_settings().workers == 2
    s = load_settings(run_dir=tmp_path / "r")
    assert s.lock_path.parent == s.pidfile_path.parent == tmp_path / "r"


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


# --- watchdog policy (a fake clock: times are plain numbers) -------------------------------------------------
def policy(**kw) -> WatchdogPolicy:
    return WatchdogPolicy(failures_needed=2, hang_after_s=10, restart_budget=3, restart_window_s=100, **kw)


def test_policy_does_nothing_while_probes_pass():
    p = policy()
    p.record_probe(True, 0)
    assert p.decide(0, [WorkerView(1, "score", "stopped")]).action == "none"


def test_policy_kills_a_stopped_worker_at_the_first_failure():
    p = policy()
    p.record_probe(False, 100)
    d = p.decide(100, [WorkerView(1, "score", "stopped"), WorkerView(2, "validate", "sleeping")])
    assert d.action == "kill_workers" and d.pids == [1]


def test_policy_kills_a_worker_without_progress_inside_forward():
    p = policy()
    p.record_probe(False, 100)
    busy = WorkerView(7, "score", "running", busy_since=80, progress_at=85)
    assert p.decide(100, [busy]).action == "kill_workers"
    fresh = WorkerView(7, "score", "running", busy_since=80, progress_at=95)
    assert p.decide(100, [fresh]).action == "none"  # progressing: busy, not hung


def test_policy_restarts_a_wedged_server_but_not_an_overloaded_one():
    p = policy()
    p.record_probe(False, 100)
    idle = [WorkerView(1, "score", "sleeping", None, 50)]
    assert p.decide(100, idle).action == "none"  # one failure is not enough
    p.record_probe(False, 105)
    assert p.decide(105, idle).action == "restart"
    progressing = [WorkerView(1, "score", "running", 101, 104)]
    d = p.decide(105, progressing)
    assert d.action == "none" and "overloaded" in d.reason
    p.record_probe(True, 110)
    assert p.consecutive_failures == 0


def test_policy_restart_budget_and_backoff():
    p = policy()
    assert [p.allow_restart(t) for t in (0, 1, 2)] == [True, True, True]
    assert p.backoff() == 4.0
    assert p.allow_restart(3) is False  # budget spent inside the window
    assert p.allow_restart(101) is True  # the oldest fell out of the window


# --- run state ----------------------------------------------------------------------------------------------
def test_lock_is_exclusive_and_freed_on_death(tmp_path):
    path = tmp_path / "x.lock"
    code = "import fcntl,os,sys,time; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT); fcntl.flock(fd,fcntl.LOCK_EX); print('ok',flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert lock_is_held(path)
        assert RunLock(path).acquire() is False
    finally:
        holder.kill()
        holder.wait()
    assert not lock_is_held(path)  # the kernel freed it: it can never go stale
    lock = RunLock(path)
    assert lock.acquire()
    lock.release()


def test_pidfile_identity(tmp_path):
    import psutil

    me = psutil.Process()
    path = tmp_path / "p.json"
    write_pidfile(path, {"pid": me.pid, "create_time": me.create_time(), "pgid": os.getpgid(0), "instance": "i"})
    info, why = read_pidfile(path)
    assert why is None and identify(info.pid, info.create_time) is not None
    assert identify(info.pid, info.create_time - 5) is None  # same pid, other start: a recycled pid
    for content, reason in (("", "empty"), ("{not json", "garbage"), ('{"pid": 1}', "garbage")):
        path.write_text(content)
        assert read_pidfile(path) == (None, reason)
    assert read_pidfile(tmp_path / "none.json") == (None, "missing")


# --- sd_notify ----------------------------------------------------------------------------------------------
def test_sd_notify_datagrams(tmp_path):
    addr = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(addr))
    sock.settimeout(2)
    try:
        n = Notifier(str(addr))
        assert n.ready("serving") and sock.recv(100) == b"READY=1\nSTATUS=serving"
        assert n.watchdog() and sock.recv(100) == b"WATCHDOG=1"
        assert n.stopping() and sock.recv(100).startswith(b"STOPPING=1")
    finally:
        sock.close()
    assert Notifier(None).ready("x") is False  # silent outside systemd
    assert Notifier(str(tmp_path / "gone.sock")).watchdog() is False  # never raises


# --- heartbeats ---------------------------------------------------------------------------------------------
def test_heartbeat_record_roundtrip_and_torn_reads(tmp_path):
    import struct

    from reranker_ops.serving.heartbeat import Heartbeat, read_heartbeat, read_worker_dir

    hb = Heartbeat(str(tmp_path), "score")
    hb.publish_info(heavy_modules=[])
    hb.write(busy_since=123.5, progress_at=124.0, pairs=7, tokens=70, ready=1)
    path = next(tmp_path.glob("score-*.hb"))
    got = read_heartbeat(path)
    assert got["busy_since"] == 123.5 and got["pairs"] == 7 and got["tokens"] == 70 and got["ready"] == 1
    hb.write(busy_since=None)
    assert read_heartbeat(path)["busy_since"] is None
    [(pid, rec)] = read_worker_dir(tmp_path).items()
    assert pid == os.getpid() and rec["stage"] == "score" and rec["heavy_modules"] == []
    # a write caught half-way (odd sequence number) is never taken for a consistent record
    struct.pack_into("<Q", hb._mm, 0, 41)
    hb._mm.flush()
    assert read_heartbeat(path) is None


def test_help_names_the_env_twins():
    out = CliRunner().invoke(app, ["serve", "--help"], terminal_width=240).output
    for var in ("RERANKER_MODEL", "RERANKER_PORT", "RERANKER_HEALTH_PORT", "RERANKER_RUN_DIR", "RERANKER_WORKERS"):
        assert var in out, var
