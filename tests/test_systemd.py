"""systemd units: they verify, they are hardened, the checked-in copies match what the command writes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.timeout(120)
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (.ci/run installs it)")


@pytest.fixture()
def units(tmp_path) -> Path:
    res = run_cli(["systemd", "install", "--dir", str(tmp_path / "units"), "--env-file", str(tmp_path / "env")])
    assert res.returncode == 0, res.stderr
    return tmp_path / "units"


def test_install_writes_units_and_env_file(units, tmp_path):
    service = (units / "rerankctl.service").read_text()
    assert "Type=notify" in service and "KillMode=mixed" in service and "WatchdogSec=" in service
    assert "MemoryDenyWriteExecute" not in service.split("# Hardening")[1].split("\n", 2)[2]
    exec_start = re.search(r"^ExecStart=(\S+) serve$", service, re.M).group(1)
    assert Path(exec_start).is_absolute() and Path(exec_start).exists()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", service, re.M).group(1))
    drain = int(re.search(r"^Environment=RERANKER_STOP_TIMEOUT_S=(\d+)", service, re.M).group(1))
    assert stop > drain
    assert (tmp_path / "env").read_text().count("RERANKER_") >= 30
    res = run_cli(["systemd", "install", "--dir", str(units), "--env-file", str(tmp_path / "env")])
    assert res.returncode != 0 and "--force" in res.stderr


@needs_analyze
def test_units_verify_cleanly(units):
    res = subprocess.run([ANALYZE, "verify", "rerankctl.service", "rerankctl-prepare.service"], cwd=units,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr


@needs_analyze
@pytest.mark.parametrize("unit", ["rerankctl.service", "rerankctl-prepare.service"])
def test_units_are_hardened(units, unit):
    res = subprocess.run([ANALYZE, "security", "--offline=yes", f"./{unit}"], cwd=units,
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 1.4  # what the README promises


def test_checked_in_units_and_env_example_match_the_generators():
    from reranker_ops.settings import Settings, render_env_example
    from reranker_ops.systemd_units import UNITS, render

    for unit in UNITS:
        expected = render(unit, Settings(), rerankctl=Path("/opt/rerankctl/venv/bin/rerankctl"))
        assert (REPO / "systemd" / unit).read_text() == expected, f"systemd/{unit} is stale: regenerate it"
    assert (REPO / "env.example").read_text() == render_env_example(), "env.example is stale: regenerate it"
    for name in Settings.fields():
        assert f"RERANKER_{name.upper()}=" in render_env_example()


def test_print_command():
    res = run_cli(["systemd", "print", "rerankctl-prepare.service"])
    assert res.returncode == 0 and "Type=oneshot" in res.stdout and " prepare" in res.stdout
    res = run_cli(["systemd", "print", "nope.service"])
    assert res.returncode != 0 and "unknown unit" in res.stderr
