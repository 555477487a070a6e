"""Render the systemd units with this installation's paths (no guessing of PATH at run time)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from .settings import Settings

UNITS = ("rerankctl.service", "rerankctl-prepare.service")


def rerankctl_binary() -> Path:
    """The absolute path of this environment's rerankctl: systemd never resolves it through PATH."""
    return Path(sys.executable).absolute().parent / "rerankctl"


def render(unit: str, settings: Settings, *, rerankctl: Path | None = None, env_file: str = "/etc/rerankctl/env",
           readme: str = "/usr/share/doc/rerankctl/README.md") -> str:
    if unit not in UNITS:
        raise ValueError(unit)
    template = resources.files("reranker_ops").joinpath(f"data/{unit}.in").read_text(encoding="utf-8")
    drain = int(settings.stop_timeout_s)
    return template.format(
        rerankctl=str(rerankctl or rerankctl_binary()),
        env_file=env_file,
        readme=readme,
        drain_s=drain,
        stop_s=drain + 20,
        watchdog_sec=max(30, int(4 * (settings.probe_interval_s + settings.probe_timeout_s)) + int(settings.startup_timeout_s // 10)),
    )
