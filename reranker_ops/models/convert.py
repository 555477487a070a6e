"""Export a cross-encoder to OpenVINO IR or ONNX, quantize it, and prove it scores like the original.

Needs the ``convert`` extra (optimum-intel, nncf, torch, transformers), imported lazily. Every variant is
built in a temporary folder beside its final place and renamed into place only after parity passed, so
``serve`` never picks up a half-written or wrong model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .. import __version__
from ..config import Settings
from ..errors import ConfigError, ConvertError, ModelNotFound, ParityError, missing_extra
from ..serving.engine import Scorer, sigmoid
from . import store
from .store import AUTO
from .evalset import CALIBRATION_SET, EVAL_SET, load_eval_jsonl, load_pairs_jsonl
from .trained import ndcg_at

FORMATS = ("openvino", "onnx")
PRECISIONS = ("fp32", "fp16", "int8", "int8-weights", "bf16")
AUTO_RECORD = "auto-choice.json"  # in the model folder: what `convert --precision auto` measured and chose
FP32_ATOL = 1e-4
Step = Callable[[str], None]


def _noop(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------------
# the source model
# --------------------------------------------------------------------------------------------------------
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
    from ..serving.engine import Tokenizer

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


# --------------------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------
# micro-benchmark
# --------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------
def _export_openvino(source: Path, out: Path):
    try:
        import openvino as ov
        from optimum.intel import OVModelForSequenceClassification
    except ImportError as exc:
        raise missing_extra("convert", exc) from exc
    ov_model = OVModelForSequenceClassification.from_pretrained(
        str(source), export=True, compile=False, load_in_8bit=False, trust_remote_code=False
    )
    model = ov_model.model
    ov.save_model(model, str(out / "openvino_model.xml"), compress_to_fp16=False)
    return model


def _export_onnx(source: Path, out: Path, model) -> None:
    try:
        import torch
    except ImportError as exc:
        raise missing_extra("convert", exc) from exc
    # The example must have padding and both segments: with an all-ones mask or all-zero segment ids the
    # exporter specialises the graph on them, and the ONNX model then scores real inputs wrongly.
    ids = torch.ones(2, 16, dtype=torch.long)
    mask = ids.clone()
    mask[1, 8:] = 0
    segments = torch.zeros_like(ids)
    segments[:, 8:] = 1
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=int(model.config.max_position_embeddings))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    try:
        torch.onnx.export(
            model,
            (),
            str(out / "model.onnx"),
            kwargs={"input_ids": ids, "attention_mask": mask, "token_type_ids": segments},
            input_names=names,
            output_names=["logits"],
            dynamic_shapes={n: {0: batch, 1: seq} for n in names},
            dynamo=True,
            external_data=False,
        )
    except ImportError as exc:
        raise missing_extra("convert", exc) from exc


def _calibration_feeds(tokenizer_dir: Path, max_length: int, pairs: Sequence[tuple[str, str]]) -> list[dict]:
    from ..serving.engine import Tokenizer

    tok = Tokenizer(tokenizer_dir / "tokenizer.json", max_length)
    feeds = []
    for enc in tok.encode_items(pairs):
        n = len(enc)
        feeds.append(
            {
                "input_ids": enc.ids.reshape(1, n),
                "attention_mask": np.ones((1, n), dtype=np.int64),
                "token_type_ids": enc.type_ids.reshape(1, n),
            }
        )
    return feeds


def _reduce_precision(fp32_xml: Path, out: Path, precision: str, feeds: list[dict]) -> None:
    import openvino as ov

    model = ov.Core().read_model(str(fp32_xml))
    if precision == "fp16":
        ov.save_model(model, str(out / "openvino_model.xml"), compress_to_fp16=True)
        return
    try:
        import nncf
    except ImportError as exc:
        raise missing_extra("convert", exc) from exc
    names = {i.get_any_name() for i in model.inputs}
    feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
    if precision == "int8":
        q = nncf.quantize(
            model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds)
        )
    else:  # int8-weights
        q = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(q, str(out / "openvino_model.xml"), compress_to_fp16=False)


def convert(
    settings: Settings,
    model: Optional[str] = None,
    *,
    formats: Sequence[str] = ("openvino",),
    precision: str = "fp32",
    calibration: Optional[Path] = None,
    eval_file: Optional[Path] = None,
    bench_seconds: float = 3.0,
    step: Step = _noop,
) -> list[dict]:
    """Convert ``model`` to each format at ``precision``; returns one result (dir, parity, bench) each."""
    if precision == AUTO:
        if list(formats) != ["openvino"]:
            raise ConfigError("--precision auto chooses among OpenVINO variants", "use --format openvino")
        return [choose_precision(settings, model, calibration=calibration, eval_file=eval_file,
                                 bench_seconds=bench_seconds, step=step)]
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", f"choose one of {', '.join(PRECISIONS + (AUTO,))}")
    if precision == "bf16" and not cpu_can("bf16"):
        raise ConfigError(
            f"this CPU cannot compute in bf16 (OpenVINO reports {', '.join(cpu_capabilities()) or 'nothing'})",
            "use --precision auto (it measures what this CPU can do) or fp32 / int8",
        )
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}", "choose openvino, onnx or all")
        if fmt == "onnx" and precision != "fp32":
            raise ConfigError(
                f"ONNX export is fp32 only (asked for {precision})",
                "use --format openvino for fp16/int8, or --precision fp32 for ONNX",
            )
    _no_telemetry()
    _quiet_third_parties(settings.debug)
    ref = store.resolve_model(settings, model)
    source = ref.path
    if not source.is_dir() and ref.repo_id:
        raise ModelNotFound(f"{ref.repo_id} is not downloaded yet", f"run: rerankctl download {ref.repo_id}")
    step("checking the source model")
    require_convert_extra()
    check_source(source)
    pairs = load_pairs_jsonl(calibration) if calibration else CALIBRATION_SET
    eval_set = load_eval_jsonl(eval_file) if eval_file else EVAL_SET
    step("loading the PyTorch reference")
    tok, torch_model = load_reference(source)
    max_length = model_max_length(tok, torch_model)
    src_manifest = store.read_manifest(source)

    results = []
    for fmt in formats:
        final = ref.variant_dir(fmt, precision)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=str(source)))
        try:
            t0 = time.perf_counter()
            step(f"exporting {fmt} {precision}")
            if fmt == "openvino":
                if precision in ("fp32", "bf16"):  # bf16 is the FP32 IR computed in bf16: no new IR
                    _export_openvino(source, tmp)
                else:
                    fp32_tmp = Path(tempfile.mkdtemp(prefix=".fp32-", dir=str(source)))
                    try:
                        _export_openvino(source, fp32_tmp)
                        save_effective_tokenizer(tok, tmp / "tokenizer.json")
                        if precision in ("int8",):
                            step(f"calibrating INT8 on {len(pairs)} pairs")
                        feeds = _calibration_feeds(tmp, max_length, pairs)
                        # NNCF draws its progress bars on stdout: keep stdout for --json
                        with contextlib.redirect_stdout(sys.stderr):
                            _reduce_precision(fp32_tmp / "openvino_model.xml", tmp, precision, feeds)
                    finally:
                        shutil.rmtree(fp32_tmp, ignore_errors=True)
            else:
                _export_onnx(source, tmp, torch_model)
            save_effective_tokenizer(tok, tmp / "tokenizer.json")
            shutil.copy2(source / "config.json", tmp / "config.json")
            manifest = {
                "kind": "variant",
                "format": fmt,
                "precision": precision,
                "inference_precision": "bf16" if precision == "bf16" else "f32",
                "max_length": max_length,
                "source": {
                    "path": str(source),
                    "repo_id": src_manifest.get("repo_id") or ref.repo_id,
                    "commit": src_manifest.get("commit"),
                },
                "rerankctl_version": __version__,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "export_seconds": round(time.perf_counter() - t0, 2),
            }
            store.write_json_atomic(tmp / "manifest.json", manifest)
            step("checking that the server tokenizes like transformers")
            tokens = token_agreement(tok, tmp / "tokenizer.json", max_length, eval_set)
            if not tokens["agree"]:
                raise ConvertError(
                    f"the serving tokenizer does not split text like transformers ({tokens['detail']})",
                    "a bug in rerankctl or an unusual tokenizer: report it with the model's tokenizer files",
                )
            step(f"checking parity of {fmt} {precision} through the serving path")
            parity = check_parity(settings, source, tmp, precision, reference=(tok, torch_model), eval_set=eval_set)
            parity["tokens"] = tokens
            if eval_file:
                parity["eval_set"] = str(eval_file)
            manifest["parity"] = parity
            if not parity["passed"]:
                raise ParityError(
                    f"{fmt} {precision} does not score like the original: max |diff| {parity['max_abs_diff']:.2e}, "
                    f"mean Spearman {parity['mean_spearman']:.3f}, top-1 agreement {parity['top1_agreement']:.0%}, "
                    f"NDCG@10 vs the original {parity['ndcg@10_vs_reference']:.3f}",
                    "nothing was installed; try another precision, or loosen the RERANKER_PARITY_* limits",
                )
            if bench_seconds > 0:
                step(f"measuring {fmt} {precision} speed")
                manifest["bench"] = micro_bench(tmp, settings, bench_seconds)
            manifest["files"] = [
                {"path": p.name, "size": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()
            ]
            store.write_json_atomic(tmp / "manifest.json", manifest)
            _install(tmp, final)
            results.append({"dir": str(final), **manifest})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def _no_telemetry() -> None:
    """OpenVINO's converter and NNCF send usage telemetry unless the user has opted out in ~/intel: each
    send starts helper processes that try the network, in the middle of a conversion, on a machine that may
    have no route out (4 such processes per conversion here). Both fall back to a no-op when
    ``openvino_telemetry`` cannot be imported, so it is made unimportable for this process only: nothing is
    written to the user's home, and their own OpenVINO tools are untouched."""
    import sys

    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment] - "import" now raises ImportError


def _quiet_third_parties(debug: bool) -> None:
    """transformers, torch.onnx and nncf print pages of warnings; the user gets our progress instead."""
    if debug:
        return
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")
    for name in ("nncf", "torch.onnx", "torch._export", "torch.export", "optimum", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


BUILDS_DIR = ".builds"
KEEP_BUILDS = 2
IN_USE = ".in-use"


def _install(tmp: Path, final: Path) -> Path:
    """Land the finished folder as a build of its own and switch the ``final`` pointer to it atomically.

    ``final`` (e.g. ``openvino-fp32``) is a symlink to ``.builds/openvino-fp32-<time>-<id>``: a variant is
    never replaced in place, so a running server keeps what it loaded (and its workers respawn from it)
    until it is reloaded. Older builds are pruned, except the newest ``KEEP_BUILDS`` and any that a
    server holds (a shared lock on its ``.in-use`` file).
    """
    import secrets

    builds = final.parent / BUILDS_DIR
    builds.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    build = builds / f"{final.name}-{stamp}-{secrets.token_hex(3)}"
    tmp.rename(build)
    (build / IN_USE).touch()
    if final.exists() and not final.is_symlink():  # a folder from before builds existed: becomes one
        final.rename(builds / f"{final.name}-{stamp}-legacy-{secrets.token_hex(3)}")
    _point(final, build)
    prune_builds(final)
    return build


def _point(pointer: Path, build: Path) -> None:
    """Switch the variant name ``pointer`` to ``build`` atomically: readers see the old build or the new
    one, never nothing, and a running server keeps what it loaded."""
    import secrets

    link = pointer.with_name(f".{pointer.name}.link-{secrets.token_hex(4)}")
    os.symlink(os.path.relpath(build, pointer.parent), link)
    os.replace(link, pointer)


# A build's folder: <variant>-<YYYYmmddTHHMMSS>-[legacy-]<6 hex>. The variant is what precedes the stamp, so
# openvino-int8's builds are never openvino-int8-weights' (a glob of "openvino-int8-*" matched both).
_BUILD_NAME = re.compile(r"^(?P<variant>.+)-\d{8}T\d{6}-(?:legacy-)?[0-9a-f]{6}$")


def build_of(folder: str) -> Optional[str]:
    """The variant a build folder belongs to, or None for a name that is not a build's."""
    m = _BUILD_NAME.match(folder)
    return m.group("variant") if m else None


def prune_builds(final: Path, keep: int = KEEP_BUILDS) -> list[Path]:
    """Remove old builds of ``final``: never the current one, never the newest ``keep``, never one in use."""
    import fcntl

    builds = final.parent / BUILDS_DIR
    current = final.resolve() if final.is_symlink() else None
    pointed = {p.resolve() for p in final.parent.iterdir() if p.is_symlink()}  # e.g. openvino-auto
    mine = sorted((b for b in builds.glob(f"{final.name}-*") if b.is_dir() and build_of(b.name) == final.name),
                  key=lambda b: b.stat().st_mtime, reverse=True)
    removed = []
    for build in mine[keep:]:
        if (current is not None and build.resolve() == current) or build.resolve() in pointed:
            continue
        marker = build / IN_USE
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a server runs from it
            shutil.rmtree(build, ignore_errors=True)
            removed.append(build)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


# --------------------------------------------------------------------------------------------------------
# the precision this CPU should serve
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` (FP32, INT8, BF16, FP16, ...), asked once."""
    import openvino as ov

    try:
        return tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - an old plugin without the property: assume the minimum
        return ("FP32",)


def cpu_can(precision: str) -> bool:
    return {"bf16": "BF16"}.get(precision, "FP32") in cpu_capabilities()


AUTO_CANDIDATES = ("fp32", "int8", "bf16")


def choose_precision(
    settings: Settings,
    model: Optional[str] = None,
    *,
    calibration: Optional[Path] = None,
    eval_file: Optional[Path] = None,
    bench_seconds: float = 3.0,
    rounds: int = 3,
    step: Step = _noop,
    candidates: Sequence[str] = AUTO_CANDIDATES,
) -> dict:
    """Build every candidate this CPU can run, each checked against the PyTorch reference on the evaluation
    set by ``convert`` (top-1 agreement, mean Spearman, NDCG@10 against the reference's ranking, within the
    RERANKER_PARITY_* limits); measure the speed of those that pass in interleaved rounds (the median of
    ``rounds``, so a noisy neighbour hurts all alike); point ``openvino-auto`` at the fastest, unless it is
    not at least RERANKER_AUTO_MIN_SPEEDUP times FP32's speed: then FP32. The record (every candidate, its
    figures or why it was left out, and the reason for the choice) goes to ``auto-choice.json``."""
    import statistics

    ref = store.resolve_model(settings, model)
    record: dict = {"kind": "auto-choice", "cpu_capabilities": list(cpu_capabilities()), "candidates": {},
                    "eval_set": str(eval_file) if eval_file else "built-in",
                    "min_speedup": settings.auto_min_speedup,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    built: dict[str, Path] = {}
    for precision in candidates:
        entry: dict = {}
        record["candidates"][precision] = entry
        if not cpu_can(precision):
            entry.update(status="unavailable", reason=f"this CPU cannot compute in {precision}")
            continue
        step(f"auto: building and checking {precision}")
        try:
            result = convert(settings, model, formats=["openvino"], precision=precision, calibration=calibration,
                             eval_file=eval_file, bench_seconds=0, step=step)[0]
        except ParityError as exc:
            if precision == "fp32":
                raise
            entry.update(status="rejected", reason=exc.message)
            continue
        built[precision] = Path(result["dir"])
        parity = result["parity"]
        entry.update(status="passed", dir=result["dir"], max_abs_diff=parity["max_abs_diff"],
                     mean_spearman=parity["mean_spearman"], top1_agreement=parity["top1_agreement"],
                     ndcg_vs_reference=parity["ndcg@10_vs_reference"])
    speeds: dict[str, list[float]] = {p: [] for p in built}
    per_round = max(0.5, bench_seconds / max(1, rounds))
    for r in range(rounds):
        for precision, variant in built.items():
            step(f"auto: measuring {precision} (round {r + 1}/{rounds})")
            speeds[precision].append(micro_bench(variant, settings, per_round)["pairs_per_s"])
    for precision, xs in speeds.items():
        record["candidates"][precision]["pairs_per_s"] = round(statistics.median(xs), 2)
        record["candidates"][precision]["pairs_per_s_rounds"] = xs
    base = record["candidates"]["fp32"]["pairs_per_s"]
    for precision in speeds:
        record["candidates"][precision]["speedup"] = round(record["candidates"][precision]["pairs_per_s"] / base, 3)
    chosen, reason = decide(record["candidates"], settings.auto_min_speedup)
    record["chosen"] = chosen
    record["reason"] = reason
    target = built[chosen].resolve()
    pointer = ref.variant_dir("openvino", AUTO)
    _point(pointer, target)
    store.write_json_atomic(ref.path / AUTO_RECORD, record)
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    return {"dir": str(pointer), **manifest, "auto": record}


def decide(candidates: dict, min_speedup: float) -> tuple[str, str]:
    """The fastest reduced precision that passed the fidelity check, if it is at least ``min_speedup`` times
    FP32's speed; else FP32, with the reason naming what each other candidate lacked."""
    passed = {p: e for p, e in candidates.items() if p != "fp32" and e.get("status") == "passed"}
    if passed:
        best = max(passed, key=lambda p: passed[p]["speedup"])
        if passed[best]["speedup"] >= min_speedup:
            return best, (f"{best}: {passed[best]['speedup']:.2f}x FP32's speed on this CPU (needs {min_speedup:g}x)"
                          f" and within the fidelity limits")
    why = []
    for p, e in candidates.items():
        if p == "fp32":
            continue
        if e.get("status") != "passed":
            why.append(f"{p} {e.get('status')}: {e.get('reason')}")
        else:
            why.append(f"{p} only {e['speedup']:.2f}x FP32's speed (needs {min_speedup:g}x)")
    return "fp32", "FP32: " + ("; ".join(why) if why else "no other candidate")


def read_auto_choice(model_dir: Path) -> dict:
    path = Path(model_dir) / AUTO_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
