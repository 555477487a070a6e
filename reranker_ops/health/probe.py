"""The canary: a real rerank request through the whole pipeline, judged on its answer, not its status."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

PROBE_HEADER = "X-Reranker-Probe"  # with the supervisor's token, the gate's reserved canary slot
# Two documents, so the answer must score and rank each; short, because it runs at every start (healthy only
# after it is answered) and every probe interval under load, with both cores. With DiTy's shape (AMD EPYC,
# AVX-512), the earlier canary ("как приготовить борщ" against a sentence each) was 30 and 27 tokens,
# 60 ms; this one is 8 and 8 tokens, 21 ms.
CANARY = {
    "query": "борщ",
    "documents": ["Борщ — суп.", "Дождь."],
}


@dataclass
class ProbeResult:
    ok: bool
    at: float  # wall clock, for people
    latency_s: Optional[float]
    status: Optional[int]
    error: Optional[str]
    mono: float = 0.0  # monotonic, for every comparison

    @property
    def busy(self) -> bool:
        """Failed, but the way a live server that is overloaded, booting or slow fails (not a wrong answer)."""
        return not self.ok and (self.status is None or self.status in (408, 429, 503, 504))

    def to_dict(self) -> dict:
        return asdict(self)


def judge(status: int, body: Any) -> Optional[str]:
    """None if the answer is a correct rerank answer for the canary, else what is wrong with it."""
    if status != 200:
        text = body if isinstance(body, str) else str(body)
        return f"HTTP {status}: {text[:200]}"
    if not isinstance(body, dict):
        return "answer is not a JSON object"
    scores = body.get("scores")
    if not isinstance(scores, list) or len(scores) != len(CANARY["documents"]):
        return "answer has no score per document"
    for s in scores:
        if not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
            return f"score {s!r} is not a probability"
    results = body.get("results")
    if not isinstance(results, list) or sorted(r.get("index") for r in results) != [0, 1]:
        return "answer's results do not rank every document"
    return None


def probe_sync(client: Any, base_url: str, timeout: float, api_key: Optional[str] = None) -> ProbeResult:
    """For ``rerankctl watchdog``: one canary with the caller's ``httpx.Client``, kept for every probe (a new
    client per call builds a TLS context, 33 ms of CPU on a small machine)."""
    import httpx

    headers = {PROBE_HEADER: "1"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.monotonic()
    at = time.time()
    try:
        resp = client.post(f"{base_url.rstrip('/')}/rerank", json=CANARY, headers=headers, timeout=timeout)
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        error = judge(resp.status_code, body)
        return ProbeResult(error is None, at, time.monotonic() - t0, resp.status_code, error, t0)
    except httpx.TimeoutException:
        return ProbeResult(False, at, time.monotonic() - t0, None, f"no answer within {timeout:g}s", t0)
    except httpx.HTTPError as exc:
        return ProbeResult(False, at, time.monotonic() - t0, None, f"{type(exc).__name__}: {exc}", t0)
