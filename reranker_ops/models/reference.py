"""The source model and its PyTorch reference: the checks a folder passes before anything is converted (safetensors
only, no code of its own), and the reference scores every converted variant is judged against. Needs the
``convert`` extra (torch, transformers), imported lazily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConvertError, ModelNotFound, missing_extra
from ..worker.engine import sigmoid
from . import store

FP32_ATOL = 1e-4


def check_source(folder: Path) -> None:
    """A model folder we are willing to load: config, tokenizer, safetensors weights that match the manifest."""
    if not folder.is_dir():
        raise ModelNotFound(f"no model at {folder}", "run: rerankctl download <repo id>  (or give --model PATH)")
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{folder} has no config.json", "point --model at a Hugging Face model folder")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.name.endswith(store.PICKLE_SUFFIXES)]
        raise ConvertError(
            f"{folder} has no safetensors weights" + (f" (only pickle: {', '.join(pickles)})" if pickles else ""),
            "rerankctl loads safetensors only; convert the weights with safetensors first",
        )
    if not (folder / "tokenizer.json").is_file():
        raise ConvertError(f"{folder} has no tokenizer.json (a fast tokenizer)", "save the tokenizer with a fast tokenizer")
    for path in weights:
        check_safetensors_layout(path)
    manifest = store.read_manifest(folder)
    for entry in manifest.get("files", []):
        path = folder / entry["path"]
        if path.suffix == ".safetensors" and path.is_file():
            if path.stat().st_size != entry["size"] or store.sha256_file(path) != entry["sha256"]:
                raise ConvertError(
                    f"{path.name} does not match its download manifest (corrupt or truncated)",
                    "delete the model folder and run rerankctl download again",
                )


def check_safetensors_layout(path: Path) -> None:
    """The file is what its own header says, checked in microseconds before torch is imported (~10 s): an
    8-byte header length, a JSON header, and tensors that end exactly where the file does. A truncated or
    overwritten file fails here with a clear line instead of deep inside transformers."""
    def corrupt(why: str) -> ConvertError:
        return ConvertError(f"{path.name} is corrupt or truncated ({why})",
                            "delete the model folder and run rerankctl download again")

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(size - 8, 100 * 1024 * 1024):
            raise corrupt(f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise corrupt(f"unreadable header: {type(exc).__name__}") from None
    data = size - 8 - n
    if max(ends, default=0) != data:
        raise corrupt(f"the tensors need {max(ends, default=0)} bytes of data and the file has {data}")


def require_convert_extra() -> None:
    """Fail at once, before minutes of work, when the optional dependencies are not installed."""
    import importlib.util

    for name in ("torch", "transformers", "optimum.intel", "nncf"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError, AttributeError) as exc:  # a parent that cannot be imported
            raise missing_extra("convert", exc) from exc
        if not found:
            raise missing_extra("convert", ModuleNotFoundError(f"No module named {name!r}"))


def load_reference(folder: Path):
    """The PyTorch reference: transformers' model and tokenizer, safetensors only, no remote code."""
    try:
        import torch  # noqa: F401
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as exc:
        raise missing_extra("convert", exc) from exc
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=False
        ).eval()
    except Exception as exc:  # noqa: BLE001 - corrupt weights surface here as many types
        raise ConvertError(
            f"cannot load the model in {folder}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            "the weights may be corrupt or truncated: delete the folder and download it again",
        ) from exc
    return tok, model


def save_effective_tokenizer(tok, path: Path) -> None:
    """The tokenizer transformers actually uses, not the folder's tokenizer.json: transformers 5 rebuilds a
    BERT tokenizer from tokenizer_config.json (do_lower_case, strip_accents, ...), which can disagree with
    tokenizer.json. The server must split text exactly as the reference does."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ConvertError("the reference tokenizer is not a fast tokenizer", "save the model with a fast tokenizer")
    backend.save(str(path))


def token_agreement(tok, tokenizer_json: Path, max_length: int, eval_set: Sequence[dict]) -> dict:
    """Do the serving tokenizer and the reference split every eval pair into the same ids and segments?"""
    from ..worker.engine import Tokenizer

    serving = Tokenizer(tokenizer_json, max_length)
    pairs = [(item["query"], p) for item in eval_set for p in item["passages"]]
    for i, (q, p) in enumerate(pairs):
        ref = tok(q, p, truncation=True, max_length=max_length, return_token_type_ids=True)
        [got] = serving.encode_items([(q, p)])
        if list(ref["input_ids"]) != got.ids.tolist() or list(ref["token_type_ids"]) != got.type_ids.tolist():
            ref_t = tok.convert_ids_to_tokens(ref["input_ids"])[:12]
            got_t = tok.convert_ids_to_tokens(got.ids.tolist())[:12]
            return {"agree": False, "pairs": len(pairs), "first_difference": i,
                    "detail": f"pair {i}: transformers {ref_t} vs served {got_t}"}
    return {"agree": True, "pairs": len(pairs)}


def model_max_length(tok, model) -> int:
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    tml = getattr(tok, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 100_000:
        limit = min(limit, tml)
    return limit


def reference_scores(tok, model, query: str, passages: Sequence[str], max_length: int) -> np.ndarray:
    """sigmoid(logits) of the transformers model: what sentence-transformers' CrossEncoder returns."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(passages), 8):
            chunk = list(passages[i : i + 8])
            enc = tok([query] * len(chunk), chunk, truncation=True, padding=True, max_length=max_length,
                      return_tensors="pt", return_token_type_ids=True)
            logits = model(**enc).logits.float().numpy()
            out.append(logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0])
    return sigmoid(np.concatenate(out).astype(np.float64))
