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

from .workers import CONFIG_ENV


def _die_with_parent() -> None:
    """SIGTERM this process (MOSEC's graceful stop) if the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    config_path = Path(argv[1])
    parent = int(argv[2]) if len(argv) > 2 else None
    _die_with_parent()
    if parent is not None and os.getppid() != parent:
        return 1  # the supervisor died before we could ask to die with it
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
        "--wait", str(max(1, m["wait_ms"])),
        "--max-request-size", str(m["max_request_size"]),
        "--namespace", "mosec_service",
        "--log-level", m["log_level"],
    ]
    from mosec import Runtime, Server

    from .workers import Score, Validate

    server = Server()
    timeout_s = m["timeout_ms"] / 1000.0
    validate = Runtime(Validate, num=cfg["validate_workers"], max_batch_size=1, timeout=timeout_s)
    score = Runtime(
        Score,
        num=cfg["workers"],
        max_batch_size=cfg["max_batch_requests"],
        max_wait_time=max(1, m["wait_ms"]),
        timeout=timeout_s,
    )
    server.register_runtime({"/score": [validate, score]})
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
