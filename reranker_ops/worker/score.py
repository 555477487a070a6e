"""The MOSEC worker. Imports mosec, numpy, tokenizers and openvino (through the engine): nothing heavier.

One stage, ``Score``, handed one envelope at a time: the requests the gate gathered while the worker was busy
(``schema.split_envelope``). Each request is checked (the gate's secret), parsed, validated and tokenized,
then every pair of the requests that passed is scored in length-sorted micro-batches. A request that fails
its checks is answered in its part of the answer (``schema.Failed``) and the gate answers it with its
status: one bad request never fails the others. An envelope with a part that lacks the gate's secret is
refused whole (400), before any work: it was sent around the gate.

Each worker keeps a heartbeat (``heartbeat.py``): when it last made progress, whether it is inside a
forward pass and since when, and counters. The supervisor's watchdog reads them
to tell a hung worker from a busy one; ``/metrics`` sums the counters.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from mosec import ClientError, Worker

from ..startup import frozen_imports, verified_on
from .engine import (
    ONEDNN_CACHE_ENV,
    Scorer,
    best_of_windows,
    configure_process_threads,
    trim_heap,
)
from ..protocol.api import TAG_ROUTES, TEI, RequestError, build_response, parse_job
from ..protocol.envelope import REFUSED, EnvelopeError, Failed, Timing, open_envelope, pack_answers, seal_answer
from ..protocol.genconfig import CONFIG_ENV, GenerationConfig
from ..protocol.heartbeat import Heartbeat

# How often, at most, the score worker hands memory it no longer uses back to the kernel (after a batch).
TRIM_INTERVAL_S = 5.0
# What a score worker must never load: the converter's stack, and OpenVINO's own converter with the
# telemetry it brings (see _openvino_without_its_converter).
HEAVY_MODULES = ("torch", "transformers", "optimum", "nncf", "openvino.tools.ovc", "openvino_telemetry")


def load_config() -> GenerationConfig:
    """The generation's configuration, written by the supervisor; the one handoff across the process boundary."""
    return GenerationConfig.read(Path(os.environ[CONFIG_ENV]))


def _loaded_heavy_modules() -> list[str]:
    return sorted(m for m in HEAVY_MODULES if sys.modules.get(m) is not None)  # None: an import refused


# OpenVINO versions whose package __init__ was read: it imports the converter inside try/except ImportError.
OVC_BLOCK_VERIFIED = ("2026.4",)


def _openvino_without_its_converter(version: str = "") -> bool:
    """``import openvino`` also imports its model converter, ``openvino.tools.ovc``, and through it the
    telemetry client (urllib, http.client, email): over a hundred modules, and two to three times the import
    time of the runtime alone (benchmarks/HISTORY.md), on the path of every worker's start; a worker uses
    none of them. OpenVINO imports the converter inside ``try/except ImportError`` (it is optional there),
    and a None in ``sys.modules`` is Python's way to make one import fail, so the runtime loads without it.
    Only in this process (``rerankctl convert`` uses the converter), and only on versions whose import was
    read (OVC_BLOCK_VERIFIED). Returns whether the converter is blocked."""
    if "openvino" in sys.modules or not verified_on(
            "openvino", OVC_BLOCK_VERIFIED, "loading OpenVINO without its converter", version):
        return False
    sys.modules.setdefault("openvino.tools.ovc", None)
    return True


@contextlib.contextmanager
def _reporting_init_failure(hb: Heartbeat, cfg: GenerationConfig):
    """A worker that cannot load what it was given says why in its heartbeat before it dies, so the
    supervisor fails the boot at once with the reason (see ``WorkerWatch.init_failure``)."""
    try:
        yield
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        hb.publish_info(generation=cfg.generation,
                        init_error=f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300])
        raise


def _enable_stack_dumps() -> None:
    """SIGUSR1 prints every thread's Python stack to stderr (the supervisor's log), even while the
    worker is stuck in native code: the watchdog asks for it before it kills a hung worker."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)


# What no request may swallow: the interpreter's own ends. Everything else a request triggers, a native panic
# included (tokenizers raises its Rust panics as pyo3_runtime.PanicException, a BaseException), fails that
# request alone.
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


class Score(Worker):
    """Check, parse and tokenize every request of the batch, score all their pairs together, split the answers."""

    def __init__(self) -> None:
        super().__init__()
        configure_process_threads()
        _openvino_without_its_converter()
        _enable_stack_dumps()
        cfg = load_config()
        self._secret = cfg.secret.encode("ascii")
        self.limits = cfg.limits
        self.window_stride = cfg.window_stride
        self.hb = Heartbeat(cfg.worker_dir, "score")
        self.hb.write()
        # openvino's modules, the compiled model and the tokenizer live as long as the worker: loaded without
        # the collector's passes, then frozen so its collections while serving do not traverse them
        with frozen_imports(), _reporting_init_failure(self.hb, cfg):
            self.scorer = Scorer(
                Path(cfg.variant_dir),
                threads=cfg.threads,
                pin_threads=cfg.pin_threads,
                token_budget=cfg.token_budget,
                attention_budget=cfg.attention_budget,
                max_length=cfg.max_length,
                kernel_cache=cfg.kernel_cache,
            )
            # Warm up so the first real request does not pay for the first inference (whatever its shape: a
            # request of another shape right after is as fast as a warm one), with the smallest input, one
            # short pair: a larger one only lengthens every start
            self.scorer.score(cfg.warmup_query, ["прогрев"])
        self.tokenizer = self.scorer.tokenizer
        self.model_name = cfg.model_name
        # the bounds this worker's kernel caches got (0: the CPU plugin's own, an OpenVINO without the key)
        self.hb.publish_info(heavy_modules=_loaded_heavy_modules(), generation=cfg.generation,
                             kernel_cache=self.scorer.kernel_cache, onednn_cache=os.environ.get(ONEDNN_CACHE_ENV))
        self.hb.write(ready=1, progress_at=time.monotonic())
        threading.Thread(target=self._trim_loop, name="trim", daemon=True).start()

    def _trim_loop(self) -> None:
        """First the weight file's mapping, which compiling and the warm-up no longer need (reading
        /proc/self/maps takes a while: off the path to ready). Then every TRIM_INTERVAL_S after batches ran: hand
        back heap pages that freed activations and request objects left behind, and the embedding rows
        those batches touched in the mapped weights (they stay in the page cache, shared by every worker).
        madvise and malloc_trim run off the request path: both are C calls that do not hold the GIL."""
        self.scorer.release_mapped_weights()
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

    def deserialize(self, data: bytes) -> bytes:
        return data  # an envelope: opened in forward

    def forward(self, data: bytes) -> bytes:
        """One envelope in (MOSEC's max_batch_size is 1: the gate batches), its parts' answers out, sealed."""
        envelope_id, bodies = self._gated(data)
        out, timings = self._forward(envelope_id, bodies)
        packed = pack_answers([(o.encode() if isinstance(o, Failed) else self._json(o), t)
                               for o, t in zip(out, timings)])
        return seal_answer(self._secret, envelope_id, packed)

    def _forward(self, envelope_id: int, bodies: list[tuple[bytes, bytes]]) -> tuple[list, list[Timing]]:
        """(route tag, body) of each request -> each one's answer (a dict) or why it failed (``Failed``), and what
        was measured for it (its tokenization alone; the model call its pairs were in)."""
        now = time.monotonic()
        # the envelope's id: if this process dies scoring it, the supervisor knows which envelope it took along
        self.hb.write(busy_since=now, progress_at=now, envelope=envelope_id)
        items, spent = [], []
        for tag, body in bodies:
            t0 = time.perf_counter()
            items.append(self._prepare_alone(tag, body))
            spent.append(int((time.perf_counter() - t0) * 1e6))
        good = [it for it in items if not isinstance(it, Failed)]
        t0 = time.perf_counter()
        scored = iter(self._score_alone(good))
        inference_us = int((time.perf_counter() - t0) * 1e6) if good else 0
        out, timings = [], []
        tokens_total = pairs_total = 0
        for item, tokenize_us in zip(items, spent):
            mine = item if isinstance(item, Failed) else next(scored)
            if isinstance(mine, Failed):
                # one line in the server's log, as MOSEC writes for a request its worker refuses
                print(f"score worker: request refused ({mine.status}): {(mine.detail or mine.message)[:300]}",
                      file=sys.stderr, flush=True)
                out.append(mine)
                timings.append(Timing(tokenize_us=tokenize_us))
                continue
            n = len(item["encs"])
            tokens = sum(len(e) for e in item["encs"])
            tokens_total += tokens
            pairs_total += n
            truncated = item["truncated"]
            if item["owners"] is not None:  # windows: each pair keeps its best window
                mine = best_of_windows(mine, item["owners"], max(item["owners"]) + 1)  # every pair has one
            out.append(build_response(item["job"], mine.tolist(), tokens, self.model_name, windows=n,
                                      truncated=truncated))
            timings.append(Timing(tokenize_us, inference_us, tokens, item["chars"]))
        d = self.hb.data
        d["batches"] += 1
        d["requests"] += len(bodies)
        d["errors"] += sum(1 for o in out if isinstance(o, Failed))
        d["pairs"] += pairs_total
        d["tokens"] += tokens_total
        self.hb.write(busy_since=None, progress_at=time.monotonic(), envelope=0)
        return out, timings

    def _score_alone(self, good: list[dict]) -> list:
        """Each request's logits (or ``Failed``), its pairs scored together with every other request's; if that
        fails, each request's pairs scored on their own, so a request whose pairs make the model fail is
        answered with its own error and the others with their scores."""
        sizes = [len(it["encs"]) for it in good]
        encs = [e for it in good for e in it["encs"]]
        try:
            logits = self.scorer.score_encoded(encs, on_progress=self._progress)
        except _FATAL:
            raise
        except BaseException as exc:  # noqa: BLE001 - a native panic is a BaseException too
            print(f"score worker: scoring {len(good)} request(s) together failed ({type(exc).__name__}: {exc});"
                  " scoring each alone", file=sys.stderr, flush=True)
        else:
            bounds = np.cumsum([0, *sizes])
            return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        out: list = []
        for item in good:
            try:
                out.append(self.scorer.score_encoded(item["encs"], on_progress=self._progress))
            except _FATAL:
                raise
            except BaseException as exc:  # noqa: BLE001
                out.append(Failed(500, "the model failed on this request", detail=f"{type(exc).__name__}: {exc}"))
        return out

    def _gated(self, envelope: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The envelope's id and the (route tag, body) of each part; the whole envelope is refused if its mac
        does not prove the gate's secret (it was sent around the gate) or it is not an envelope."""
        try:
            return open_envelope(self._secret, envelope)
        except EnvelopeError:
            # Only the gate knows this generation's secret: a request sent straight to MOSEC's port stops here.
            self.hb.data["errors"] += 1
            self.hb.write(progress_at=time.monotonic())
            raise ClientError(REFUSED) from None

    def _prepare_alone(self, tag: bytes, body: bytes) -> dict | Failed:
        try:
            return self._prepare(tag, body)
        except _FATAL:
            raise
        except BaseException as exc:  # noqa: BLE001 - a bug (or a native panic, a BaseException) one request
            # triggers fails that request, not its batch, and never the worker
            return Failed(500, type(exc).__name__, detail=f"{type(exc).__name__}: {exc}")  # the gate answers "the model server failed on this request (…)"

    def _prepare(self, tag: bytes, body: bytes) -> dict | Failed:
        """One request parsed, validated and tokenized, or why not (400 or 422, the message names the rule)."""
        route = TAG_ROUTES.get(tag.decode("ascii", "replace"))
        if route is None:
            return Failed(400, "unknown route tag")
        try:
            job = parse_job(route, body, self.limits)
        except RequestError as exc:
            return Failed(exc.status, exc.message)
        owners = None
        pairs = list(zip(job.queries, job.passages))
        if job.windows > 1:
            encs, owners = self.tokenizer.encode_windows(pairs, job.windows, self.window_stride, job.doc_tokens)
        else:
            encs = self.tokenizer.encode_items(pairs, side=job.side, max_tokens=job.max_tokens,
                                               doc_tokens=job.doc_tokens)
        over = [i for i, e in enumerate(encs) if e.truncated]
        if over and not job.truncate:
            pair = (owners[over[0]] if owners else over[0]) + job.extra.get("offset", 0)
            if job.style == TEI:  # TEI's own words for it
                longest = max(len(e) for e in encs)
                return Failed(422, f"Input validation error: `inputs` must have less than"
                                   f" {self.tokenizer.max_length} tokens. Given: {longest}")
            if owners:
                return Failed(422, f"pair {pair} needs more than {job.windows} windows of"
                                   f" {self.tokenizer.max_length} tokens and truncate is false; send more windows"
                                   " (up to RERANKER_MAX_WINDOWS), truncate: true or shorter text")
            return Failed(422, f"pair {pair} is longer than the model's {self.tokenizer.max_length} tokens and"
                               " truncate is false; send truncate: true, windows, or shorter text")
        truncated = len({owners[i] for i in over}) if owners else len(over)
        chars = sum(len(q) + len(p) for q, p in pairs)
        job.queries = []
        if not job.return_documents:
            job.passages = []
            job.originals = None
        return {"job": job, "encs": encs, "owners": owners, "truncated": truncated, "chars": chars}

    @staticmethod
    def _json(answer: dict) -> bytes:
        return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def serialize(self, data: bytes) -> bytes:
        return data  # packed in forward
