"""Shared fixtures: a tiny generated cross-encoder, its converted variants, free ports, CLI runner."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RERANKER_TEST_CACHE", REPO / ".pytest_cache" / "models"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The environment for a child rerankctl: no RERANKER_* leaking in from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANKER_", "HF_", "MOSEC_"))}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 120, cwd: Path | None = None,
            ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reranker_ops", *args],
        env=env or clean_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random BERT cross-encoder (tiny) saved with save_pretrained, built once per session."""
    from reranker_ops.models.synthetic import build_model

    out = tmp_path_factory.mktemp("tiny") / "tiny-model"
    return build_model(out, shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model converted to OpenVINO FP32 by the real convert code (parity checked)."""
    from reranker_ops.config import Settings
    from reranker_ops.models.convert import convert

    work = tmp_path_factory.mktemp("conv") / "tiny-model"
    shutil.copytree(tiny_model_dir, work)
    settings = Settings(models_dir=work.parent, model=str(work))
    results = convert(settings, str(work), formats=["openvino"], precision="fp32", bench_seconds=0.2)
    return Path(results[0]["dir"])
