"""Built-in query/passage sets: one to check parity after a conversion, one to calibrate INT8.

Russian and English, short and long; some passages run far past 512 tokens so truncation is exercised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from ..errors import ConfigError

T = TypeVar("T")

_BORSCH = (
    "Борщ — традиционный свекольный суп восточнославянской кухни. Для него варят мясной бульон, "
    "добавляют свёклу, капусту, картофель, морковь и лук, а подают со сметаной и зеленью. "
)
_WEATHER = "Вчера была хорошая погода для прогулки по набережной, светило солнце и дул лёгкий ветер. "
_ML = (
    "Машинное обучение использует нейронные сети, чтобы находить закономерности в данных. "
    "Модель обучают на размеченных примерах, а затем проверяют на отложенной выборке. "
)
_SERVER = (
    "A reranker server scores query and passage pairs with a cross-encoder and returns them best first; "
    "batching requests together keeps the processor busy. "
)
_HISTORY = "Москва была основана в 1147 году; Кремль стоит на Боровицком холме у реки Москвы. "

EVAL_SET: list[dict] = [
    {
        "query": "Как приготовить борщ?",
        "passages": [_BORSCH, _WEATHER, _ML, _BORSCH * 12, "борщ", "Рецепт: свёкла, капуста, бульон. 🍲"],
    },
    {
        "query": "что такое машинное обучение",
        "passages": [_ML, _HISTORY, _ML * 10 + _WEATHER, _SERVER, "нейронные сети"],
    },
    {
        "query": "how does a reranker server work?",
        "passages": [_SERVER, _WEATHER, _SERVER * 15, "It works.", _ML],
    },
    {
        "query": "когда основана Москва",
        "passages": [_HISTORY, _HISTORY * 20, _BORSCH, "Москва — столица России.", _SERVER],
    },
    {
        "query": "weather for a walk",
        "passages": ["Sunny, light wind, 20 degrees.", _WEATHER, _SERVER, _WEATHER * 25, "Дождь весь день."],
    },
    {
        "query": ("очень длинный запрос о том, как приготовить борщ и что подать к нему " * 6).strip(),
        "passages": [_BORSCH * 3, _ML * 3, _WEATHER],
    },
]

CALIBRATION_SET: list[tuple[str, str]] = [
    (item["query"], p) for item in EVAL_SET for p in item["passages"]
] + [
    ("лучший способ выучить язык", "Ежедневная практика и разговор с носителями помогают выучить язык."),
    ("python web server", "MOSEC is a model serving framework with a Rust controller and Python workers."),
    ("рецепт блинов", "Смешайте муку, молоко и яйца, жарьте на горячей сковороде."),
    ("capital of France", "Paris is the capital and most populous city of France."),
]


def read_jsonl(path: Path, parse: Callable[[Any], T], example: str) -> list[T]:
    """Every non-blank line of a JSONL file through ``parse``; a bad line is one error naming file:line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "give a UTF-8 JSONL file") from exc
    out: list[T] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse(json.loads(line)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}:{n}: {exc}", f"each line must look like {example}") from exc
    if not out:
        raise ConfigError(f"{path} has no lines", f"add lines like {example}")
    return out


def load_pairs_jsonl(path: Path) -> list[tuple[str, str]]:
    """Read ``{"query": ..., "passage": ...}`` lines (``document`` or ``text`` also accepted)."""

    def parse(obj: Any) -> tuple[str, str]:
        q = obj["query"]
        p = obj.get("passage", obj.get("document", obj.get("text")))
        if not isinstance(q, str) or not isinstance(p, str):
            raise TypeError("query and passage must be strings")
        return q, p

    return read_jsonl(path, parse, '{"query": "...", "passage": "..."}')


def load_eval_jsonl(path: Path) -> list[dict]:
    """Read ``{"query": ..., "passages": [...], "grades"?: [...]}`` lines (``documents`` also accepted).

    With ``grades`` (graded relevance, higher is better) the parity report adds each side's NDCG@10.
    """

    def parse(obj: Any) -> dict:
        q = obj["query"]
        ps = obj.get("passages", obj.get("documents"))
        if not isinstance(q, str) or not isinstance(ps, list) or not ps or not all(isinstance(p, str) for p in ps):
            raise TypeError("query must be a string and passages a non-empty list of strings")
        item = {"query": q, "passages": ps}
        if obj.get("grades") is not None:
            g = obj["grades"]
            if not isinstance(g, list) or len(g) != len(ps):
                raise TypeError("grades must be a list with one number per passage")
            item["grades"] = [float(x) for x in g]
        return item

    return read_jsonl(path, parse, '{"query": "...", "passages": ["...", "..."], "grades": [2, 0]}')


# --- how good a ranking is, against graded relevance -------------------------------------------------------
def ndcg_at(scores: Sequence[float], grades: Sequence[float], k: int = 10) -> float:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    dcg = sum((2 ** grades[i] - 1) / math.log2(r + 2) for r, i in enumerate(order))
    ideal = sorted(grades, reverse=True)[:k]
    idcg = sum((2 ** g - 1) / math.log2(r + 2) for r, g in enumerate(ideal))
    return dcg / idcg if idcg else 1.0


def mrr(scores: Sequence[float], grades: Sequence[int]) -> float:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    for r, i in enumerate(order):
        if grades[i] == 2:
            return 1.0 / (r + 1)
    return 0.0


def ranking_quality(score_fn, items: Sequence[dict]) -> dict:
    """Mean NDCG@10 and MRR of ``score_fn(query, passages) -> scores`` over graded items."""
    nd, rr = [], []
    for item in items:
        s = list(score_fn(item["query"], item["passages"]))
        nd.append(ndcg_at(s, item["grades"]))
        rr.append(mrr(s, item["grades"]))
    return {"ndcg@10": round(sum(nd) / len(nd), 4), "mrr": round(sum(rr) / len(rr), 4), "queries": len(items)}
