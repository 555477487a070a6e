"""MOSEC workers. Imports mosec, numpy, tokenizers and openvino (through the engine): nothing heavier.

Stage 1 (``Validate``, unbatched) decodes, validates and tokenizes one request: a bad request stops here
and never reaches the batched stage, where one failure would fail every request in the batch.
Stage 2 (``Score``, batched across requests) scores all pairs of the batch in length-sorted micro-batches.

Each worker keeps a heartbeat (``heartbeat.py``): when it last made progress, whether it is inside a
forward pass and since when, and counters. The supervisor's watchdog reads them
to tell a hung worker from a busy one; ``/metrics`` sums the counters.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hmac
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mosec import ClientError, ValidationError, Worker

from ..startup import frozen_imports
from .engine import (
    Scorer,
    Tokenizer,
    best_of_windows,
    configure_process_threads,
    read_variant_manifest,
    trim_heap,
)
from .heartbeat import Heartbeat
from .schema import TAG_ROUTES, Limits, RequestError, build_response, parse_job

CONFIG_ENV = "RERANKER_WORKER_CONFIG"
# How often, at most, the score worker hands memory it no longer uses back to the kernel (after a batch).
TRIM_INTERVAL_S = 5.0
HEAVY_MODULES = ("torch", "transformers", "optimum", "nncf")


def load_config() -> dict:
    """The child's configuration, written by the supervisor; the one handoff across the process boundary."""
    return json.loads(Path(os.environ[CONFIG_ENV]).read_text(encoding="utf-8"))


def _loaded_heavy_modules() -> list[str]:
    return sorted(m for m in HEAVY_MODULES if m in sys.modules)


@contextlib.contextmanager
def _reporting_init_failure(hb: Heartbeat, cfg: dict):
    """A worker that cannot load what it was given says why in its heartbeat before it dies, so the
    supervisor fails the boot at once with the reason (see ``Supervisor.init_failure``)."""
    try:
        yield
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        hb.publish_info(generation=cfg.get("generation"),
                        init_error=f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300])
        raise


def _enable_stack_dumps() -> None:
    """SIGUSR1 prints every thread's Python stack to stderr (the supervisor's log), even while the
    worker is stuck in native code: the watchdog asks for it before it kills a hung worker."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)


class Validate(Worker):
    """Stage 1: route tag + body -> tokenized job, or a 400/422 with a message naming the rule."""

    def __init__(self) -> None:
        super().__init__()
        configure_process_threads()
        _enable_stack_dumps()
        cfg = load_config()
        self._secret = str(cfg.get("gate_secret", "")).encode("ascii")
        self.hb = Heartbeat(cfg["worker_dir"], "validate")
        with frozen_imports(), _reporting_init_failure(self.hb, cfg):
            manifest = read_variant_manifest(Path(cfg["variant_dir"]))
            model_max = int(manifest.get("max_length") or 512)
            max_length = min(cfg["max_length"], model_max) if cfg["max_length"] else model_max
            self.tokenizer = Tokenizer(Path(cfg["variant_dir"]) / "tokenizer.json", max_length)
        self.limits = Limits.from_mapping(cfg["limits"])
        self.window_stride = int(cfg["window_stride"])
        self.hb.publish_info(heavy_modules=_loaded_heavy_modules())
        self.hb.write(ready=1)

    def deserialize(self, data: bytes) -> bytes:
        return data  # parsed in forward, where every failure maps to a status

    def forward(self, data: bytes) -> dict:
        now = time.monotonic()
        self.hb.write(busy_since=now, progress_at=now)
        try:
            head, _, body = data.partition(b"\n")
            secret, _, tag = head.rpartition(b" ")
            # Only the gate knows this instance's secret: a request sent straight to MOSEC's port stops here.
            if not hmac.compare_digest(secret, self._secret):
                self.hb.data["errors"] += 1
                raise ClientError("requests must go through the API port")
            route = TAG_ROUTES.get(tag.decode("ascii", "replace"))
            if route is None:
                raise ClientError("unknown route tag")
            try:
                job = parse_job(route, body, self.limits)
            except RequestError as exc:
                self.hb.data["errors"] += 1
                if exc.status == 400:
                    raise ClientError(exc.message) from None
                raise ValidationError(exc.message) from None
            owners = None
            if job.windows > 1:
                encs, owners = self.tokenizer.encode_windows(list(zip(job.queries, job.passages)), job.windows,
                                                             self.window_stride)
            else:
                encs = self.tokenizer.encode_items(zip(job.queries, job.passages))
            if not job.truncate:
                over = [i for i, e in enumerate(encs) if e.truncated]
                if over:
                    self.hb.data["errors"] += 1
                    pair = (owners[over[0]] if owners else over[0]) + job.extra.get("offset", 0)
                    if owners:
                        raise ValidationError(
                            f"pair {pair} needs more than {job.windows} windows of {self.tokenizer.max_length} tokens"
                            " and truncate is false; send more windows (up to RERANKER_MAX_WINDOWS), truncate: true"
                            " or shorter text")
                    raise ValidationError(
                        f"pair {pair} is longer than the model's {self.tokenizer.max_length} tokens and"
                        " truncate is false; send truncate: true, windows, or shorter text"
                    )
            job.queries = []
            if not job.return_documents:
                job.passages = []
            return {"job": job, "encs": encs, "owners": owners}
        finally:
            done = time.monotonic()
            self.hb.data["requests"] += 1
            self.hb.write(busy_since=None, progress_at=done)


class Score(Worker):
    """Stage 2: score every pair of every request in the batch, then split the answers back."""

    def __init__(self) -> None:
        super().__init__()
        configure_process_threads()
        _enable_stack_dumps()
        cfg = load_config()
        self.hb = Heartbeat(cfg["worker_dir"], "score")
        self.hb.write()
        # openvino's modules, the compiled model and the tokenizer live as long as the worker: loaded without
        # the collector's passes, then frozen so its collections while serving do not traverse them
        with frozen_imports(), _reporting_init_failure(self.hb, cfg):
            self.scorer = Scorer(
                Path(cfg["variant_dir"]),
                threads=cfg["threads"],
                pin_threads=cfg["pin_threads"],
                token_budget=cfg["token_budget"],
                attention_budget=cfg["attention_budget"],
                max_length=cfg["max_length"],
            )
            # Warm up so the first real request does not pay for the first inference.
            self.scorer.score(cfg.get("warmup_query", "проверка"), ["прогрев модели", "warm-up"])
        self.model_name = cfg["model_name"]
        released = self.scorer.release_mapped_weights()
        self.hb.publish_info(heavy_modules=_loaded_heavy_modules(), released_mapping_bytes=released)
        self.hb.write(ready=1, progress_at=time.monotonic())
        threading.Thread(target=self._trim_loop, name="trim", daemon=True).start()

    def _trim_loop(self) -> None:
        """Every TRIM_INTERVAL_S after batches ran: hand back heap pages that freed activations and request
        objects left behind, and the embedding rows those batches touched in the mapped weights (they stay
        in the page cache, shared by every worker). ~5 ms of madvise and malloc_trim, off the request path:
        both are C calls that do not hold the GIL."""
        seen = -1
        while True:
            time.sleep(TRIM_INTERVAL_S)
            batches = self.hb.data["batches"]
            if batches != seen:
                seen = batches
                trim_heap()
                self.scorer.release_mapped_weights()

    def _progress(self, _n: int) -> None:
        self.hb.write(progress_at=time.monotonic())

    def forward(self, data: list[dict] | dict) -> list | dict:
        if isinstance(data, dict):  # MOSEC passes a bare item when max_batch_size is 1
            return self._forward([data])[0]
        return self._forward(data)

    def _forward(self, data: list[dict]) -> list:
        now = time.monotonic()
        self.hb.write(busy_since=now, progress_at=now)
        encs, owners = [], []
        for item in data:
            encs.extend(item["encs"])
            owners.append(len(item["encs"]))
        logits = self.scorer.score_encoded(encs, on_progress=self._progress)
        out, start = [], 0
        tokens_total = 0
        for item, n in zip(data, owners):
            tokens = sum(len(e) for e in item["encs"])
            tokens_total += tokens
            mine = logits[start : start + n]
            if item.get("owners") is not None:  # windows: each pair keeps its best window
                mine = best_of_windows(mine, item["owners"], max(item["owners"]) + 1)  # every pair has one
            out.append(build_response(item["job"], mine.tolist(), tokens, self.model_name, windows=n))
            start += n
        d = self.hb.data
        d["batches"] += 1
        d["requests"] += len(data)
        d["pairs"] += len(encs)
        d["tokens"] += tokens_total
        self.hb.write(busy_since=None, progress_at=time.monotonic())
        return out

    def serialize(self, data: Any) -> bytes:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
