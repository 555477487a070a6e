"""A converted variant's ``manifest.json`` (written by ``convert``): what it is, how it was checked, how to
compile it. Read by the workers and by the supervisor, which imports nothing heavier than this."""

from __future__ import annotations

import json
from pathlib import Path


def read_variant_manifest(variant_dir: Path) -> dict:
    path = variant_dir / "manifest.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {}
