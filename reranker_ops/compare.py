"""The migration's A/B step: the same queries and candidates to two rerank endpoints, side by side."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .bench import percentile
from .client import Api, RerankerClient, RerankerClientError
from .models.judge import spearman
from .models.evalset import EVAL_SET, read_jsonl


def load_queries(path: Optional[Path]) -> list[dict]:
    """JSONL of ``{"query": ..., "documents": [...]}``; the built-in Russian/English set by default."""
    if path is None:
        return [{"query": q["query"], "documents": list(q["passages"])} for q in EVAL_SET]

    def parse(obj: Any) -> dict:
        docs = obj.get("documents", obj.get("passages"))
        if not isinstance(obj["query"], str) or not isinstance(docs, list) or len(docs) < 2 or \
                not all(isinstance(d, str) for d in docs):
            raise TypeError("query must be a string and documents a list of at least two strings")
        return {"query": obj["query"], "documents": docs}

    return read_jsonl(path, parse, '{"query": "...", "documents": ["...", "..."]}')


def _scores(client: RerankerClient, query: str, docs: Sequence[str]) -> tuple[Optional[np.ndarray], float, str]:
    t0 = time.perf_counter()
    try:
        ranked = client.rerank(query, docs)
    except RerankerClientError as exc:
        return None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    scores = np.full(len(docs), np.nan)
    for r in ranked:
        scores[r.index] = r.score
    return scores, time.perf_counter() - t0, ""


def compare(url_a: str, url_b: str, queries: list[dict], *, api_a: Api = "rerank", api_b: Api = "rerank",
            top_k: int = 3, timeout: float = 60.0, api_key_a: Optional[str] = None,
            api_key_b: Optional[str] = None) -> dict:
    per_query = []
    lat = {"a": [], "b": []}
    errors = {"a": 0, "b": 0}
    with RerankerClient(url_a, api=api_a, api_key=api_key_a, timeout=timeout) as a, \
            RerankerClient(url_b, api=api_b, api_key=api_key_b, timeout=timeout) as b:
        for item in queries:
            q, docs = item["query"], item["documents"]
            sa, la, ea = _scores(a, q, docs)
            sb, lb, eb = _scores(b, q, docs)
            row: dict = {"query": q[:80], "documents": len(docs), "latency_ms_a": round(la * 1000, 2),
                         "latency_ms_b": round(lb * 1000, 2)}
            if ea:
                errors["a"] += 1
                row["error_a"] = ea
            else:
                lat["a"].append(la)
            if eb:
                errors["b"] += 1
                row["error_b"] = eb
            else:
                lat["b"].append(lb)
            if sa is not None and sb is not None:
                k = min(top_k, len(docs))
                top_a = list(np.argsort(-sa, kind="stable")[:k])
                top_b = list(np.argsort(-sb, kind="stable")[:k])
                row.update(
                    spearman=round(spearman(sa, sb), 4),
                    top_k_overlap=round(len(set(top_a) & set(top_b)) / k, 4),
                    top1_agrees=bool(top_a[0] == top_b[0]),
                    max_abs_diff=round(float(np.max(np.abs(sa - sb))), 6),
                )
            per_query.append(row)
    scored = [r for r in per_query if "spearman" in r]

    def stats(values: list[float]) -> dict:
        return {"p50": round(percentile(values, 0.5) * 1000, 2), "p95": round(percentile(values, 0.95) * 1000, 2),
                "max": round(max(values) * 1000, 2) if values else float("nan")}

    return {
        "a": url_a,
        "b": url_b,
        "queries": len(queries),
        "compared": len(scored),
        "top_k": top_k,
        "mean_spearman": round(float(np.mean([r["spearman"] for r in scored])), 4) if scored else None,
        "min_spearman": round(float(np.min([r["spearman"] for r in scored])), 4) if scored else None,
        "mean_top_k_overlap": round(float(np.mean([r["top_k_overlap"] for r in scored])), 4) if scored else None,
        "top1_agreement": round(float(np.mean([r["top1_agrees"] for r in scored])), 4) if scored else None,
        "max_abs_diff": max((r["max_abs_diff"] for r in scored), default=None),
        "latency_ms": {"a": stats(lat["a"]), "b": stats(lat["b"])},
        "errors": errors,
        "per_query": per_query,
    }
