"""Tokenize and score query/passage pairs with a converted model.

This is the one scoring path: MOSEC workers, the parity check after conversion and the in-process ceiling
benchmark all go through it. It imports ``openvino``, ``tokenizers`` and ``numpy`` only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

MODEL_FILES = {"openvino": "openvino_model.xml", "onnx": "model.onnx"}
PAD_MULTIPLE = 8


@dataclass
class Encoded:
    """One tokenized pair: ids and segment ids (0 = query, 1 = passage), unpadded."""

    ids: np.ndarray  # int64 [n]
    type_ids: np.ndarray  # int64 [n]
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def read_variant_manifest(variant_dir: Path) -> dict:
    path = variant_dir / "manifest.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {}


class Tokenizer:
    """A ``tokenizers`` tokenizer set up like transformers' ``tokenizer(q, p, truncation=True)``."""

    def __init__(self, tokenizer_json: Path, max_length: int) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(tokenizer_json))
        self._tok.no_padding()
        self.max_length = max_length
        # longest_first is what transformers uses for truncation=True on a pair.
        self._tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        pad_id = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else int(pad_id)

    def encode_pairs(self, query: str, passages: Sequence[str]) -> list[Encoded]:
        return self.encode_items([(query, p) for p in passages])

    def encode_items(self, pairs: Iterable[tuple[str, str]]) -> list[Encoded]:
        encs = self._tok.encode_batch(list(pairs))
        return [
            Encoded(
                np.asarray(e.ids, dtype=np.int64),
                np.asarray(e.type_ids, dtype=np.int64),
                bool(e.overflowing),
            )
            for e in encs
        ]


def plan_microbatches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group pair indices, sorted by length, so that rows x padded length stays within the budget.

    Sorting first keeps padding near zero; a pair longer than the budget alone is a batch of one.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        padded = _round_up(lengths[i])
        if current and padded * (len(current) + 1) > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _round_up(n: int) -> int:
    return max(PAD_MULTIPLE, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)


class Scorer:
    """A compiled model plus its tokenizer. ``score`` returns raw logits (one per pair)."""

    def __init__(
        self,
        variant_dir: Path,
        *,
        threads: int = 0,
        pin_threads: bool = False,
        token_budget: int = 4096,
        max_length: int = 0,
        model_format: str | None = None,
    ) -> None:
        import openvino as ov

        self.variant_dir = Path(variant_dir)
        manifest = read_variant_manifest(self.variant_dir)
        fmt = model_format or manifest.get("format") or "openvino"
        model_file = self.variant_dir / MODEL_FILES[fmt]
        if not model_file.is_file():
            raise FileNotFoundError(f"no {MODEL_FILES[fmt]} in {self.variant_dir}")
        model_max = int(manifest.get("max_length") or 512)
        self.max_length = min(max_length, model_max) if max_length else model_max
        self.token_budget = max(token_budget, _round_up(self.max_length))
        self.tokenizer = Tokenizer(self.variant_dir / "tokenizer.json", self.max_length)

        core = ov.Core()
        config: dict = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # bf16 on AMX/AVX512-BF16 Xeons would change scores; parity is promised in f32.
            "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": bool(pin_threads),
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        model = core.read_model(str(model_file))
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = {inp.get_any_name() for inp in self.compiled.inputs}
        self.num_labels = int(self.compiled.outputs[0].get_partial_shape()[-1].get_length())

    # --- scoring -----------------------------------------------------------------------------------------
    def _run(self, encs: Sequence[Encoded]) -> np.ndarray:
        width = _round_up(max(len(e) for e in encs))
        n = len(encs)
        ids = np.full((n, width), self.tokenizer.pad_id, dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for row, e in enumerate(encs):
            k = len(e)
            ids[row, :k] = e.ids
            types[row, :k] = e.type_ids
            mask[row, :k] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = types
        out = self.request.infer(feed)
        logits = np.asarray(next(iter(out.values())), dtype=np.float64)
        if self.num_labels == 1:
            return logits[:, 0]
        # Two-label heads: the positive class's logit margin, so sigmoid() gives its softmax probability.
        return logits[:, 1] - logits[:, 0]

    def score_encoded(self, encs: Sequence[Encoded], on_progress=None) -> np.ndarray:
        """Raw logits for every pair, in input order, batched under the token budget."""
        out = np.empty(len(encs), dtype=np.float64)
        if not encs:
            return out
        for batch in plan_microbatches([len(e) for e in encs], self.token_budget):
            out[batch] = self._run([encs[i] for i in batch])
            if on_progress is not None:
                on_progress(len(batch))
        return out

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return self.score_encoded(self.tokenizer.encode_pairs(query, passages))


def configure_process_threads() -> None:
    """Keep helper libraries from spawning their own pools beside OpenVINO's."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
