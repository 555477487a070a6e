"""How a converted variant compares with the reference: fidelity (scores, rank correlation, top-1, NDCG@10 on the
evaluation set, scored through the serving path) and speed (a micro-benchmark of the serving engine)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..settings import Settings
from ..worker.engine import Scorer, sigmoid
from .evalset import EVAL_SET, ndcg_at
from .reference import FP32_ATOL, load_reference, model_max_length, reference_scores


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return 1.0
    ra, rb = _ranks(a), _ranks(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as scipy.stats.rankdata."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def compare_scores(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    per_query = []
    for ref, cand in zip(reference, candidate):
        per_query.append(
            {
                "max_abs_diff": float(np.max(np.abs(ref - cand))),
                "spearman": spearman(ref, cand),
                "top1_agrees": bool(int(np.argmax(ref)) == int(np.argmax(cand))),
            }
        )
    return {
        "max_abs_diff": max(q["max_abs_diff"] for q in per_query),
        "min_spearman": min(q["spearman"] for q in per_query),
        "mean_spearman": float(np.mean([q["spearman"] for q in per_query])),
        "top1_agreement": float(np.mean([q["top1_agrees"] for q in per_query])),
        "queries": len(per_query),
        "pairs": int(sum(len(r) for r in reference)),
        "per_query": per_query,
    }


def check_parity(
    settings: Settings,
    source: Path,
    variant_dir: Path,
    precision: str,
    *,
    reference: Optional[tuple] = None,
    eval_set: Sequence[dict] = EVAL_SET,
) -> dict:
    """Score the eval set with the reference and, through the serving path, with the variant."""
    tok, model = reference or load_reference(source)
    scorer = Scorer(variant_dir, threads=settings.threads, pin_threads=False)
    ref_max = model_max_length(tok, model)
    ref, cand = [], []
    for item in eval_set:
        ref.append(reference_scores(tok, model, item["query"], item["passages"], ref_max))
        cand.append(sigmoid(scorer.score(item["query"], item["passages"])))
    report = compare_scores(ref, cand)
    graded = [item for item in eval_set if item.get("grades")]
    if graded:
        by_query = {id(item): i for i, item in enumerate(eval_set)}
        report["ndcg@10"] = {
            "reference": round(float(np.mean([ndcg_at(ref[by_query[id(it)]], it["grades"]) for it in graded])), 4),
            "candidate": round(float(np.mean([ndcg_at(cand[by_query[id(it)]], it["grades"]) for it in graded])), 4),
        }
    # NDCG@10 of the candidate's ranking, taking the reference's scores as graded relevance: 1.0 when the
    # order of what matters (the reference's top) is kept
    report["ndcg@10_vs_reference"] = round(float(np.mean([ndcg_at(c, list(r)) for r, c in zip(ref, cand)])), 4)
    if precision == "fp32":
        limits = {"max_abs_diff": FP32_ATOL, "min_spearman": None, "top1_agreement": None}
        ok = report["max_abs_diff"] <= FP32_ATOL
    else:
        limits = {
            "max_abs_diff": settings.parity_max_abs_diff,
            "mean_spearman": settings.parity_min_spearman,
            "top1_agreement": settings.parity_min_top1,
            "ndcg@10_vs_reference": settings.parity_min_ndcg,
        }
        eps = 1e-9  # one swap in five passages is exactly 0.9, and must not fail on float rounding
        ok = (
            report["max_abs_diff"] <= settings.parity_max_abs_diff
            and report["mean_spearman"] >= settings.parity_min_spearman - eps
            and report["top1_agreement"] >= settings.parity_min_top1 - eps
            and report["ndcg@10_vs_reference"] >= settings.parity_min_ndcg - eps
        )
    report["limits"] = limits
    report["passed"] = bool(ok)
    return report


def micro_bench(variant_dir: Path, settings: Settings, seconds: float) -> dict:
    scorer = Scorer(variant_dir, threads=settings.threads, pin_threads=False, token_budget=settings.token_budget,
                    attention_budget=settings.attention_budget)
    pairs = [(item["query"], p) for item in EVAL_SET for p in item["passages"]]
    encs = scorer.tokenizer.encode_items(pairs)
    scorer.score_encoded(encs[:2])  # warm-up
    done = tokens = 0
    t0 = time.perf_counter()
    while True:
        scorer.score_encoded(encs)
        done += len(encs)
        tokens += sum(len(e) for e in encs)
        if time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return {
        "pairs_per_s": round(done / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "mean_tokens_per_pair": round(tokens / done, 1),
        "seconds": round(elapsed, 2),
        "threads": settings.effective_threads() if settings.threads else "auto",
    }
