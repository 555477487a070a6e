"""Settings: sources and their precedence, the .env forms people write, every bad value at once on one
line, and the values derived from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from reranker_ops.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.timeout(60)


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


def test_threads_default_splits_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert Settings(workers=2, threads=0).effective_threads() == 4
    assert Settings(workers=3, threads=0).effective_threads() == 2  # never more threads than cores
    assert Settings(workers=16, threads=0).effective_threads() == 1  # at least one
    assert Settings(workers=2, threads=3).effective_threads() == 3  # given: as given
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one
    assert Settings(workers=1, threads=0).effective_threads() == 1