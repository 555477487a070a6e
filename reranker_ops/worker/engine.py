"""Tokenize and score query/passage pairs with a converted model.

This is the one scoring path: MOSEC workers, the parity check after conversion and the in-process ceiling
benchmark all go through it. It imports ``openvino``, ``tokenizers`` and ``numpy`` only.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..protocol.manifest import read_variant_manifest

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


def longest_first(n_query: int, n_passage: int, budget: int) -> tuple[int, int]:
    """How many tokens of each text a pair keeps within ``budget``: tokenizers' ``longest_first`` rule (the
    shorter text whole if it fits in half, the longer gets the rest; else half each)."""
    if n_query + n_passage <= budget:
        return n_query, n_passage
    swap = n_query > n_passage
    n1, n2 = (n_passage, n_query) if swap else (n_query, n_passage)
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    return (n2, n1) if swap else (n1, n2)


class Tokenizer:
    """A ``tokenizers`` tokenizer that splits pairs exactly like transformers' ``tokenizer(q, p, truncation=True)``,
    with every input bounded before the tokenizer's native code sees it.

    Each query and each passage is tokenized alone, once (a request's query once for all its documents, not
    once per pair), then joined by the tokenizer's own ``post_process``: truncation (``longest_first``, as
    transformers' ``truncation=True``) and the post-processor's special tokens and segment ids. That is the
    very pipeline ``encode(q, p)`` runs, without tokenizing the query again for every document.
    """

    def __init__(self, tokenizer_json: Path, max_length: int) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(tokenizer_json))
        self._tok.no_padding()
        self.max_length = max_length
        # longest_first is what transformers uses for truncation=True on a pair.
        self._tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        self._plain = _Tok.from_str(self._tok.to_str())  # sequences alone, whole; windows joined untruncated
        self._plain.no_truncation()
        self._plain.no_padding()
        self.pair_specials = self._plain.num_special_tokens_to_add(True)
        # tokenizers >= 0.20 has encode_batch_fast: the same ids without the character offsets, which nothing
        # here reads; a fifth to a quarter less time a text (benchmarks/HISTORY.md). Older ones: encode_batch.
        self._encode = getattr(self._plain, "encode_batch_fast", self._plain.encode_batch)
        pad_id = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else int(pad_id)

    def _alone(self, texts: Sequence[str]) -> list:
        return self._encode(list(texts), add_special_tokens=False)

    def _queries(self, queries: Sequence[str]) -> list:
        """Each query's tokens, tokenizing each distinct query once."""
        distinct = list(dict.fromkeys(queries))
        by_text = dict(zip(distinct, self._alone(distinct)))
        return [by_text[q] for q in queries]

    def _joined(self, tok, q, p, truncated: bool) -> Encoded:
        e = tok.post_process(q, p)
        return Encoded(np.asarray(e.ids, dtype=np.int64), np.asarray(e.type_ids, dtype=np.int64), truncated)

    def encode_items(self, pairs: Iterable[tuple[str, str]], *, side: str = "right", max_tokens: Optional[int] = None,
                     doc_tokens: Optional[int] = None) -> list[Encoded]:
        """Each pair joined and cut to the model's window as transformers cuts it. A request may ask for less:
        ``max_tokens`` for the pair, ``doc_tokens`` for the passage alone, and ``side`` says which end of a
        text is cut (the same longest-first rule, from the left)."""
        pairs = list(pairs)
        queries = self._queries([q for q, _ in pairs])
        passages = self._alone([p for _, p in pairs])
        limit = self.max_length - self.pair_specials
        if side == "right" and max_tokens is None and doc_tokens is None:
            return [self._joined(self._tok, q, p, len(q) + len(p) > limit) for q, p in zip(queries, passages)]
        budget = max(1, min(limit, (max_tokens or self.max_length) - self.pair_specials))
        out = []
        for q, p in zip(queries, passages):
            cut = False
            if doc_tokens is not None and len(p) > doc_tokens:
                p.truncate(doc_tokens, direction=side)
                cut = True
            nq, np_ = longest_first(len(q), len(p), budget)
            if nq < len(q):
                q = type(q).merge([q])  # a copy: the query's tokens are shared by every pair of the request
                q.truncate(nq, direction=side)
                cut = True
            if np_ < len(p):
                p.truncate(np_, direction=side)
                cut = True
            out.append(self._joined(self._plain, q, p, cut))
        return out

    def encode_pairs(self, query: str, passages: Sequence[str]) -> list[Encoded]:
        return self.encode_items([(query, p) for p in passages])

    def window_plan(self, query_tokens: int, windows: int, stride: int) -> tuple[int, int, int]:
        """(room, stride, passage tokens used) of ``windows`` windows beside a query of ``query_tokens``: room is
        the passage's share of a window; 0 when the query alone fills it (then one truncated window)."""
        room = self.max_length - query_tokens - self.pair_specials
        if room <= 0 or windows <= 1:
            return max(0, room), 0, max(0, room)
        # tokenizers asserts stride < room (a Rust panic, not an exception, and transformers stops the same
        # way): a query that leaves less room than the stride gets windows overlapping by half their room
        if stride >= room:
            stride = room // 2
        return room, stride, room + (windows - 1) * (room - stride)

    def encode_windows(self, pairs: Sequence[tuple[str, str]], windows: int, stride: int,
                       doc_tokens: Optional[int] = None) -> tuple[list[Encoded], list[int]]:
        """Up to ``windows`` overlapping windows of each pair's passage, each with the whole query, exactly as
        transformers makes them: ``tokenizer(q, p, truncation="only_second", max_length=L, stride=S,
        return_overflowing_tokens=True)``, first ``windows`` of them. Returns the windows and, for each, the index
        of its pair. A window's ``truncated`` says the passage went on past the last window kept.

        Bounded before the tokenizer builds anything: the passage is cut to the tokens ``windows`` windows can
        hold first (tokenizers would otherwise build every window of it, one per stride step, and keep them
        all), and a query that leaves less room than the stride shrinks the stride (``window_plan``). A query
        too long to leave any room for the passage gets one window truncated like ``encode_items``.
        """
        queries = self._queries([q for q, _ in pairs])
        passages = self._alone([p for _, p in pairs])
        encs: list[Encoded] = []
        owners: list[int] = []
        limit = self.max_length - self.pair_specials
        for i, (q, p) in enumerate(zip(queries, passages)):
            if doc_tokens is not None and len(p) > doc_tokens:
                p.truncate(doc_tokens)  # the document as the request allows it, then its windows
            room, step_overlap, used = self.window_plan(len(q), windows, stride)
            if room <= 0:
                encs.append(self._joined(self._tok, q, p, len(q) + len(p) > limit))
                owners.append(i)
                continue
            more = len(p) > used
            if more:
                p.truncate(used)  # the tokens no window uses go to p.overflowing, never looked at
            if len(p) > room:
                p.truncate(room, stride=step_overlap)  # p.overflowing: now the windows after the first
                parts = [p, *p.overflowing]
            else:
                parts = [p]
            for k, part in enumerate(parts):
                encs.append(self._joined(self._plain, q, part, more and k == len(parts) - 1))
                owners.append(i)
        return encs, owners


# The cost of one OpenVINO call of ``rows`` pairs padded to ``width`` tokens, in units of one token's dense
# layers: CALL_COST_TOKENS + rows * width * (1 + width / ATTENTION_TOKENS). Fitted by
# benchmarks/plan_cost.py on DiTy's shape (the fit and its error are in benchmarks/HISTORY.md): a call's fixed
# cost is worth ~14 tokens, and attention adds a per-token share that grows with the width. Only these ratios
# matter, and they decide one thing: whether pairs of different lengths are cheaper in one call (padding the
# shorter) or in several.
CALL_COST_TOKENS = 14.0
ATTENTION_TOKENS = 2048.0


def call_cost(rows, width: int, call_tokens: float = CALL_COST_TOKENS):
    """The modelled cost of one call of ``rows`` pairs padded to ``width`` tokens (``rows`` may be an array);
    ``call_tokens``: a call's price in tokens, for benchmarks/plan_cost.py's other prices."""
    return call_tokens + rows * (width * (1.0 + width / ATTENTION_TOKENS))


def plan_microbatches(lengths: Sequence[int], token_budget: int, attention_budget: int = 0,
                      call_tokens: float = CALL_COST_TOKENS) -> list[list[int]]:
    """Group pair indices into OpenVINO calls at the least modelled cost, each call within two budgets:
    rows x padded length <= ``token_budget`` (activations grow with tokens) and, when set,
    rows x padded length² <= ``attention_budget`` (attention scores grow with the square of the length:
    eight 512-token rows hold 8 x 12 heads x 512² floats per attention tensor, and an INT8 model keeps
    several of them). A pair over a budget alone is a call of one.

    Pairs are sorted by length and cut into runs; which cuts is an exact dynamic programme over the sorted
    order (a call's cost depends only on its size and its longest pair, see call_cost). Filling each
    call up to the budgets instead pads short pairs to the longest of a run: with a few requests in the pool
    that was 8-14 % of the compute for ``rag`` pairs and 50-70 % for one-line ones. ``call_tokens``: a call's
    price in tokens (``call_cost``).
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    best = np.zeros(n + 1)  # best[j]: least cost of the j shortest pairs
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = _round_up(lengths[order[j - 1]])  # the longest of any run that ends at j
        rows_max = token_budget // width
        if attention_budget > 0:
            rows_max = min(rows_max, attention_budget // (width * width))
        first = max(0, j - max(1, rows_max))
        rows = np.arange(j - first, 0, -1)  # the run order[i:j] for i = first .. j-1
        cost = best[first:j] + call_cost(rows, width, call_tokens)
        k = int(np.argmin(cost))
        best[j] = cost[k]
        cut[j] = first + k
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    batches.reverse()
    return batches


def plan_cost(lengths: Sequence[int], batches: Sequence[Sequence[int]], call_tokens: float = CALL_COST_TOKENS) -> float:
    """The modelled cost of a plan, for benchmarks and tests."""
    return sum(call_cost(len(b), _round_up(max(lengths[i] for i in b)), call_tokens) for b in batches)


def _round_up(n: int) -> int:
    return max(PAD_MULTIPLE, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)


# OpenVINO's CPU plugin keeps what it built for each call shape (rows x padded width) it has run: executors in
# its own cache (CPU_RUNTIME_CACHE_CAPACITY, 5000 entries unless told; an entry is one node's, so one shape takes
# many) and kernels in oneDNN's (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024). Batching makes most calls a shape of
# their own: with OpenVINO's defaults a worker (INT8, DiTy's width, 3 layers) grew by 361 MiB over 450 distinct
# shapes and was still growing; with 1024 entries in each, by 118 MiB, levelling off (benchmarks/shapes.py,
# benchmarks/HISTORY.md). Smaller bounds save more but compile again the shapes steady traffic repeats (256 in
# each halved the speed in one run), and a smaller oneDNN cache alone is worse than none: the kernels it evicts
# stay held by the plugin's executors (477 MiB over 300 shapes).
KERNEL_CACHE = 1024
# A call's budgets (``plan_microbatches``), the defaults of every Scorer and of the ceiling; RERANKER_TOKEN_BUDGET
# and RERANKER_ATTENTION_BUDGET give the server's. A worker keeps OpenVINO's buffers for the largest call it has run,
# and calls past ~1000 tokens are no faster (benchmarks/HISTORY.md, "Quiet batching on, token budget 1024").
TOKEN_BUDGET = 1024
ATTENTION_BUDGET = 512 * 512
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's documented setting, read once per process
RUNTIME_CACHE_KEY = "CPU_RUNTIME_CACHE_CAPACITY"  # the CPU plugin's own key; not in its public list (2026.4)


def compile_bounded(core, model, config: dict, kernel_cache: int) -> tuple:
    """The model compiled with the CPU plugin's shape cache bounded to ``kernel_cache`` entries, and that bound;
    an OpenVINO that does not know the key is compiled without it (bound 0: its default), since the key is
    not a public property and a release may drop it."""
    try:
        return core.compile_model(model, "CPU", {**config, RUNTIME_CACHE_KEY: int(kernel_cache)}), int(kernel_cache)
    except RuntimeError as exc:
        if RUNTIME_CACHE_KEY not in str(exc):
            raise
    return core.compile_model(model, "CPU", config), 0


class Scorer:
    """A compiled model plus its tokenizer. ``score`` returns raw logits (one per pair)."""

    def __init__(
        self,
        variant_dir: Path,
        *,
        threads: int = 0,
        pin_threads: bool = False,
        token_budget: int = TOKEN_BUDGET,
        attention_budget: int = ATTENTION_BUDGET,
        max_length: int = 0,
        model_format: str | None = None,
        kernel_cache: int = KERNEL_CACHE,
        onednn_cache: int | None = None,
    ) -> None:
        """``kernel_cache`` bounds both per-shape caches; ``onednn_cache`` gives oneDNN's its own bound (the
        benchmarks that measure them apart: the server sets both from RERANKER_KERNEL_CACHE)."""
        self.variant_dir = Path(variant_dir)
        manifest = read_variant_manifest(self.variant_dir)
        fmt = model_format or manifest.get("format") or "openvino"
        model_file = self.variant_dir / MODEL_FILES[fmt]
        if not model_file.is_file():
            raise FileNotFoundError(f"no {MODEL_FILES[fmt]} in {self.variant_dir}")
        model_max = int(manifest.get("max_length") or 512)
        self.max_length = min(max_length, model_max) if max_length else model_max
        self.token_budget = max(token_budget, _round_up(self.max_length))
        self.attention_budget = attention_budget
        # The tokenizer loads in a thread while OpenVINO is imported and compiles (compile_model releases the
        # GIL, and mostly keeps one core busy): the tokenizer's load leaves the path of every start, the more
        # so with DiTy's own large vocabulary.
        tokenizer_json = self.variant_dir / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {self.variant_dir}")
        from concurrent.futures import ThreadPoolExecutor  # imported by openvino anyway

        # leaving the block joins the thread, also when the compile fails (its error is then the one raised)
        with ThreadPoolExecutor(1, thread_name_prefix="loading") as pool:
            loading = pool.submit(Tokenizer, tokenizer_json, self.max_length)
            self._compile(model_file, manifest, threads, pin_threads, kernel_cache,
                          kernel_cache if onednn_cache is None else onednn_cache)
        self.tokenizer: Tokenizer = loading.result()

    def _compile(self, model_file: Path, manifest: dict, threads: int, pin_threads: bool, kernel_cache: int,
                 onednn_cache: int) -> None:
        # before OpenVINO's first kernel: oneDNN reads its cache's capacity once, per process. Set, not defaulted:
        # a worker inherits its parent's environment, and the setting is what says
        os.environ[ONEDNN_CACHE_ENV] = str(onednn_cache)
        import openvino as ov

        core = ov.Core()
        # f32 unless the variant was made to compute in bf16 (its own fidelity record says what that costs):
        # OpenVINO's default on AMX/AVX512-BF16 Xeons is bf16, which would change every score silently.
        self.inference_precision = str(manifest.get("inference_precision") or "f32")
        config: dict = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": self.inference_precision,
            "ENABLE_CPU_PINNING": bool(pin_threads),
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        model = core.read_model(str(model_file))
        gather_before_dequantize(model)
        self.compiled, self.kernel_cache = compile_bounded(core, model, config, kernel_cache)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: str() is "<Type: 'bfloat16'>"
        got = (hint.to_string() if hasattr(hint, "to_string") else str(hint)).lower()
        if self.inference_precision == "bf16" and got not in ("bf16", "bfloat16"):
            # OpenVINO falls back to f32 without a word on a CPU without bf16: refuse rather than pretend
            raise RuntimeError(f"this CPU cannot compute in bf16 (OpenVINO compiled {got}); serve fp32 or int8")
        self.request = self.compiled.create_infer_request()
        self.input_names = {inp.get_any_name() for inp in self.compiled.inputs}
        self.num_labels = int(self.compiled.outputs[0].get_partial_shape()[-1].get_length())
        self._weight_ranges: list[tuple[int, int]] | None = None

    def release_mapped_weights(self) -> int:
        """See :func:`release_mapped_weights`; call after the first inference (which finishes repacking).
        The mappings do not move once the model is compiled, so they are looked up once."""
        if self._weight_ranges is None:
            self._weight_ranges = mapped_weight_ranges(self.variant_dir)
        return release_mapped_weights(self._weight_ranges)

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
        for batch in plan_microbatches([len(e) for e in encs], self.token_budget, self.attention_budget):
            out[batch] = self._run([encs[i] for i in batch])
            if on_progress is not None:
                on_progress(len(batch))
        return out

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return self.score_encoded(self.tokenizer.encode_pairs(query, passages))


def best_of_windows(logits: np.ndarray, owners: Sequence[int], n: int) -> np.ndarray:
    """The highest logit of each pair's windows (``owners[k]`` is window k's pair)."""
    out = np.full(n, -np.inf, dtype=np.float64)
    np.maximum.at(out, np.asarray(owners, dtype=np.int64), logits)
    return out


MADV_DONTNEED = 4


def gather_before_dequantize(model) -> int:
    """Rewrite ``Gather(Multiply(Convert(int8 table), scale[rows, 1]), ids)`` as
    ``Multiply(Convert(Gather(int8 table, ids)), Gather(scale, ids))``. Returns how many were rewritten.

    INT8 variants keep their embedding tables as int8 with a scale per row. Left as exported, the CPU
    plugin folds the dequantization into a float32 copy of the whole table when it compiles (367 MB for
    DiTy's 119 547 x 768 vocabulary), although a request only reads a few hundred rows. Gathering first
    picks the same int8 values and the same scales, and Convert and Multiply are elementwise, so every
    value the encoder sees is the same, bit for bit.
    """
    import openvino.opset13 as ops

    rewritten = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Gather" or node.get_attributes().get("batch_dims", 0) != 0:
            continue
        mul = node.input_value(0).get_node()
        axis = node.input_value(2).get_node()
        if mul.get_type_name() != "Multiply" or axis.get_type_name() != "Constant":
            continue
        if [int(x) for x in axis.get_data().reshape(-1)] != [0]:
            continue
        convert, scale = (mul.input_value(i).get_node() for i in (0, 1))
        if convert.get_type_name() != "Convert" or scale.get_type_name() != "Constant":
            continue
        table = convert.input_value(0).get_node()
        if table.get_type_name() != "Constant" or table.get_element_type().get_type_name() not in ("i8", "u8"):
            continue
        rows = table.get_shape()[0]
        scale_shape = list(scale.get_shape())
        if len(table.get_shape()) != 2 or scale_shape not in ([rows, 1], [1, 1], [1], []):
            continue
        ids = node.input_value(1)
        zero = ops.constant(np.array(0, dtype=np.int32))
        values = ops.convert(ops.gather(table.output(0), ids, zero), convert.get_output_element_type(0))
        factor = ops.gather(scale.output(0), ids, zero) if scale_shape == [rows, 1] else scale.output(0)
        out = ops.multiply(values, factor)
        out.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(out.output(0))
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def mapped_weight_ranges(directory: Path) -> list[tuple[int, int]]:
    """The read-only mappings of weight files (``*.bin``) under ``directory`` in this process."""
    root = str(Path(directory).resolve())
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "w" in fields[1]:
            continue  # only read-only mappings: nothing of ours can be lost
        path = fields[5].strip()
        if path.startswith(root + "/") and path.endswith(".bin"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_mapped_weights(ranges: Sequence[tuple[int, int]]) -> int:
    """Drop this process's page-table entries for read-only weight mappings (see ``mapped_weight_ranges``).

    OpenVINO maps the IR's ``.bin`` (``ENABLE_MMAP``) and reads every page of it while compiling: the CPU
    plugin repacks the encoder's matrices into its own memory and only the embedding table is used from
    the mapping afterwards, a few rows at a time. Without this the worker's PSS counts the whole file as
    well as the repacked copy. ``MADV_DONTNEED`` on a read-only file mapping is lossless: the kernel keeps
    the pages in its page cache (shared by every worker, reclaimable) and maps one back in on the next
    touch. Returns the bytes of mapping released.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    return sum(end - start for start, end in ranges if libc.madvise(start, end - start, MADV_DONTNEED) == 0)


def trim_heap() -> bool:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim``); False where unavailable."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, loaded once (the score worker trims every few seconds)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if hasattr(libc, "madvise"):
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def configure_process_threads() -> None:
    """Keep helper libraries from spawning their own pools beside OpenVINO's."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
