"""Property tests (hypothesis, a fixed seed, bounded examples) of what the score worker does to text before the
model sees it, against transformers' own tokenizer on the model trained here (issue 31):

- a pair is split exactly as ``tokenizer(q, p, truncation=True, max_length=L)`` does;
- windows are exactly transformers' ``return_overflowing_tokens`` windows (the first n), whenever transformers
  can make them; where it cannot (a query that leaves the passage no more room than the stride: tokenizers
  panics, in Rust), the stride shrinks to half the room and the windows are transformers' with that stride;
- no text at all, odd Unicode included, makes the tokenizer raise, and no pair ever takes more windows than
  asked (tokenizers would build every window of the passage before we kept n);
- a large request's chunks carry every pair exactly once, in order, and the worker reads back what the gate
  wrote; and any JSON body is either a job or a RequestError, nothing else.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from modelkit.trained import make_task

from reranker_ops.front.dispatch import pair_chars, plan_chunks, window_count
from reranker_ops.protocol.api import CHUNK, Limits, RequestError, chunk_body, parse_job
from reranker_ops.worker.engine import Tokenizer

pytestmark = pytest.mark.timeout(600)
PROFILE = settings(max_examples=150, derandomize=True, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pair_tokenizers(trained_model_dir, tmp_path_factory):
    """transformers' tokenizer for the trained model, and ours built from what convert saves of it."""
    from transformers import AutoTokenizer

    from reranker_ops.models.reference import save_effective_tokenizer

    ref = AutoTokenizer.from_pretrained(str(trained_model_dir))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_effective_tokenizer(ref, path)
    return ref, path


TOPICS, FILLERS = make_task(0)
VOCAB = [w for topic in TOPICS for w in topic] + FILLERS + ["борщ", "суп", ",", ".", "!", "😀", "ёЁ", "the"]
ODD = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
words = st.lists(st.sampled_from(VOCAB), max_size=120).map(" ".join)
# what the schema lets through: text with something besides white space in it
texts = st.one_of(words, ODD, st.tuples(words, ODD, words).map(" ".join)).filter(lambda s: s.strip())


def _ids(ref, q: str, p: str, **kw) -> list[tuple[list[int], list[int]]]:
    enc = ref(q, p, return_token_type_ids=True, **kw)
    ids, types = enc["input_ids"], enc["token_type_ids"]
    if ids and isinstance(ids[0], list):
        return list(zip(ids, types))
    return [(ids, types)]


def _ours(encs) -> list[tuple[list[int], list[int]]]:
    return [(e.ids.tolist(), e.type_ids.tolist()) for e in encs]


@PROFILE
@given(q=texts, p=texts, length=st.sampled_from([16, 24, 48, 512]))
def test_a_pair_is_split_like_transformers(pair_tokenizers, q, p, length):
    ref, path = pair_tokenizers
    ours = Tokenizer(path, length)
    [got] = ours.encode_items([(q, p)])
    assert _ours([got]) == _ids(ref, q, p, truncation=True, max_length=length)
    full = len(ref(q, p)["input_ids"])
    assert got.truncated == (full > length)


@PROFILE
@given(q=texts, p=texts, length=st.sampled_from([8, 16, 24, 48, 512]), side=st.sampled_from(["right", "left"]))
@example(q="борода борода борода борода", p="борода борода", length=8, side="right")  # found: only the query cut
def test_a_pair_cut_to_any_length_from_either_end_is_cut_like_transformers(pair_tokenizers, q, p, length, side):
    """A request's own cut (vLLM's truncate_prompt_tokens, TEI's and vLLM's truncation side) is transformers'
    ``truncation=True, max_length=n`` with ``truncation_side``, on a model whose window is larger."""
    ref, path = pair_tokenizers
    ours = Tokenizer(path, 512)
    [got] = ours.encode_items([(q, p)], side=side, max_tokens=length)
    ref.truncation_side = side
    try:
        want = _ids(ref, q, p, truncation=True, max_length=length)
    finally:
        ref.truncation_side = "right"
    assert _ours([got]) == want
    assert got.truncated == (len(ref(q, p)["input_ids"]) > length)


@PROFILE
@given(q=texts, p=texts, length=st.sampled_from([8, 24, 512]), windows=st.integers(1, 4),
       side=st.sampled_from(["right", "left"]))
def test_encode_batch_fast_and_encode_batch_make_the_same_pairs(pair_tokenizers, q, p, length, windows, side):
    """The worker tokenizes with ``encode_batch_fast`` where tokenizers has it (no character offsets) and with
    ``encode_batch`` where it has not: both must give every pair and window the same ids, segments and cut."""
    _ref, path = pair_tokenizers
    tok = Tokenizer(path, length)
    made = {}
    for name in ("encode_batch", "encode_batch_fast"):
        tok._encode = getattr(tok._plain, name)
        made[name] = (_ours(tok.encode_items([(q, p), (q, q)], side=side, max_tokens=length - 1)),
                      [e.truncated for e in tok.encode_items([(q, p)])],
                      _ours(tok.encode_windows([(q, p)], windows, 4)[0]))
    assert made["encode_batch"] == made["encode_batch_fast"]


@PROFILE
@given(q=texts, p=texts, length=st.sampled_from([16, 24, 48]), windows=st.integers(2, 6),
       stride=st.sampled_from([0, 2, 5, 12, 30]))
def test_windows_are_transformers_windows_and_never_more_than_asked(pair_tokenizers, q, p, length, windows, stride):
    ref, path = pair_tokenizers
    ours = Tokenizer(path, length)
    encs, owners = ours.encode_windows([(q, p)], windows, stride)
    assert 1 <= len(encs) <= windows and owners == [0] * len(encs)
    assert all(len(e) <= length for e in encs)
    q_tokens = len(ref(q, add_special_tokens=False)["input_ids"])
    room, used_stride, _used = ours.window_plan(q_tokens, windows, stride)
    if room <= 0:  # the query alone fills the window: one window, truncated like a plain pair
        assert _ours(encs) == _ids(ref, q, p, truncation=True, max_length=length)
        return
    assert used_stride == (stride if stride < room else room // 2)
    want = _ids(ref, q, p, truncation="only_second", max_length=length, stride=used_stride,
                return_overflowing_tokens=True)
    assert _ours(encs) == want[:windows]
    assert encs[-1].truncated == (len(want) > windows)


@PROFILE
@given(q=st.text(max_size=300), p=st.text(max_size=3000), windows=st.integers(1, 8),
       stride=st.integers(0, 600), length=st.sampled_from([8, 16, 64, 512]))
def test_no_text_makes_the_tokenizer_raise(pair_tokenizers, q, p, windows, stride, length):
    """Any text the schema lets through (lone surrogates are refused before: they are not text) and any
    window settings: no exception (a tokenizers panic is a BaseException, so this catches it too)."""
    _ref, path = pair_tokenizers
    q = q.encode("utf-8", "ignore").decode("utf-8")  # the schema refuses lone surrogates with a 422
    p = p.encode("utf-8", "ignore").decode("utf-8")
    ours = Tokenizer(path, length)
    try:
        encs = ours.encode_items([(q, p)])
        wins, _owners = ours.encode_windows([(q, p)], windows, stride)
    except BaseException as exc:  # noqa: BLE001 - what this test is about
        pytest.fail(f"{type(exc).__name__}: {exc}")
    assert len(encs) == 1 and len(encs[0]) <= length
    assert 1 <= len(wins) <= windows and all(len(e) <= length for e in wins)
    # the gate's cost never counts fewer windows than the worker builds
    assert window_count(len(q.encode()), len(p.encode()), windows, length, stride) >= len(wins)


@PROFILE
@given(query=texts, passages=st.lists(texts, min_size=1, max_size=60), chunk_chars=st.integers(100, 2000),
       route=st.sampled_from(["/rerank", "/v1/rerank", "/inference"]), windows=st.integers(1, 4))
def test_chunks_carry_every_pair_once_in_order(query, passages, chunk_chars, route, windows):
    passages = [p or "x" for p in passages]
    query = query.strip() or "q"
    if route == "/inference":
        body = [{"query": f"{query} {i}", "passage": p} for i, p in enumerate(passages)]
    else:
        body = {"query": query, "documents": passages, "windows": windows}
    limits = Limits(max_documents=1000, max_document_chars=100_000, max_windows=8, max_query_chars=100_000)
    job = parse_job(route, json.dumps(body).encode(), limits)
    spans = plan_chunks(job, chunk_chars)
    assert spans[0][0] == 0 and spans[-1][1] == len(passages)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))
    pairs = []
    for start, end in spans:
        raw = chunk_body(job, start, end)
        if route != "/inference":  # the request's one query, once per chunk, not once per pair
            assert json.loads(raw)["q"] == query
        chunk = parse_job(CHUNK, raw, limits)
        assert chunk.extra["offset"] == start and chunk.windows == job.windows
        text = sum(pair_chars(q, p) for q, p in zip(chunk.queries, chunk.passages))
        assert end - start == 1 or text <= chunk_chars
        pairs += list(zip(chunk.queries, chunk.passages))
    assert pairs == list(zip(job.queries, job.passages))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["query", "documents", "top_n", "top_k", "windows", "truncate", "text", "passage",
                         "return_documents", "raw_scores", "model", "x", "texts", "truncation_direction",
                         "return_text", "max_chunks_per_doc", "max_tokens_per_doc", "truncate_prompt_tokens",
                         "truncation_side", "rank_fields"]), children, max_size=6),
    max_leaves=30)


@PROFILE
@given(body=json_values, route=st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank", "/inference", CHUNK]))
def test_any_json_body_is_a_job_or_a_request_error(body, route):
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    try:
        job = parse_job(route, raw, Limits())
    except RequestError as exc:
        assert 400 <= exc.status < 500 and exc.message
        return
    assert len(job.queries) == len(job.passages) >= 1
    assert all(isinstance(x, str) for x in job.queries + job.passages)
    assert 1 <= job.windows <= Limits().max_windows or route == CHUNK


def test_the_stride_panic_request_of_issue_31_is_windows_with_half_the_room(pair_tokenizers):
    """The request that crash-looped the server: 400 one-letter words of query, 200 of passage, windows 2,
    with the server's defaults (512 tokens, stride 128)."""
    ref, path = pair_tokenizers
    ours = Tokenizer(path, 512)
    q, p = " ".join(["a"] * 400), " ".join(["b"] * 200)
    encs, _ = ours.encode_windows([(q, p)], 2, 128)
    q_tokens = len(ref(q, add_special_tokens=False)["input_ids"])
    room, stride, _ = ours.window_plan(q_tokens, 2, 128)
    assert 0 < room <= 128 and stride == room // 2
    assert len(encs) == 2 and all(len(e) == 512 for e in encs)
