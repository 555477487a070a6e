"""The scoring engine's memory measures (issue 14), each checked against OpenVINO itself, in process.

* an INT8 embedding table is gathered before it is dequantized: the same values, bit for bit (the float32
  copy of the whole table it saves on the real export is measured by benchmarks/perf.py);
* the weight file's mapping is released after compile and scores do not change;
* micro-batches respect the attention budget (rows x length²) as well as the token budget;
* OpenVINO's per-shape kernel caches are bounded (``RERANKER_KERNEL_CACHE``): what varied call shapes add to a
  worker's memory levels off (its size on DiTy's shape is measured by benchmarks/shapes.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reranker_ops.worker.engine import (
    ONEDNN_CACHE_ENV,
    RUNTIME_CACHE_KEY,
    Scorer,
    compile_bounded,
    gather_before_dequantize,
    mapped_weight_ranges,
    plan_microbatches,
    release_mapped_weights,
)

pytestmark = pytest.mark.timeout(120)


def _rss_of_mappings(ranges) -> int:
    """KiB resident in the given address ranges, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = any(start >= a and end <= b for a, b in ranges)
        elif head == "Rss:" and inside:
            total += int(line.split()[1])
    return total


def _int8_embedding_model(rows: int, width: int):
    """ids -> Gather(Convert(int8 table) * scale[rows, 1]) -> sum over width: the exported INT8 pattern."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    table = rng.integers(-127, 128, size=(rows, width), dtype=np.int8)
    scale = rng.uniform(0.001, 0.02, size=(rows, 1)).astype(np.float32)
    ids = ops.parameter([-1, -1], np.int64, name="input_ids")
    deq = ops.multiply(ops.convert(ops.constant(table), np.float32), ops.constant(scale))
    emb = ops.gather(deq, ids, ops.constant(np.array(0, dtype=np.int32)))
    out = ops.reduce_sum(ops.multiply(emb, emb), ops.constant(np.array([2], dtype=np.int64)), keep_dims=False)
    return ov.Model([out], [ids], "int8-embedding")


def test_int8_embedding_is_gathered_before_dequantizing_bit_for_bit():
    """The rewrite changes no value. Its memory effect shows on the real INT8 export only (this small graph
    is not folded by the CPU plugin either way): the INT8 tree's PSS after long passages went from 1239 to
    906 MiB with it (perf.py checks the target of 700 MiB)."""
    import openvino as ov

    rows, width = 60_000, 256
    ids = np.random.default_rng(1).integers(0, rows, size=(3, 50)).astype(np.int64)
    core = ov.Core()
    plain, rewritten = _int8_embedding_model(rows, width), _int8_embedding_model(rows, width)
    assert gather_before_dequantize(rewritten) == 1
    plain_out, rewritten_out = (
        core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
        .infer({"input_ids": ids})[0].copy() for m in (plain, rewritten))
    assert np.array_equal(rewritten_out, plain_out)  # a selection commutes with elementwise ops


def test_a_float_embedding_is_left_alone():
    import openvino as ov
    import openvino.opset13 as ops

    table = np.ones((10, 4), dtype=np.float32)
    ids = ops.parameter([-1], np.int64, name="input_ids")
    model = ov.Model([ops.gather(ops.constant(table), ids, ops.constant(np.array(0, dtype=np.int32)))], [ids])
    assert gather_before_dequantize(model) == 0


def test_the_weight_mapping_is_released_and_scores_do_not_change(tiny_fp32):
    scorer = Scorer(tiny_fp32)
    passages = ["борщ это суп из свёклы", "завтра будет дождь", "word " * 40]
    first = scorer.score("как приготовить борщ", passages)
    ranges = mapped_weight_ranges(tiny_fp32)
    assert ranges, "OpenVINO maps the IR's .bin: nothing found to release"
    assert _rss_of_mappings(ranges) > 0
    released = scorer.release_mapped_weights()
    assert released == sum(b - a for a, b in ranges)
    assert _rss_of_mappings(ranges) == 0
    assert np.array_equal(scorer.score("как приготовить борщ", passages), first)
    assert release_mapped_weights([]) == 0


def test_microbatches_respect_the_attention_budget():
    lengths = [512, 512, 512, 256, 256, 256, 256, 256, 40, 40, 40]
    batches = plan_microbatches(lengths, token_budget=4096, attention_budget=512 * 512)
    for b in batches:
        width = max(-(-lengths[i] // 8) * 8 for i in b)
        assert len(b) * width * width <= 512 * 512 or len(b) == 1
        assert len(b) * width <= 4096
    assert [len(b) for b in batches if any(lengths[i] == 512 for i in b)] == [1, 1, 1]
    # 40 x 3 | 256 | 256 x 4 | 512 | 512 | 512: padding three short pairs to 256 costs more than a call
    assert [sorted(lengths[i] for i in b) for b in batches] == [[40] * 3, [256], [256] * 4, [512], [512], [512]]
    # without the attention budget only the token budget splits them
    assert max(len(b) for b in plan_microbatches(lengths, token_budget=4096)) > 4


def test_the_tokenizer_loads_beside_the_compile_and_either_failure_is_reported(tiny_fp32, tmp_path):
    """The tokenizer is read in a thread while OpenVINO compiles. A broken tokenizer fails the load with its own
    error, a broken model with the compile's, and in both cases no loading thread is left behind."""
    import shutil
    import threading

    from reranker_ops.worker.engine import Scorer

    def loading_threads() -> list:
        return [t for t in threading.enumerate() if t.name.startswith("loading")]

    scorer = Scorer(tiny_fp32)
    assert scorer.tokenizer.encode_pairs("q", ["d"]) and not loading_threads()
    bad_tok = tmp_path / "bad-tokenizer"
    shutil.copytree(tiny_fp32, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(Exception) as err:
        Scorer(bad_tok)
    assert "line 1 column" in str(err.value), err.value  # the JSON parser's words, not OpenVINO's
    assert not loading_threads()
    bad_model = tmp_path / "bad-model"
    shutil.copytree(tiny_fp32, bad_model)
    (bad_model / "openvino_model.xml").write_text("<net>", encoding="utf-8")
    with pytest.raises(RuntimeError):
        Scorer(bad_model)
    assert not loading_threads()
    missing = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_fp32, missing)
    (missing / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Scorer(missing)


def test_this_openvino_takes_the_kernel_cache_bound(tiny_fp32):
    """The CPU plugin's shape cache is bounded through a key outside its public list: this OpenVINO must take it
    (a release that drops it fails here, while workers go on with OpenVINO's default), and oneDNN's bound is in
    the environment before its first kernel."""
    scorer = Scorer(tiny_fp32, kernel_cache=64)
    assert scorer.kernel_cache == 64
    assert os.environ[ONEDNN_CACHE_ENV] == "64"  # set, not defaulted: whatever the process inherited
    assert scorer.score("q", ["a", "b c"]).shape == (2,)


class _CoreWithout:
    """An OpenVINO whose CPU plugin does not know the key (a release that dropped it): its compile refuses the
    key as OpenVINO 2026.4 refuses a key it does not know, and records each config it was given."""

    def __init__(self, error: str = f"NotFound: Unsupported property {RUNTIME_CACHE_KEY} by CPU plugin.") -> None:
        self.error = error
        self.configs: list[dict] = []

    def compile_model(self, model, device, config):
        self.configs.append(dict(config))
        if RUNTIME_CACHE_KEY in config:
            raise RuntimeError(self.error)
        return "compiled"


def test_an_openvino_without_the_key_compiles_with_its_own_cache():
    core = _CoreWithout()
    assert compile_bounded(core, "model", {"NUM_STREAMS": 1}, 64) == ("compiled", 0)
    assert core.configs == [{"NUM_STREAMS": 1, RUNTIME_CACHE_KEY: 64}, {"NUM_STREAMS": 1}]
    # any other failure of the compile is the compile's: raised, not hidden behind a second try
    other = _CoreWithout("Exception from src/plugins/intel_cpu: out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        compile_bounded(other, "model", {}, 64)
    assert len(other.configs) == 1


_SWEEP = """
import json, sys
import numpy as np
from reranker_ops.worker.engine import Scorer, trim_heap
sc = Scorer(sys.argv[1], kernel_cache=int(sys.argv[2]), onednn_cache=int(sys.argv[3]))
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
def call(rows, width):
    ids = np.full((rows, width), 5, dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in sc.input_names:
        feed["token_type_ids"] = np.zeros_like(ids)
    sc.request.infer(feed)
call(1, 8)
trim_heap()
base = rss()
shapes = [(r, w) for r in range(1, 17) for w in range(8, 257, 8)][:int(sys.argv[4])]
for rows, width in shapes:
    call(rows, width)
trim_heap()
print(json.dumps(rss() - base))
"""


def test_varied_call_shapes_grow_a_bounded_worker_far_less(tiny_fp32, tmp_path):
    """Each call shape the CPU plugin has run keeps kernels in two caches; a batching server makes most calls
    a shape of their own. The same 400 distinct shapes in a process with the bounds (16 entries each) and in
    one with OpenVINO's own (5000 and oneDNN's 1024), each a fresh process (oneDNN reads its bound once)."""
    script = tmp_path / "sweep.py"
    script.write_text(_SWEEP)
    growth = {}
    for name, (cache, onednn) in {"bounded": (16, 16), "defaults": (5000, 1024)}.items():
        res = subprocess.run([sys.executable, str(script), str(tiny_fp32), str(cache), str(onednn), "400"],
                             capture_output=True, text=True, timeout=100)
        assert res.returncode == 0, res.stderr[-2000:]
        growth[name] = float(res.stdout.strip().splitlines()[-1])
    assert growth["defaults"] > 20, growth  # the sweep does what it is meant to: without bounds memory grows
    assert growth["bounded"] < growth["defaults"] / 3, growth
