"""A small cross-encoder **trained here** on a synthetic relevance task (needs the ``convert`` extra).

A random model cannot judge reduced precision or tokenization: its scores within a query differ by ~0.003,
so any perturbation reorders them. This one learns a real ranking signal in seconds on a CPU, so its scores
spread and rank like a reranker's, and agreement between precisions means something.

The task: pseudo-words grouped into topics. A query names two keywords of a topic; a passage is relevant
(grade 2) when it contains both, partly relevant (grade 1) when it holds other words of the same topic, and
irrelevant (grade 0) otherwise; filler words around them. A 2-layer BERT must look across the query and
the passage (segment ids 0 and 1) to score it. ``training.json`` records NDCG@10 and MRR on a held-out
split, and ``eval.jsonl`` / ``calibration.jsonl`` are written beside the model for ``convert --eval`` and
``--calibration``.
"""

from __future__ import annotations

import fcntl
import json
import random
import time
from pathlib import Path

from reranker_ops.errors import missing_extra
from reranker_ops.models.evalset import mrr, ndcg_at, ranking_quality  # noqa: F401  (re-exported for the tests)

from .synthetic import bert_tokenizer

VERSION = 1
TOPICS = 12
WORDS_PER_TOPIC = 8
FILLERS = 150
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
SYLLABLES = ("ка", "ро", "ми", "на", "то", "ле", "су", "ви", "да", "по", "ре", "жу", "ша", "бо", "ги", "ту",
             "ло", "зе", "фа", "ны")


def _word(rng: random.Random, used: set) -> str:
    while True:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        if w not in used:
            used.add(w)
            return w


def make_task(seed: int = 0) -> tuple[list[list[str]], list[str]]:
    rng = random.Random(seed)
    used: set = set()
    topics = [[_word(rng, used) for _ in range(WORDS_PER_TOPIC)] for _ in range(TOPICS)]
    fillers = [_word(rng, used) for _ in range(FILLERS)]
    return topics, fillers


def make_items(n_queries: int, seed: int, task_seed: int = 0, docs: int = 10) -> list[dict]:
    """Queries with their passages and graded relevance (2, 1, 0); at least one of each grade per query."""
    topics, fillers = make_task(task_seed)
    rng = random.Random(seed)
    items = []
    for _ in range(n_queries):
        t = rng.randrange(TOPICS)
        keys = rng.sample(topics[t], 2)
        query = " ".join(keys + [rng.choice(fillers)])
        grades = [2, 1, 0] + [rng.choices((2, 1, 0), weights=(2, 3, 5))[0] for _ in range(docs - 3)]
        rng.shuffle(grades)
        passages = []
        for g in grades:
            words = [rng.choice(fillers) for _ in range(rng.randint(6, 14))]
            other = rng.choice([i for i in range(TOPICS) if i != t])
            if g == 2:  # the query's keywords and more of its topic
                words += keys + rng.sample([w for w in topics[t] if w not in keys], 2)
            elif g == 1:  # one word of the topic, among another topic's
                words += [rng.choice([w for w in topics[t] if w not in keys])] + rng.sample(topics[other], 1)
            else:  # another topic only
                words += rng.sample(topics[other], 2)
            rng.shuffle(words)
            passages.append(" ".join(words) + ".")
        items.append({"query": query, "passages": passages, "grades": grades})
    return items


def train_model(out_dir: Path, *, seed: int = 0, steps: int = 300, batch: int = 64) -> Path:
    """Train, evaluate on held-out queries, and save with ``save_pretrained`` (plus eval/calibration sets)."""
    try:
        import torch
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise missing_extra("convert", exc) from exc

    t0 = time.perf_counter()
    train = make_items(600, seed=seed + 1)
    held_out = make_items(40, seed=seed + 1000)
    topics, fillers = make_task(0)
    corpus = [" ".join(t) for t in topics] + [" ".join(fillers)]
    corpus += [it["query"] + " " + p for it in train[:200] for p in it["passages"]]
    fast = bert_tokenizer(corpus, 600, 512)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=fast.backend_tokenizer.get_vocab_size(), max_position_embeddings=512, num_labels=1,
                        type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SHAPE)
    model = BertForSequenceClassification(config)
    pairs = [(it["query"], p, g / 2.0) for it in train for p, g in zip(it["passages"], it["grades"])]
    # tokenized once: the steps then only index tensors
    enc_all = fast([q for q, _, _ in pairs], [p for _, p, _ in pairs], truncation=True, padding=True,
                   max_length=128, return_tensors="pt", return_token_type_ids=True)
    target_all = torch.tensor([y for _, _, y in pairs], dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the result is reproducible
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(pairs), (batch,), generator=gen)
            enc = {k: v[idx] for k, v in enc_all.items()}
            target = target_all[idx]
            loss = loss_fn(model(**enc).logits[:, 0], target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()

    def score(query: str, passages: list[str]) -> list[float]:
        with torch.no_grad():
            enc = fast([query] * len(passages), passages, truncation=True, padding=True, max_length=512,
                       return_tensors="pt", return_token_type_ids=True)
            return model(**enc).logits[:, 0].tolist()

    quality = ranking_quality(score, held_out)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    with open(out_dir / "eval.jsonl", "w", encoding="utf-8") as fh:
        for it in held_out:
            fh.write(json.dumps(it, ensure_ascii=False) + "\n")
    with open(out_dir / "calibration.jsonl", "w", encoding="utf-8") as fh:
        for q, p, _ in pairs[:300]:
            fh.write(json.dumps({"query": q, "passage": p}, ensure_ascii=False) + "\n")
    (out_dir / "training.json").write_text(json.dumps({
        "version": VERSION, "seed": seed, "steps": steps, "batch": batch, "shape": SHAPE,
        "train_queries": len(train), "held_out": quality, "seconds": round(time.perf_counter() - t0, 1),
    }, indent=2), encoding="utf-8")
    return out_dir


def cached_trained_model(cache: Path, seed: int = 0) -> Path:
    """The trained model under ``cache`` (trained once, reused while the task and recipe are the same)."""
    out = Path(cache) / f"trained-v{VERSION}-s{seed}"
    if (out / "training.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # the suite's two processes (and any other suite on this machine) train it once: the others wait for it
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "training.json").is_file():
            tmp = out.with_name(out.name + f".tmp-{time.monotonic_ns()}")
            train_model(tmp, seed=seed)
            tmp.rename(out)
    return out
