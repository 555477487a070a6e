"""Export a cross-encoder to OpenVINO IR or ONNX, quantize it, and prove it scores like the original.

Needs the ``convert`` extra (optimum-intel, nncf, torch, transformers), imported lazily. Every variant is
built in a temporary folder beside its final place and renamed into place only after parity passed, so
``serve`` never picks up a half-written or wrong model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import __version__
from ..settings import Settings
from ..errors import ConfigError, ConvertError, ModelNotFound, ParityError, missing_extra
from . import store
from .auto import Step, choose_precision, cpu_can, cpu_capabilities, no_step
from .builds import install_build
from .evalset import CALIBRATION_SET, EVAL_SET, load_eval_jsonl, load_pairs_jsonl
from .judge import check_parity, micro_bench
from .reference import (check_source, load_reference, model_max_length, require_convert_extra,
                        save_effective_tokenizer, token_agreement)
from .store import AUTO

FORMATS = ("openvino", "onnx")
PRECISIONS = ("fp32", "fp16", "int8", "int8-weights", "bf16")


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
    from ..worker.engine import Tokenizer

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
    step: Step = no_step,
) -> list[dict]:
    """Convert ``model`` to each format at ``precision``; returns one result (dir, parity, bench) each."""
    if precision == AUTO:
        if list(formats) != ["openvino"]:
            raise ConfigError("--precision auto chooses among OpenVINO variants", "use --format openvino")
        return [choose_precision(settings, model, calibration=calibration, eval_file=eval_file,
                                 bench_seconds=bench_seconds, step=step, build=convert)]
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
            install_build(tmp, final)
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
