"""The MOSEC child process: ``python -m reranker_ops.serving.app CONFIG.json``.

Started by the supervisor in its own process group. MOSEC parses ``sys.argv`` and ``MOSEC_*`` variables
itself, so both are built here from our config alone: none of the user's flags leak into it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

from ..startup import frozen_imports


def _die_with_parent() -> None:
    """SIGTERM this process (MOSEC's graceful stop) if the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def _light_openapi_assets() -> None:
    """Keep MOSEC's main process small: MOSEC (0.9.8) writes its API viewer pages through ``offapi``, which
    loads ~9 MB of bundled JavaScript into a string that lives as long as the process (36 MiB of PSS, half
    of MOSEC's main process). Those pages are on the internal port, which only the gate reaches, and the
    gate serves none of them: write the spec and a page that links to it instead."""
    try:
        import mosec.openapi as mosec_openapi
        import mosec.server as mosec_server
    except ImportError:
        return
    if not hasattr(mosec_server, "write_openapi_assets"):
        return

    def write_assets(spec, output_dir: Path) -> None:
        (output_dir / mosec_openapi.OPENAPI_METADATA_FILE).write_text(json.dumps(spec), encoding="utf-8")
        (output_dir / mosec_openapi.OPENAPI_SWAGGER_FILE).write_text(
            f'<!doctype html><a href="{mosec_openapi.OPENAPI_METADATA_URL}">OpenAPI</a>\n', encoding="utf-8")

    mosec_server.write_openapi_assets = write_assets


def _worker_start_method() -> str:
    """How MOSEC starts the score workers. ``fork``: a worker begins with MOSEC, numpy and our modules
    already imported (this process imported them), ~0.25 s sooner than a new interpreter that imports
    them all again (``spawn``, MOSEC's default), and a respawned worker after a kill as much sooner; the
    pages of those modules stay shared with this process. A fork copies only the calling thread, so it is
    safe only while this process has one thread (a lock held by another would stay locked in the child):
    otherwise ``spawn``."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return "spawn"
    return "fork" if threads == 1 else "spawn"


def main(argv: list[str]) -> int:
    config_path = Path(argv[1])
    parent = int(argv[2]) if len(argv) > 2 else None
    _die_with_parent()
    if parent is not None and os.getppid() != parent:
        return 1  # the supervisor died before we could ask to die with it
    with frozen_imports():  # MOSEC, numpy and the workers' module live as long as this process
        from mosec import Runtime, Server

        from .workers import CONFIG_ENV, Score
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    os.environ[CONFIG_ENV] = str(config_path)
    for key in [k for k in os.environ if k.startswith("MOSEC_")]:
        del os.environ[key]
    m = cfg["mosec"]
    sys.argv = [
        "rerankctl-mosec",
        "--address", m["address"],
        "--port", str(m["port"]),
        "--timeout", str(m["timeout_ms"]),
        "--capacity", str(m["capacity"]),
        "--path", m["path"],
        "--max-request-size", str(m["max_request_size"]),
        "--namespace", "mosec_service",
        "--log-level", m["log_level"],
    ]
    _light_openapi_assets()
    server = Server()
    timeout_s = m["timeout_ms"] / 1000.0
    # One envelope at a time per worker: the gate batches (see schema's envelope). MOSEC's batcher would add a
    # timer tick to every request and split the gate's envelopes into separate calls again.
    score = Runtime(Score, num=cfg["workers"], max_batch_size=1, timeout=timeout_s, start_method=_worker_start_method())
    server.register_runtime({"/score": [score]})
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
