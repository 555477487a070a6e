"""The HTTP contract: parse each route's body into one normalised job, and build each route's answer.

Pure functions, no MOSEC, no model: unit tests cover every rule. A bad request raises ``RequestError``
with the status to send (400 undecodable, 422 invalid) and a message that names the field or the limit.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .envelope import Buffer

ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank", "/inference")
ROUTE_TAGS = {route: str(i) for i, route in enumerate(ROUTES)}
CHUNK = "chunk"  # internal: part of a large request the gate split; scored to raw logits, merged by the gate
ROUTE_TAGS[CHUNK] = "C"
TAG_ROUTES = {v: k for k, v in ROUTE_TAGS.items()}


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


TEI = "tei"  # a /rerank body with "texts" and no "documents": text-embeddings-inference's request and answer
EMPTY_TEXTS = "`texts` cannot be empty"  # TEI's one "Empty" error (400); its other 400s are malformed bodies
SIDES = ("right", "left")


@dataclass
class Limits:
    max_documents: int = 1000
    max_document_chars: int = 50_000
    windows: int = 1  # the server's default: windows scored per passage (1 = truncate at the model's window)
    max_windows: int = 8  # the most a request may ask for
    max_query_chars: int = 8192
    # the names a request's "model" may say: the served model's first, then its aliases; empty: any name
    served_models: tuple = ()

    def __post_init__(self) -> None:
        self.served_models = tuple(self.served_models)

    @classmethod
    def from_mapping(cls, m: dict) -> "Limits":
        return cls(max_documents=int(m["max_documents"]), max_document_chars=int(m["max_document_chars"]),
                   windows=int(m["windows"]), max_windows=int(m["max_windows"]),
                   max_query_chars=int(m.get("max_query_chars", cls.max_query_chars)),
                   served_models=tuple(m.get("served_models", ())))

    @property
    def default_windows(self) -> int:
        """What a request that does not ask gets: the server's RERANKER_WINDOWS, within its own cap."""
        return max(1, min(self.windows, self.max_windows))


@dataclass
class Job:
    """One request, normalised. ``queries[i]`` pairs with ``passages[i]``."""

    route: str
    queries: list[str]
    passages: list[str]
    top_n: Optional[int] = None
    return_documents: bool = False
    raw_scores: bool = False
    truncate: bool = True
    model: Optional[str] = None
    windows: int = 1  # > 1: score up to this many overlapping windows of each passage, keep the best
    style: str = ""  # the answer's shape when the route has two: TEI for text-embeddings-inference's
    side: str = "right"  # which end of a too-long text is cut (TEI's truncation_direction, vLLM's truncation_side)
    max_tokens: Optional[int] = None  # the pair cut to at most this many tokens (vLLM's truncate_prompt_tokens)
    doc_tokens: Optional[int] = None  # each document cut to at most this many tokens (Cohere's max_tokens_per_doc)
    originals: Optional[list] = None  # the documents as sent (objects keep their ids and fields), to echo back
    extra: dict = field(default_factory=dict)

    @property
    def options(self) -> dict:
        """The per-request tokenization options, as a chunk carries them (only those not at their default)."""
        out: dict = {}
        if self.side != "right":
            out["side"] = self.side
        if self.style:
            out["style"] = self.style  # a worker's errors for it are in the request's dialect
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        if self.doc_tokens is not None:
            out["doc_tokens"] = self.doc_tokens
        return out


# --------------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------------
def decode_body(data: Buffer) -> Any:
    if not len(data):
        raise RequestError(400, "empty body: send a JSON object")
    try:
        text = str(data, "utf-8")  # bytes, bytearray or a memoryview of the gate's buffer: no copy before this
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError(400, "JSON is nested too deeply") from None
    except ValueError as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None


# A lone UTF-16 surrogate: JSON can spell one ("\\ud800"), Python keeps it in a str, and no UTF-8 encoder
# (the tokenizer's, the answer's) can write it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(name: str, value: Any, limits: Limits, *, allow_empty: bool = False, query: bool = False) -> str:
    if not isinstance(value, str):
        raise RequestError(422, f"{name} must be a string, got {_type(value)}")
    if not allow_empty and not value.strip():
        raise RequestError(422, f"{name} must not be empty")
    if "\x00" in value:
        raise RequestError(422, f"{name} contains a NUL character")
    limit, setting = ((limits.max_query_chars, "RERANKER_MAX_QUERY_CHARS") if query else
                      (limits.max_document_chars, "RERANKER_MAX_DOCUMENT_CHARS"))
    if len(value) > limit:
        raise RequestError(422, f"{name} has {len(value)} characters, over the limit of {limit} ({setting})")
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise RequestError(422, f"{name} contains a lone UTF-16 surrogate (\\u{ord(bad.group()):04x} at character"
                                f" {bad.start()}), which is not text; send valid Unicode")
    return value


def _type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__
    )


def _opt_int(body: dict, *names: str) -> Optional[int]:
    for name in names:
        if name in body and body[name] is not None:
            v = body[name]
            if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = int(v)  # JSON Schema's integer: 3.0 is one (a client's JSON may write it so)
            if isinstance(v, bool) or not isinstance(v, int):
                raise RequestError(422, f"{name} must be an integer, got {_type(v)}")
            if v < 1:
                raise RequestError(422, f"{name} must be at least 1, got {v}")
            return v
    return None


def _opt_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(422, f"{name} must be true or false, got {_type(v)}")
    return v


def _documents(body: dict, limits: Limits, *, allow_objects: bool, name: str = "documents") -> list[str]:
    if name not in body:
        raise RequestError(422, f"{name} is required (a list of strings)")
    docs = body[name]
    if not isinstance(docs, list):
        raise RequestError(422, f"{name} must be a list, got {_type(docs)}")
    if not docs:
        raise RequestError(422, f"{name} must not be empty")
    if len(docs) > limits.max_documents:
        raise RequestError(
            422,
            f"{len(docs)} documents, over the limit of {limits.max_documents} per request (RERANKER_MAX_DOCUMENTS)",
        )
    fields = _rank_fields(body) if allow_objects else None
    out = []
    for i, d in enumerate(docs):
        if allow_objects and isinstance(d, dict):
            d = _object_text(d, i, fields, limits)
        out.append(_check_text(f"{name}[{i}]", d, limits))
    return out


def _rank_fields(body: dict) -> Optional[list[str]]:
    """Cohere v1's ``rank_fields``: which fields of object documents are scored, in that order."""
    fields = body.get("rank_fields")
    if fields is None:
        return None
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f for f in fields):
        raise RequestError(422, "rank_fields must be a non-empty list of field names")
    return fields


def _object_text(doc: dict, i: int, fields: Optional[list[str]], limits: Limits) -> Any:
    """The text scored for an object document: its ``text``, or with ``rank_fields`` those of its fields as
    ``name: value`` lines, in the order given (as Cohere turns an object into text; a value that is not text is
    written as JSON). Fields it lacks are skipped; one with none of them is scored by its ``text``, so every
    document the API's schema allows (an object with a text) is scored."""
    lines = []
    for f in fields or ():
        if f in doc:
            value = doc[f]
            if not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False)
            lines.append(f"{f}: {value}")
    if lines:
        return "\n".join(lines)
    if "text" not in doc:
        raise RequestError(422, f"documents[{i}] is an object without 'text'"
                                + (f" or any of the rank_fields {fields}" if fields else " (or send rank_fields)"))
    return doc["text"]


def parse_chunk(data: Buffer) -> Job:
    """A chunk the gate made from a request it validated: ``{"q": query or [queries], "p": [...], "truncate",
    "windows", "offset"}``. A request's one query is sent once per chunk, not once per pair."""
    body = decode_body(data)
    try:
        queries, passages = body["q"], body["p"]
        if isinstance(queries, str) and isinstance(passages, list):
            queries = [queries] * len(passages)  # the same str object: no copy of the query per pair
        ok = (isinstance(queries, list) and isinstance(passages, list) and len(queries) == len(passages)
              and all(isinstance(x, str) for x in queries + passages))
        windows, offset = int(body.get("windows", 1)), int(body.get("offset", 0))
        side = body.get("side", "right")
        style = body.get("style", "")
        max_tokens = None if body.get("max_tokens") is None else int(body["max_tokens"])
        doc_tokens = None if body.get("doc_tokens") is None else int(body["doc_tokens"])
        ok = ok and side in SIDES and style in ("", TEI)
    except (TypeError, KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise RequestError(400, "malformed chunk")
    return Job(route=CHUNK, queries=queries, passages=passages, truncate=bool(body.get("truncate", True)),
               windows=windows, side=side, style=style, max_tokens=max_tokens, doc_tokens=doc_tokens,
               extra={"offset": offset})


def chunk_body(job: Job, start: int, end: int) -> bytes:
    """The body of the chunk of ``job``'s pairs ``start:end`` (see ``parse_chunk``), built when it is sent."""
    same = job.extra.get("one_query", False)
    queries: Any = job.queries[start] if same else job.queries[start:end]
    return json.dumps({"q": queries, "p": job.passages[start:end], "truncate": job.truncate,
                       "windows": job.windows, "offset": start, **job.options}, ensure_ascii=False).encode("utf-8")


WINDOW_KEYS = ("windows", "max_chunks_per_doc")  # the names a request asks for windows by (``_windows``)
_WINDOW_KEYS_RAW = tuple(b'"%s"' % key.encode() for key in WINDOW_KEYS)


def asks_for_windows(raw: bytes | bytearray) -> bool:
    """Whether a body may ask for windows, read from its bytes without parsing it (a key, or a text that
    happens to hold one: then the body is parsed for nothing, never costed short)."""
    return any(key in raw for key in _WINDOW_KEYS_RAW)


def _windows(body: dict, limits: Limits) -> int:
    """``"windows": n`` (1 to the server's RERANKER_MAX_WINDOWS), or the server's RERANKER_WINDOWS. Cohere v1's
    ``max_chunks_per_doc`` is the same number under Cohere's name: it is at most what a client allows, so one
    above the server's cap gets the cap, not an error."""
    n = _opt_int(body, WINDOW_KEYS[0])
    if n is None:
        chunks = _opt_int(body, WINDOW_KEYS[1])
        return limits.default_windows if chunks is None else min(chunks, limits.max_windows)
    if n > limits.max_windows:
        raise RequestError(422, f"windows is {n}, over the limit of {limits.max_windows} per passage"
                                " (RERANKER_MAX_WINDOWS)")
    return n


def _side(body: dict, *names: str) -> str:
    """Which end of a too-long text is cut: TEI's ``truncation_direction``, vLLM's ``truncation_side``."""
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if not isinstance(v, str) or v.lower() not in SIDES:
            raise RequestError(422, f"{name} must be \"right\" or \"left\", got {json.dumps(v)[:40]}")
        return v.lower()
    return "right"


def _model(body: dict, limits: Limits) -> Optional[str]:
    """The ``model`` a request names: one of the served names (the model's, or an alias), else 404."""
    model = body.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise RequestError(422, f"model must be a string, got {_type(model)}")
    if limits.served_models and model not in limits.served_models:
        raise RequestError(404, f"model {model[:200]!r} is not served here; served: "
                                f"{', '.join(limits.served_models)} (RERANKER_MODEL_ALIASES adds names)")
    return model


def _tokens_cap(body: dict, name: str) -> Optional[int]:
    """vLLM's ``truncate_prompt_tokens`` (-1: the model's maximum) or Cohere's ``max_tokens_per_doc``."""
    v = body.get(name)
    if v == -1 and name == "truncate_prompt_tokens":
        return None
    return _opt_int(body, name)


def parse_job(route: str, data: Buffer, limits: Limits) -> Job:
    if route == CHUNK:
        return parse_chunk(data)
    body = decode_body(data)
    if route == "/inference":
        return _parse_inference(body, limits)
    if not isinstance(body, dict):
        raise RequestError(422, f"body must be a JSON object, got {_type(body)}")
    if route == "/rerank" and "texts" in body and "documents" not in body:  # as tei_shaped reads the bytes
        return _parse_tei(body, limits)
    if "query" not in body:
        raise RequestError(422, "query is required (a string)")
    query = _check_text("query", body["query"], limits, query=True)
    model = _model(body, limits)
    common = dict(route=route, return_documents=_opt_bool(body, "return_documents", False),
                  truncate=_opt_bool(body, "truncate", True), model=model, windows=_windows(body, limits),
                  side=_side(body, "truncation_side"), max_tokens=_tokens_cap(body, "truncate_prompt_tokens"),
                  doc_tokens=_tokens_cap(body, "max_tokens_per_doc"), extra={"one_query": True})
    if route == "/rerank":
        docs = _documents(body, limits, allow_objects=False)
        return Job(queries=[query] * len(docs), passages=docs, top_n=_opt_int(body, "top_k", "top_n"),
                   raw_scores=_opt_bool(body, "raw_scores", False), **common)
    docs = _documents(body, limits, allow_objects=True)
    objects = body["documents"] if any(isinstance(d, dict) for d in body["documents"]) else None
    return Job(queries=[query] * len(docs), passages=docs, top_n=_opt_int(body, "top_n"), originals=objects, **common)


def tei_shaped(route: str, raw: bytes | bytearray, start: int = 0) -> bool:
    """The rule ``parse_job`` applies to the parsed body ("texts", no "documents"), read from the bytes from
    ``start`` on, so the gate answers even a body it never parses in the shape its client reads. In place (no
    copy of the body), and "documents" first: the common shapes stop at their first key, not after the body."""
    return route == "/rerank" and raw.find(b'"documents"', start) < 0 and raw.find(b'"texts"', start) >= 0


def _parse_tei(body: dict, limits: Limits) -> Job:
    """text-embeddings-inference's ``POST /rerank``: ``{"query", "texts", "truncate", "truncation_direction",
    "raw_scores", "return_text"}``, answered as TEI answers (a bare list, best first). ``truncate`` unset is
    the server's default, which truncates (``/info``'s ``auto_truncate``); false: a text over the window is
    refused (422), as TEI refuses it."""
    texts = body.get("texts")
    if isinstance(texts, list) and not texts:
        raise RequestError(400, EMPTY_TEXTS)
    if isinstance(texts, list) and len(texts) > limits.max_documents:
        raise RequestError(422, f"batch size {len(texts)} > maximum allowed batch size {limits.max_documents}")
    if "query" not in body:
        raise RequestError(422, "query is required (a string)")
    query = _check_text("query", body["query"], limits, query=True)
    docs = _documents(body, limits, allow_objects=False, name="texts")
    truncate = body.get("truncate")
    return Job(route="/rerank", queries=[query] * len(docs), passages=docs, style=TEI,
               return_documents=_opt_bool(body, "return_text", False), raw_scores=_opt_bool(body, "raw_scores", False),
               truncate=True if truncate is None else _opt_bool(body, "truncate", True),
               model=_model(body, limits), windows=_windows(body, limits), side=_side(body, "truncation_direction"),
               extra={"one_query": True})


def _parse_inference(body: Any, limits: Limits) -> Job:
    if not isinstance(body, list):
        raise RequestError(422, f"body must be a list of {{query, passage}} objects, got {_type(body)}")
    if not body:
        raise RequestError(422, "the list of pairs must not be empty")
    if len(body) > limits.max_documents:
        raise RequestError(
            422, f"{len(body)} pairs, over the limit of {limits.max_documents} per request (RERANKER_MAX_DOCUMENTS)"
        )
    queries, passages = [], []
    for i, item in enumerate(body):
        if not isinstance(item, dict):
            raise RequestError(422, f"[{i}] must be an object with query and passage, got {_type(item)}")
        for key in ("query", "passage"):
            if key not in item:
                raise RequestError(422, f"[{i}].{key} is required")
        queries.append(_check_text(f"[{i}].query", item["query"], limits, query=True))
        passages.append(_check_text(f"[{i}].passage", item["passage"], limits))
    return Job(route="/inference", queries=queries, passages=passages, windows=limits.default_windows)


# --------------------------------------------------------------------------------------------------------
# answers
# --------------------------------------------------------------------------------------------------------
def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def build_response(job: Job, logits: Sequence[float], tokens: int, model_name: str, windows: int = 0,
                   truncated: int = 0) -> Any:
    """``windows``: how many model windows were scored (one per pair unless the job asked for windows);
    ``truncated``: how many documents were cut (the rest of them not scored), which the answer says."""
    windows = windows or len(logits)
    if job.route == CHUNK:
        return {"logits": [float(x) for x in logits], "tokens": tokens, "windows": windows, "truncated": truncated}
    probs = [_sigmoid(float(x)) for x in logits]
    if job.route == "/inference":
        return probs
    scores = [float(x) for x in logits] if job.raw_scores else probs
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if job.style == TEI:  # a bare list, best first (TEI has no top_n)
        return [{"index": i, "score": scores[i], **({"text": job.passages[i]} if job.return_documents else {})}
                for i in order]
    if job.top_n is not None:
        order = order[: job.top_n]
    rid = uuid.uuid4().hex
    usage = {"windows": windows, "truncated_documents": truncated}
    if job.route == "/rerank":
        results = []
        for i in order:
            r: dict = {"index": i, "relevance_score": scores[i]}
            if job.return_documents:
                r["document"] = job.passages[i]
            results.append(r)
        return {
            "object": "rerank",
            "id": rid,
            "created": int(time.time()),
            "model": model_name,
            "scores": scores,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, **usage},
        }
    results = []
    for i in order:
        r = {"index": i, "relevance_score": scores[i]}
        if job.return_documents:
            original = job.originals[i] if job.originals is not None else None
            # an object document comes back as it was sent (its id and fields), a text one as {"text"}
            r["document"] = original if isinstance(original, dict) else {"text": job.passages[i]}
        results.append(r)
    version = "1" if job.route == "/v1/rerank" else "2"
    return {
        "id": rid,
        "model": model_name,
        "results": results,
        "meta": {
            "api_version": {"version": version},
            "billed_units": {"search_units": 1},
            "tokens": {"input_tokens": tokens, "output_tokens": 0},
            **({"warnings": [f"{truncated} document(s) were longer than the model's window and were truncated"]}
               if truncated else {}),
        },
        "usage": {"total_tokens": tokens, **usage},
    }
