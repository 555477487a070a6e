"""A MOSEC generation's configuration: the one handoff from the supervisor to the processes it starts.

The supervisor writes it (0600, in its private run dir: it holds the generation's secret); MOSEC's main process
reads the ``mosec`` part to build MOSEC's own arguments, and each score worker reads the rest. Typed, so a field
added on one side and forgotten on the other fails loudly in the tests, not in production. Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .api import Limits
from .atomic import write_json_atomic

CONFIG_ENV = "RERANKER_WORKER_CONFIG"  # MOSEC's main process points its workers at the file with it


@dataclass(frozen=True)
class MosecArgs:
    """What MOSEC's ``Server`` reads from ``sys.argv``: built here, from our settings only."""

    address: str
    port: int
    timeout_ms: int  # above the gate's deadline: only the gate fails a late request, alone
    capacity: int
    path: str  # MOSEC's IPC sockets: unique to the server and the generation
    max_request_size: int
    log_level: str = "info"

    def argv(self) -> list[str]:
        return ["rerankctl-mosec", "--address", self.address, "--port", str(self.port),
                "--timeout", str(self.timeout_ms), "--capacity", str(self.capacity), "--path", self.path,
                "--max-request-size", str(self.max_request_size), "--namespace", "mosec_service",
                "--log-level", self.log_level]


@dataclass(frozen=True)
class GenerationConfig:
    generation: int
    variant_dir: str
    model_name: str
    secret: str  # the gate seals envelopes with it and the worker its answers (see envelope.py)
    worker_dir: str  # heartbeats
    workers: int
    threads: int
    pin_threads: bool
    token_budget: int
    attention_budget: int
    max_length: int  # 0: the model's own
    window_stride: int
    limits: Limits
    mosec: MosecArgs
    kernel_cache: int = 1024  # see Settings.kernel_cache
    keep_last_worker: bool = False  # MOSEC replaces a stage's last worker (worker/app.py, verified versions)
    warmup_query: str = field(default="проверка")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["limits"] = Limits(**data["limits"])
        values["mosec"] = MosecArgs(**data["mosec"])
        return cls(**values)

    def write(self, path: Path) -> None:
        """Atomically, private (0600) from the moment it exists: it holds the generation's secret. Not synced:
        it is written anew at every start, and a start removes what a dead server left."""
        write_json_atomic(path, self.to_dict(), indent=None, sync=False)

    @classmethod
    def read(cls, path: Path) -> "GenerationConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
