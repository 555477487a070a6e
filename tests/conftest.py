"""Shared fixtures: a tiny generated cross-encoder, its converted variants, free ports, CLI runner."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this process handed out before: the kernel can give
    the same ephemeral port to two binds in a row once the first socket is closed (seen: a server's API
    and health ports both 42931)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port that was not handed out already")


def clean_env(**extra: str) -> dict:
    """The environment for a child rerankctl: no RERANKER_* leaking in from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANKER_", "HF_", "MOSEC_"))}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(extra)
    return env


# --- the suite runs in two processes (pyproject's addopts: -n 2 --dist loadfile) ------------------------------
# Most of its time is spent waiting on real servers, containers and conversions, so two test files at once take
# the suite from ~23 to ~14 minutes on two cores. Each process's temporary folders sit one level deeper
# (popen-gw0/), and MOSEC's sockets in a run dir below a test's folder then pass the 107 bytes a socket path may
# have (the server refuses such a run dir, as it should). So a parallel run's temporary root is a short folder of
# this checkout's own in /tmp, emptied at the start of each run (as pytest does with any --basetemp).
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if hasattr(config, "workerinput") or config.option.basetemp or not config.getoption("numprocesses", None):
        return
    config.option.basetemp = f"/tmp/rrk-{hashlib.sha1(str(REPO).encode()).hexdigest()[:8]}"


# --- markers that say what a test starts ----------------------------------------------------------------------
# A test that starts a real server is ``e2e``: marked by the fixtures it uses (make_server, shared_server), or
# by hand where it starts one itself; and a test that starts one without the mark fails, so the marks cannot
# drift from what the tests do (``-m "not e2e"`` runs every test that needs no server).
SERVER_FIXTURES = {"make_server", "shared_server"}
_CURRENT: dict = {}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _the_running_test(request):
    _CURRENT["node"] = request.node
    yield
    _CURRENT.pop("node", None)


def starts_a_server() -> None:
    """Called wherever a test starts ``rerankctl serve``: the test must be marked e2e."""
    node = _CURRENT.get("node")
    if node is not None and node.get_closest_marker("e2e") is None:
        raise AssertionError(f"{node.nodeid} starts a real server: mark it @pytest.mark.e2e")


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 120, cwd: Path | None = None,
            ) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "reranker_ops", *args],
        env=env or clean_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )
    if args[:1] == ["serve"] and "--help" not in args and res.returncode == 0:
        starts_a_server()  # a serve that succeeded ran a server (a refused one started nothing)
    return res


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random BERT cross-encoder (tiny) saved with save_pretrained, built once per session."""
    from modelkit.synthetic import build_model

    out = tmp_path_factory.mktemp("tiny") / "tiny-model"
    return build_model(out, shape="tiny", seed=0)


@pytest.fixture(scope="session")
def trained_model_dir() -> Path:
    """A tiny cross-encoder trained here on a synthetic relevance task (cached across sessions): the model
    on which reduced precision and tokenization are judged, since a random one ranks nothing."""
    from modelkit.trained import cached_trained_model

    model = cached_trained_model(Path(os.environ.get("RERANKCTL_TEST_CACHE", "/var/tmp/rerankctl-test-cache")))
    quality = _json.loads((model / "training.json").read_text())["held_out"]
    assert quality["ndcg@10"] >= 0.85 and quality["mrr"] >= 0.85, f"the trained model does not rank: {quality}"
    return model


@pytest.fixture()
def trained_copy(trained_model_dir, tmp_path) -> Path:
    """A writable copy of the trained model, under a models dir of its own (converts land beside it)."""
    dst = tmp_path / "models" / "trained"
    shutil.copytree(trained_model_dir, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_fp32(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model converted to OpenVINO FP32 by the real convert code (parity checked)."""
    from reranker_ops.models.convert import convert
    from reranker_ops.settings import Settings

    work = tmp_path_factory.mktemp("conv") / "tiny-model"
    shutil.copytree(tiny_model_dir, work)
    settings = Settings(models_dir=work.parent, model=str(work))
    results = convert(settings, str(work), formats=["openvino"], precision="fp32", bench_seconds=0.2)
    return Path(results[0]["dir"])


# ----------------------------------------------------------------------------------------------------------
# real servers
# ----------------------------------------------------------------------------------------------------------
import json as _json  # noqa: E402
import signal as _signal  # noqa: E402
import time  # noqa: E402
import time as _time  # noqa: E402

import httpx  # noqa: E402


class ServerHandle:
    """A real ``rerankctl serve --daemon`` on free loopback ports, with its own run dir."""

    def __init__(self, model_dir: Path, run_dir: Path, **settings: object) -> None:
        self.model_dir = model_dir
        self.run_dir = run_dir
        self.port = free_port()
        self.health_port = free_port()
        self.env = clean_env(
            RERANKER_MODEL=str(model_dir),
            RERANKER_RUN_DIR=str(run_dir),
            RERANKER_PORT=str(self.port),
            RERANKER_HEALTH_PORT=str(self.health_port),
            RERANKER_STARTUP_TIMEOUT_S="90",
            **{f"RERANKER_{k.upper()}": str(v) for k, v in settings.items()},
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.health = f"http://127.0.0.1:{self.health_port}"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_cli(list(args), env=self.env, timeout=timeout)

    def inject_faults(self, **flags: Path) -> "ServerHandle":
        """Load tests/faults into every server process; ``hang=PATH`` sets RERANKER_TEST_HANG_FILE, etc."""
        # before whatever PYTHONPATH there is (a benchmark of another tree runs it through PYTHONPATH)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent / "faults"),
                                                             self.env.get("PYTHONPATH", "")) if p)
        for name, path in flags.items():
            self.env[f"RERANKER_TEST_{name.upper()}_FILE"] = str(path)
        return self

    def start(self) -> "ServerHandle":
        res = self.cli("serve", "--daemon")
        assert res.returncode == 0, f"serve --daemon failed:\n{res.stdout}\n{res.stderr}"
        return self

    def status(self) -> dict:
        res = self.cli("status", "--json", timeout=30)
        return _json.loads(res.stdout)

    def pidfile(self) -> dict:
        return _json.loads((self.run_dir / "rerankctl.pid.json").read_text())

    def processes(self) -> dict[str, list[int]]:
        roles: dict[str, list[int]] = {}
        for p in self.status().get("processes", []):
            roles.setdefault(p["role"], []).append(p["pid"])
        return roles

    def cleanup(self) -> None:
        """Stop it, and make sure nothing of it survives, whatever the test did."""
        try:
            self.cli("stop", "--timeout", "10", timeout=60)
        except subprocess.TimeoutExpired:
            pass
        kill_marked(self.run_dir)


def in_flight(health_url: str) -> int:
    """Requests the server is answering now, from its own gauge (0 when it cannot be read)."""
    import re

    import httpx

    try:
        text = httpx.get(f"{health_url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    m = re.search(r"^reranker_requests_in_flight (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def proc_env(proc) -> dict:
    """A process's environment, or {} when it is gone or not ours to read."""
    import psutil

    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def ended(pid: int) -> bool:
    """Gone, or a zombie: dead, holding nothing. A daemon's supervisor is re-parented to PID 1 when the CLI
    that forked it exits, and when PID 1 collects it is PID 1's business (here it can take seconds)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_marked(run_dir: Path) -> None:
    import psutil

    from reranker_ops.supervise.procs import INSTANCE_ENV

    instances = set()
    for path in (run_dir / "rerankctl.pid.json", run_dir / "state.json"):
        try:
            instances.add(_json.loads(path.read_text())["instance"])
        except (OSError, ValueError, KeyError):
            pass
    if not instances:
        return
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get(INSTANCE_ENV) in instances or (
            env.get("RERANKER_RUN_DIR") == str(run_dir) and proc.pid != os.getpid()
        ):
            try:
                proc.send_signal(_signal.SIGCONT)
                proc.kill()
            except psutil.Error:
                pass


QUERY = "Как приготовить борщ?"
DOCS = ["Борщ — суп из свёклы.", "Завтра дождь.", "Нейронные сети."]
# four documents of mixed scripts, emoji and lengths: the API tests' and the client dialects' default
MIXED_DOCS = [
    "Борщ — традиционный свекольный суп, его варят с капустой.",
    "Вчера была хорошая погода для прогулки 🌞",
    "Машинное обучение использует нейронные сети.",
    "How to cook borscht: beets, cabbage and broth. 🍲",
]


class Clients:
    """Clients sending requests in a loop (bounded by time), recording every outcome."""

    def __init__(self, base: str, deadline_s: float, n: int = 3, headers: dict | None = None,
                 model: str | None = None) -> None:
        self.base = base
        self.deadline_s = deadline_s
        self.headers = headers or {}
        self.body = {"query": QUERY, "documents": DOCS, **({"model": model} if model else {})}
        self.records: list[tuple[float, float, object]] = []  # start, seconds, status or error
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        end = time.monotonic() + 240  # hard bound
        while not self._stop.is_set() and time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r = httpx.post(self.base + "/rerank", json=self.body, headers=self.headers,
                               timeout=self.deadline_s + 10)
                outcome: object = r.status_code
                if r.status_code == 200 and len(r.json().get("scores", [])) != 3:
                    outcome = "wrong answer"  # judged by the test, in the main thread
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            self.records.append((t0, time.monotonic() - t0, outcome))
            if outcome != 200:
                time.sleep(0.1)  # a client's retry pause, not synchronisation

    def __enter__(self) -> "Clients":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def first_success_after(self, t: float) -> float | None:
        oks = [t0 + d for t0, d, o in self.records if o == 200 and t0 > t]
        return min(oks) if oks else None



def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (then fail)."""
    deadline = _time.monotonic() + timeout
    last = None
    while _time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        _time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture()
def make_server(tiny_fp32, tmp_path):
    """Factory: ``make_server(**settings)`` starts a real server; every one is stopped and reaped after."""
    made: list[ServerHandle] = []

    def factory(start: bool = True, model_dir: Path | None = None, **settings) -> ServerHandle:
        run_dir = tmp_path / f"run{len(made)}"
        h = ServerHandle(model_dir or tiny_fp32.parent, run_dir, **settings)
        made.append(h)
        return h.start() if start else h

    yield factory
    for h in made:
        h.cleanup()


@pytest.fixture(scope="module")
def shared_server(tiny_fp32, tmp_path_factory):
    """One server for the read-only API tests of a module."""
    h = ServerHandle(tiny_fp32.parent, tmp_path_factory.mktemp("shared-run"))
    h.start()
    yield h
    h.cleanup()


@pytest.fixture(scope="session")
def reference_scorer(tiny_fp32):
    """sigmoid(logits) of the transformers model the tiny variant was converted from."""
    from reranker_ops.models.reference import (
        load_reference,
        model_max_length,
        reference_scores,
    )

    source = Path(_json.loads((tiny_fp32 / "manifest.json").read_text())["source"]["path"])
    tok, model = load_reference(source)
    limit = model_max_length(tok, model)

    def score(query: str, passages: list[str]):
        return reference_scores(tok, model, query, passages, limit)

    return score


@pytest.fixture(scope="session")
def reference_windows(tiny_fp32):
    """transformers' own windows of each passage (``return_overflowing_tokens`` with a stride), each scored
    by the transformers model: ``f(query, passages, max_length, stride) -> [[sigmoid(logit) per window]]``."""
    import torch

    from reranker_ops.models.reference import load_reference
    from reranker_ops.worker.engine import sigmoid

    source = Path(_json.loads((tiny_fp32 / "manifest.json").read_text())["source"]["path"])
    tok, model = load_reference(source)

    def score(query: str, passages: list[str], max_length: int, stride: int) -> list[list[float]]:
        out = []
        for p in passages:
            enc = tok(query, p, truncation="only_second", max_length=max_length, stride=stride,
                      return_overflowing_tokens=True, padding=True, return_tensors="pt", return_token_type_ids=True)
            with torch.no_grad():
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               token_type_ids=enc["token_type_ids"]).logits.float().numpy()
            raw = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
            out.append([float(x) for x in sigmoid(raw.astype("float64"))])
        return out

    return score


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    """The samples of metric ``name`` in a Prometheus exposition: (labels, value), whatever the labels' order."""
    import re

    out = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            out.append((labels, float(m.group(4))))
    return out


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` with ``labels`` (NaN when there is none)."""
    found = [v for got, v in samples(text, name) if got == labels]
    return found[0] if found else float("nan")


def assert_nothing_went_down(server: "ServerHandle", workers_before: list[int]) -> None:
    """After hostile traffic: no restart and no worker death, the same score workers, no 5xx counted, and no
    traceback or gate error in the supervisor's log (test_poison.py's corpus, test_fuzz_live.py's mutations)."""
    st = server.status()
    assert st["restarts"] == {"worker": 0, "server": 0} and st["worker_deaths"] == 0, st
    assert sorted(server.processes()["score"]) == workers_before  # no worker died and was replaced
    text = httpx.get(server.health + "/metrics", timeout=10).text
    server_errors = [(labels, n) for labels, n in samples(text, "reranker_requests_total")
                     if labels["code"].startswith("5") and n > 0]
    assert server_errors == [], server_errors
    log = (server.run_dir / "rerankctl.log").read_text()
    assert "Traceback" not in log and "gate error" not in log, log[-3000:]
