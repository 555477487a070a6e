"""Clients for a rerank endpoint: ours (``/rerank``), infinity_emb's, or any Cohere-shaped ``/v1/rerank``.

>>> from reranker_ops.client import RerankerClient
>>> with RerankerClient("http://127.0.0.1:8080") as client:
...     ranked = client.rerank("как приготовить борщ", ["Борщ — суп.", "Дождь."], top_k=1)

Connection pooling (one httpx client per object), a timeout on every call, and retries with exponential
backoff and jitter on connection failures, 429 and 503 (``Retry-After`` honoured), never on other 4xx.
Failures are typed exceptions carrying the server's message. Only ``httpx`` is needed.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import httpx

Api = Literal["rerank", "cohere"]
RETRY_STATUSES = (429, 503)


@dataclass(frozen=True)
class Ranked:
    index: int
    score: float
    document: str


class RerankerClientError(Exception):
    """Base of everything the client raises."""


class RerankerConnectionError(RerankerClientError):
    """The server could not be reached (after the retries)."""


class RerankerTimeout(RerankerClientError):
    """No answer within the client's timeout."""


class RerankerHTTPError(RerankerClientError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class RerankerValidationError(RerankerHTTPError):
    """400/413/422: the request is wrong; retrying cannot help."""


class RerankerAuthError(RerankerHTTPError):
    """401/403: the API key is missing or wrong."""


class RerankerUnavailable(RerankerHTTPError):
    """429/503 still, after every retry."""


def _error_for(status: int, message: str) -> RerankerHTTPError:
    if status in (401, 403):
        return RerankerAuthError(status, message)
    if status in (400, 413, 422):
        return RerankerValidationError(status, message)
    if status in RETRY_STATUSES:
        return RerankerUnavailable(status, message)
    return RerankerHTTPError(status, message)


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict):
            for key in ("message", "detail", "error"):
                if isinstance(body.get(key), str):
                    return body[key]
        return str(body)[:500]
    except ValueError:
        return resp.text[:500]


class _Core:
    """What the sync and async clients share: building requests, reading answers, deciding retries."""

    def __init__(self, base_url: str, api: Api, api_key: Optional[str], timeout: float, max_retries: int,
                 backoff: float, max_backoff: float, model: Optional[str]) -> None:
        self.base_url = base_url.rstrip("/")
        self.api = api
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.model = model
        self.path = "/v1/rerank" if api == "cohere" else "/rerank"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, query: str, documents: Sequence[str], top_k: Optional[int]) -> dict:
        body: dict[str, Any] = {"query": query, "documents": list(documents)}
        if top_k is not None:
            body["top_n"] = top_k
        if self.model:
            body["model"] = self.model
        if self.api == "cohere":
            body["return_documents"] = False
        return body

    def parse(self, resp: httpx.Response, documents: Sequence[str], top_k: Optional[int]) -> list[Ranked]:
        """The ranking in an answer, checked: every index names one of the documents sent (a negative one
        would pick a document from the end in Python), every score is a number."""
        try:
            data = resp.json()
            results = data.get("results") if isinstance(data, dict) else None
            if results is None and isinstance(data, dict):
                results = data.get("data")  # older infinity_emb answers
            if results is not None:
                ranked = [Ranked(self._index(r["index"], len(documents)), float(r["relevance_score"]), "")
                          for r in results]
            elif isinstance(data, dict) and isinstance(data.get("scores"), list) and len(data["scores"]) == len(documents):
                ranked = [Ranked(i, float(s), "") for i, s in enumerate(data["scores"])]
            else:
                raise ValueError("no results and no score per document")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RerankerClientError(f"unexpected answer from {self.base_url}: {exc}") from None
        ranked = [Ranked(r.index, r.score, documents[r.index]) for r in ranked]
        ranked.sort(key=lambda r: (-r.score, r.index))
        return ranked[:top_k] if top_k is not None else ranked

    def judge(self, attempt: int, resp: Optional[httpx.Response], exc: Optional[Exception],
              documents: Sequence[str], top_k: Optional[int]) -> tuple[str, Any]:
        """One attempt's outcome: ("done", ranked) or ("retry", seconds to wait); raises when final."""
        last = attempt >= self.max_retries
        if exc is not None:
            if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
                # The server got the request; retrying a slow request only doubles the load.
                raise RerankerTimeout(f"no answer from {self.base_url} within {self.timeout:g}s") from exc
            if last:
                raise RerankerConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
            return "retry", self.delay(attempt, None)
        assert resp is not None
        if resp.status_code == 200:
            return "done", self.parse(resp, documents, top_k)
        if resp.status_code in RETRY_STATUSES and not last:
            return "retry", self.delay(attempt, resp)
        raise _error_for(resp.status_code, _message(resp))

    @staticmethod
    def _index(value: Any, n: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise ValueError(f"index {value!r} is not one of the {n} documents sent")
        return value

    def delay(self, attempt: int, resp: Optional[httpx.Response]) -> float:
        """Retry-After when the server gives a usable one (seconds, or an HTTP date), at most max_backoff; else
        exponential backoff with full jitter. A negative, infinite or NaN value is not usable."""
        ra = resp.headers.get("Retry-After") if resp is not None else None
        if ra:
            seconds = retry_after_seconds(ra)
            if seconds is not None:
                return min(seconds, self.max_backoff)
        return random.uniform(0, min(self.max_backoff, self.backoff * (2**attempt)))


def retry_after_seconds(value: str) -> Optional[float]:
    """A ``Retry-After`` header as seconds from now: delta-seconds or an HTTP date (RFC 9110); None when it is
    neither, or negative, infinite or NaN."""
    import math
    from email.utils import parsedate_to_datetime

    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        import datetime as _dt

        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        seconds = max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class _ClientBase:
    """Settings and the pooled httpx client; subclasses differ only in sync vs async I/O."""

    _http_class: Any = httpx.Client

    def __init__(
        self,
        base_url: str,
        *,
        api: Api = "rerank",
        api_key: Optional[str] = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        model: Optional[str] = None,
        transport: Any = None,
    ) -> None:
        self._core = _Core(base_url, api, api_key, timeout, max_retries, backoff, max_backoff, model)
        self._http = self._http_class(base_url=self._core.base_url, timeout=timeout, headers=self._core.headers(),
                                      transport=transport)
        self.attempts = 0  # requests sent by the last call (1 + retries)


class RerankerClient(_ClientBase):
    def rerank(self, query: str, documents: Sequence[str], top_k: Optional[int] = None) -> list[Ranked]:
        core = self._core
        body = core.body(query, documents, top_k)
        for attempt in range(core.max_retries + 1):
            self.attempts = attempt + 1
            resp, exc = None, None
            try:
                resp = self._http.post(core.path, json=body)
            except httpx.TransportError as e:
                exc = e
            kind, value = core.judge(attempt, resp, exc, documents, top_k)
            if kind == "done":
                return value
            time.sleep(value)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RerankerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncRerankerClient(_ClientBase):
    _http_class = httpx.AsyncClient

    async def rerank(self, query: str, documents: Sequence[str], top_k: Optional[int] = None) -> list[Ranked]:
        core = self._core
        body = core.body(query, documents, top_k)
        for attempt in range(core.max_retries + 1):
            self.attempts = attempt + 1
            resp, exc = None, None
            try:
                resp = await self._http.post(core.path, json=body)
            except httpx.TransportError as e:
                exc = e
            kind, value = core.judge(attempt, resp, exc, documents, top_k)
            if kind == "done":
                return value
            await asyncio.sleep(value)
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncRerankerClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
