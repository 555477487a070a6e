"""Build a randomly initialised BERT cross-encoder offline (needs the ``convert`` extra).

Tests use a tiny one; benchmarks use one with DiTy's exact shape, since speed and memory depend on the
shape alone. The WordPiece tokenizer is trained on generated Russian and English text and the model is
saved with ``save_pretrained`` (safetensors), exactly like a hub download.
"""

from __future__ import annotations

import random
from pathlib import Path

from reranker_ops.bench import BENCH_RU_WORDS
from reranker_ops.errors import missing_extra

RU_WORDS = (
    "как приготовить борщ суп свекла капуста погода прогулка машинное обучение нейронные сети "
    "модель данные поиск документ запрос ответ город москва река лес книга история наука "
    "компьютер программа сервер память процессор быстро медленно хорошо плохо новый старый"
).split()
EN_WORDS = (
    "how to cook soup beet cabbage weather walk machine learning neural network model data "
    "search document query answer city river forest book history science computer program "
    "server memory processor fast slow good bad new old the a of and in is was"
).split()

# The benchmark workloads' vocabulary. The DiTy-shaped model's tokenizer is trained on it with a vocabulary
# small enough that a Russian word becomes ~1.8 pieces, as with DiTy's own (mBERT-style) vocabulary, so a
# 600-character passage is ~160 tokens: sequence length, not just shape, sets a cross-encoder's speed.
DITY_TOKENIZER_VOCAB = 360

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, initializer_range=0.1)
DITY_SHAPE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=119547
)
# DiTy's width with a quarter of its layers: each call as short as DiTy's own in bf16 or INT8 on a CPU with AMX
# (4-5x faster than FP32), so a machine without AMX can measure the served path's fixed costs at those speeds.
DITY_SHORT_SHAPE = dict(DITY_SHAPE, num_hidden_layers=3)
SHAPES = {"tiny": TINY, "dity": DITY_SHAPE, "dity-short": DITY_SHORT_SHAPE}


def generated_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = RU_WORDS + EN_WORDS
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + rng.choice(".?!"))
    # Characters a real corpus has, so the vocabulary covers digits, punctuation and emoji.
    lines.append("0123456789 , . ; : ! ? — « » ( ) 😀 🚀 ёЁ")
    return lines


def bert_tokenizer(corpus: list[str], vocab_size: int, max_length: int):
    """A BERT WordPiece tokenizer (lower-cased, [CLS] q [SEP] p [SEP] with segment ids) trained on ``corpus``, as
    transformers' ``BertTokenizerFast``: the tokenizer of every model built here."""
    try:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
        from transformers import BertTokenizerFast
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise missing_extra("convert", exc) from exc

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def build_model(out_dir: Path, *, shape: str = "tiny", seed: int = 0, max_position: int = 512) -> Path:
    """Write a random ``BertForSequenceClassification`` (1 label) and its tokenizer to ``out_dir``."""
    try:
        import torch
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise missing_extra("convert", exc) from exc

    dims = dict(SHAPES[shape])
    vocab_size = dims.pop("vocab_size", 1000)
    corpus = generated_corpus(seed=seed)
    if shape != "tiny":
        rng = random.Random(seed)
        corpus += [" ".join(rng.choice(BENCH_RU_WORDS) for _ in range(20)) for _ in range(2000)]
    fast = bert_tokenizer(corpus, 1000 if shape == "tiny" else DITY_TOKENIZER_VOCAB, max_position)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=max(vocab_size, fast.backend_tokenizer.get_vocab_size()),
        max_position_embeddings=max_position,
        num_labels=1,
        type_vocab_size=2,
        **dims,
    )
    model = BertForSequenceClassification(config).eval()
    if shape == "tiny":
        _spread_head(model, fast, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    return out_dir


def _spread_head(model, tokenizer, seed: int) -> None:
    """Point the random classifier along the pooled outputs' main direction, so scores vary by input.

    A freshly initialised BERT maps every pair to nearly the same pooled vector; a random head then
    gives every passage the same score and no ranking check could tell a good export from a bad one.
    Segment embeddings are pulled apart too, so dropping ``token_type_ids`` changes the scores.
    """
    import torch

    rng = random.Random(seed + 1)
    corpus = generated_corpus(400, seed=seed + 2)
    pairs = [(rng.choice(corpus), rng.choice(corpus)) for _ in range(256)]
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight[1].add_(0.5)
        enc = tokenizer([q for q, _ in pairs], [p for _, p in pairs], truncation=True, padding=True,
                        max_length=128, return_tensors="pt", return_token_type_ids=True)
        pooled = model.bert(**enc).pooler_output.double()
        mean = pooled.mean(0)
        _u, _s, v = torch.linalg.svd(pooled - mean, full_matrices=False)
        direction = v[0]
        proj = (pooled - mean) @ direction
        w = direction / proj.std() * 2.0
        model.classifier.weight.copy_(w.float().unsqueeze(0))
        model.classifier.bias.copy_((-(mean @ w)).float().reshape(1))


def main(argv: list[str] | None = None) -> int:
    """``python -m modelkit.synthetic OUT [--shape tiny|dity|dity-short]``: a model for tests and benchmarks."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="dity")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_model(args.out, shape=args.shape, seed=args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
