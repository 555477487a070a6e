"""``convert --precision auto``: build the candidates this CPU can run, keep those that pass the fidelity check,
measure them side by side, and point ``auto`` at the one to serve; the record of why goes to
``auto-choice.json``."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


from ..errors import ParityError
from ..settings import Settings
from . import store
from .store import AUTO
from .builds import point_at
from .judge import micro_bench

AUTO_RECORD = "auto-choice.json"  # in the model folder: what `convert --precision auto` measured and chose
Step = Callable[[str], None]


def no_step(_msg: str) -> None:
    pass


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
    step: Step = no_step,
    candidates: Sequence[str] = AUTO_CANDIDATES,
    build: Callable[..., list[dict]],  # convert(), which calls this module for precision auto
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
            result = build(settings, model, formats=["openvino"], precision=precision, calibration=calibration,
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
    point_at(pointer, target)
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
