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


@dataclass
class Limits:
    max_documents: int = 1000
    max_document_chars: int = 50_000
    windows: int = 1  # the server's default: windows scored per passage (1 = truncate at the model's window)
    max_windows: int = 8  # the most a request may ask for
    max_query_chars: int = 8192

    @classmethod
    def from_mapping(cls, m: dict) -> "Limits":
        return cls(max_documents=int(m["max_documents"]), max_document_chars=int(m["max_document_chars"]),
                   windows=int(m["windows"]), max_windows=int(m["max_windows"]),
                   max_query_chars=int(m.get("max_query_chars", cls.max_query_chars)))

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
    extra: dict = field(default_factory=dict)


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


def _documents(body: dict, limits: Limits, *, allow_objects: bool) -> list[str]:
    if "documents" not in body:
        raise RequestError(422, "documents is required (a list of strings)")
    docs = body["documents"]
    if not isinstance(docs, list):
        raise RequestError(422, f"documents must be a list, got {_type(docs)}")
    if not docs:
        raise RequestError(422, "documents must not be empty")
    if len(docs) > limits.max_documents:
        raise RequestError(
            422,
            f"{len(docs)} documents, over the limit of {limits.max_documents} per request (RERANKER_MAX_DOCUMENTS)",
        )
    out = []
    for i, d in enumerate(docs):
        if allow_objects and isinstance(d, dict):
            if "text" not in d:
                raise RequestError(422, f"documents[{i}] is an object without 'text'")
            d = d["text"]
        out.append(_check_text(f"documents[{i}]", d, limits))
    return out


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
    except (TypeError, KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise RequestError(400, "malformed chunk")
    return Job(route=CHUNK, queries=queries, passages=passages, truncate=bool(body.get("truncate", True)),
               windows=windows, extra={"offset": offset})


def chunk_body(job: Job, start: int, end: int) -> bytes:
    """The body of the chunk of ``job``'s pairs ``start:end`` (see ``parse_chunk``), built when it is sent."""
    same = job.extra.get("one_query", False)
    queries: Any = job.queries[start] if same else job.queries[start:end]
    return json.dumps({"q": queries, "p": job.passages[start:end], "truncate": job.truncate,
                       "windows": job.windows, "offset": start}, ensure_ascii=False).encode("utf-8")


def _windows(body: dict, limits: Limits) -> int:
    """``"windows": n`` (1 to the server's RERANKER_MAX_WINDOWS), or the server's RERANKER_WINDOWS."""
    n = _opt_int(body, "windows")
    if n is None:
        return limits.default_windows
    if n > limits.max_windows:
        raise RequestError(422, f"windows is {n}, over the limit of {limits.max_windows} per passage"
                                " (RERANKER_MAX_WINDOWS)")
    return n


def parse_job(route: str, data: Buffer, limits: Limits) -> Job:
    if route == CHUNK:
        return parse_chunk(data)
    body = decode_body(data)
    if route == "/inference":
        return _parse_inference(body, limits)
    if not isinstance(body, dict):
        raise RequestError(422, f"body must be a JSON object, got {_type(body)}")
    if "query" not in body:
        raise RequestError(422, "query is required (a string)")
    query = _check_text("query", body["query"], limits, query=True)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(422, f"model must be a string, got {_type(model)}")
    if route == "/rerank":
        docs = _documents(body, limits, allow_objects=False)
        return Job(
            route=route,
            queries=[query] * len(docs),
            passages=docs,
            top_n=_opt_int(body, "top_k", "top_n"),
            return_documents=_opt_bool(body, "return_documents", False),
            raw_scores=_opt_bool(body, "raw_scores", False),
            truncate=_opt_bool(body, "truncate", True),
            model=model,
            windows=_windows(body, limits),
            extra={"one_query": True},
        )
    docs = _documents(body, limits, allow_objects=True)
    return Job(
        route=route,
        queries=[query] * len(docs),
        passages=docs,
        top_n=_opt_int(body, "top_n"),
        return_documents=_opt_bool(body, "return_documents", False),
        truncate=_opt_bool(body, "truncate", True),
        model=model,
        windows=_windows(body, limits),
        extra={"one_query": True},
    )


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


def build_response(job: Job, logits: Sequence[float], tokens: int, model_name: str, windows: int = 0) -> Any:
    """``windows``: how many model windows were scored (one per pair unless the job asked for windows)."""
    windows = windows or len(logits)
    if job.route == CHUNK:
        return {"logits": [float(x) for x in logits], "tokens": tokens, "windows": windows}
    probs = [_sigmoid(float(x)) for x in logits]
    if job.route == "/inference":
        return probs
    scores = [float(x) for x in logits] if job.raw_scores else probs
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if job.top_n is not None:
        order = order[: job.top_n]
    rid = uuid.uuid4().hex
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
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "windows": windows},
        }
    results = []
    for i in order:
        r = {"index": i, "relevance_score": scores[i]}
        if job.return_documents:
            r["document"] = {"text": job.passages[i]}
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
        },
        "usage": {"total_tokens": tokens, "windows": windows},
    }
