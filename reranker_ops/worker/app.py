"""The MOSEC child process: ``python -m reranker_ops.worker.app CONFIG.json``.

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

from ..startup import frozen_imports, installed_version, verified_on


def _die_with_parent() -> None:
    """SIGTERM this process (MOSEC's graceful stop) if the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


# MOSEC versions whose mosec.openapi (the names its server imports, and what it does with them) was read.
OPENAPI_STAND_IN_VERIFIED = ("0.9.8",)
# What MOSEC's controller serves on its own port for its API viewer (mosec 0.9.8's mosec.openapi names).
OPENAPI_METADATA_FILE = "openapi-metadata.json"
OPENAPI_SWAGGER_FILE = "openapi-swagger.html"
OPENAPI_METADATA_URL = "/openapi/metadata.json"


def _openapi_stand_in(version: str = "") -> bool:
    """Keep MOSEC's main process light and its start short: MOSEC describes its routes for an API viewer,
    with ``mosec.openapi``. Importing it loads defspec, msgspec, ``http.server``, ssl and
    ``importlib.metadata`` (about half of MOSEC's import, on the path to the workers' fork, so to every
    start); building the description inspects the workers' types; writing the viewer loads megabytes of
    bundled JavaScript into a string that lives as long as the process (tens of MiB of PSS; figures in
    benchmarks/HISTORY.md). All for pages on the internal port, which only the gate reaches and which the
    gate never asks for. So MOSEC's server gets this module's two functions instead: a description with no
    routes, and a page that links to it. Only in this process, only on MOSEC versions whose use of the
    module was read (OPENAPI_STAND_IN_VERIFIED), and only when ``mosec.openapi`` is not imported yet (a
    MOSEC that wants other names from it would fail to import: then it gets its own module back).
    Returns whether the stand-in is in place."""
    if "mosec.openapi" in sys.modules or not verified_on(
            "mosec", OPENAPI_STAND_IN_VERIFIED, "the stand-in for mosec.openapi", version):
        return False
    import types

    def generate_openapi(routes) -> dict:
        return {"openapi": "3.1.0", "info": {"title": "rerankctl score workers (internal)", "version": "0"},
                "paths": {}}

    def write_openapi_assets(spec, output_dir: Path) -> None:
        (output_dir / OPENAPI_METADATA_FILE).write_text(json.dumps(spec), encoding="utf-8")
        (output_dir / OPENAPI_SWAGGER_FILE).write_text(
            f'<!doctype html><a href="{OPENAPI_METADATA_URL}">OpenAPI</a>\n', encoding="utf-8")

    stand_in = types.ModuleType("mosec.openapi", _openapi_stand_in.__doc__)
    stand_in.generate_openapi = generate_openapi  # type: ignore[attr-defined]
    stand_in.write_openapi_assets = write_openapi_assets  # type: ignore[attr-defined]
    sys.modules["mosec.openapi"] = stand_in
    return True


def _import_mosec(version: str = ""):
    """MOSEC's ``Runtime`` and ``Server``, with the stand-in for its API description where it is verified
    (see above; ``version`` stands in for the installed one in tests)."""
    _openapi_stand_in(version)
    try:
        from mosec import Runtime, Server
    except ImportError:
        for name in [m for m in sys.modules if m == "mosec" or m.startswith("mosec.")]:
            del sys.modules[name]
        from mosec import Runtime, Server
    return Runtime, Server


def mosec_version() -> str:
    """The installed MOSEC's version, without importing it (the supervisor asks too)."""
    return installed_version("mosec")


# MOSEC versions whose Runtime._check was read and tested with KeepsLastWorker (tests/test_watchdog.py kills
# the lone worker with it on and off).
KEEP_LAST_WORKER_VERIFIED = ("0.9.8",)
_CHECK_PARAMS = ["self", "work_path", "shutdown", "shutdown_notify", "init"]


def keeps_last_worker(version: str) -> bool:
    """Whether MOSEC ``version`` gets ``KeepsLastWorker`` (the supervisor decides it and writes it in the
    generation's config, so both sides agree on what the death of a stage's last worker does)."""
    return version in KEEP_LAST_WORKER_VERIFIED


def _runtime_class(Runtime, keep: bool):
    """MOSEC's ``Runtime``, or one that keeps a stage alive when its last worker dies.

    MOSEC respawns a dead worker only while a sibling of its stage lives (``Runtime._check`` with
    ``init=False``); when the last one dies it ends the whole server. With one score worker (the default),
    a worker killed by the OOM killer, by the watchdog (hung or stopped) or by a request that crashes native
    code took the controller and every queued request with it, and spent the restart budget: a new
    generation. This subclass asks ``_check`` to start missing workers as it does at the first start,
    always, so MOSEC replaces the last worker like any other. What MOSEC's rule protected against, a worker
    that can never start, is the supervisor's to judge: a worker that fails to load says so in its heartbeat,
    and capacity that does not come back within RERANKER_RESPAWN_TIMEOUT_S replaces the generation.

    ``_check`` is MOSEC's private method: only on versions it was verified on (``keep``), and only while its
    signature is the one verified; otherwise MOSEC's own Runtime, and a line in the log says so."""
    import inspect

    if not keep or list(inspect.signature(Runtime._check).parameters) != _CHECK_PARAMS:
        print(f"rerankctl: MOSEC {mosec_version()} is not a version the last-worker respawn was verified on"
              f" ({', '.join(KEEP_LAST_WORKER_VERIFIED)}): when a stage's last worker dies, MOSEC ends and the"
              " supervisor starts a new generation", file=sys.stderr, flush=True)
        return Runtime

    class KeepsLastWorker(Runtime):
        def _check(self, work_path, shutdown, shutdown_notify, init):
            return super()._check(work_path, shutdown, shutdown_notify, True)

    return KeepsLastWorker


def _worker_start_method() -> str:
    """How MOSEC starts the score workers. ``fork``: a worker begins with MOSEC, numpy and our modules
    already imported (this process imported them), sooner by a whole import than a new interpreter that
    imports them all again (``spawn``, MOSEC's default), and a respawned worker after a kill as much sooner;
    the pages of those modules stay shared with this process. A fork copies only the calling thread, so it is
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
        Runtime, Server = _import_mosec()

        from ..protocol.genconfig import CONFIG_ENV, GenerationConfig
        from .score import Score
    cfg = GenerationConfig.read(config_path)
    os.environ[CONFIG_ENV] = str(config_path)
    for key in [k for k in os.environ if k.startswith("MOSEC_")]:
        del os.environ[key]
    sys.argv = cfg.mosec.argv()
    server = Server()
    # One envelope at a time per worker: the gate batches (see protocol/envelope.py). MOSEC's batcher would add a
    # timer tick to every request and split the gate's envelopes into separate calls again.
    runtime = _runtime_class(Runtime, cfg.keep_last_worker)
    score = runtime(Score, num=cfg.workers, max_batch_size=1, timeout=cfg.mosec.timeout_ms / 1000.0,
                    start_method=_worker_start_method())
    server.register_runtime({"/score": [score]})
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
