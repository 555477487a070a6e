"""The command line: every command's help, options spelled alike, the env twins named, tracebacks only with
--debug."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from reranker_ops.cli import app

pytestmark = pytest.mark.timeout(60)

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


def test_help_names_the_env_twins():
    out = CliRunner().invoke(app, ["serve", "--help"], terminal_width=240).output
    for var in ("RERANKER_MODEL", "RERANKER_PORT", "RERANKER_HEALTH_PORT", "RERANKER_RUN_DIR", "RERANKER_WORKERS"):
        assert var in out, var
