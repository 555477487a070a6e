"""`rerankctl convert`: every format and precision, parity through the serving path, and that parity bites."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import clean_env, run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path) -> Path:
    dst = tmp_path / "models" / "tiny-model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _reference_and_served(source: Path, variant: Path):
    """Scores of the eval set by transformers (the reference) and by the serving engine, computed here."""
    from reranker_ops.models.evalset import EVAL_SET
    from reranker_ops.models.reference import (
        load_reference,
        model_max_length,
        reference_scores,
    )
    from reranker_ops.worker.engine import Scorer, sigmoid

    tok, model = load_reference(source)
    scorer = Scorer(variant)
    ref, got = [], []
    for item in EVAL_SET:
        ref.append(reference_scores(tok, model, item["query"], item["passages"], model_max_length(tok, model)))
        got.append(sigmoid(scorer.score(item["query"], item["passages"])))
    return ref, got


def test_convert_all_formats_fp32_with_parity(model_copy, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    res = run_cli(["convert", str(model_copy), "--format", "all", "--precision", "fp32", "--bench-seconds", "0.2"],
                  env=clean_env(HOME=str(home)), timeout=240)
    assert res.returncode == 0, res.stderr
    # OpenVINO's converter sends usage telemetry unless told not to, and keeps a client id in ~/intel
    assert not (home / "intel").exists(), sorted(str(p) for p in home.rglob("*"))
    for fmt in ("openvino", "onnx"):
        variant = model_copy / f"{fmt}-fp32"
        manifest = json.loads((variant / "manifest.json").read_text())
        assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-4
        assert manifest["bench"]["pairs_per_s"] > 0
        assert manifest["max_length"] == 512
        assert (variant / "tokenizer.json").is_file()
        ref, got = _reference_and_served(model_copy, variant)
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r, atol=1e-4)
            assert np.ptp(r) > 0.05, "the tiny model must rank, or parity proves nothing"
    # nothing half-built is left beside the variants; each variant is a pointer to a finished build
    assert not [p for p in model_copy.iterdir() if p.name.startswith(".") and p.name != ".builds"]
    for fmt in ("openvino", "onnx"):
        assert (model_copy / f"{fmt}-fp32").is_symlink()
        assert (model_copy / f"{fmt}-fp32").resolve().parent == (model_copy / ".builds").resolve()


def _task_scores(source: Path, variant: Path):
    """The trained model's held-out queries scored by transformers and by the serving engine."""
    from reranker_ops.models.evalset import load_eval_jsonl
    from reranker_ops.models.reference import (
        load_reference,
        model_max_length,
        reference_scores,
    )
    from reranker_ops.worker.engine import Scorer, sigmoid

    items = load_eval_jsonl(source / "eval.jsonl")
    tok, model = load_reference(source)
    scorer = Scorer(variant)
    ref = [reference_scores(tok, model, it["query"], it["passages"], model_max_length(tok, model)) for it in items]
    got = [sigmoid(scorer.score(it["query"], it["passages"])) for it in items]
    return items, ref, got


def _bf16_unless_unavailable():
    from reranker_ops.models.auto import cpu_can

    return pytest.param("bf16", marks=pytest.mark.skipif(not cpu_can("bf16"), reason=(
        "this CPU cannot compute in bf16 (OpenVINO would silently compute f32): its refusal is tested instead")))


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-weights", _bf16_unless_unavailable()])
def test_convert_reduced_precisions_keep_the_ranking_of_a_trained_model(trained_copy, precision):
    """Judged on a model trained here (a random one ranks nothing, so any perturbation 'reorders' it)."""
    from modelkit.trained import ranking_quality

    res = run_cli(["convert", str(trained_copy), "--precision", precision, "--bench-seconds", "0.2",
                   "--eval", str(trained_copy / "eval.jsonl"), "--calibration", str(trained_copy / "calibration.jsonl")],
                  timeout=240)
    assert res.returncode == 0, res.stderr
    variant = trained_copy / f"openvino-{precision}"
    parity = json.loads((variant / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["mean_spearman"] >= 0.9 - 1e-9 and parity["top1_agreement"] >= 0.8
    assert parity["ndcg@10_vs_reference"] >= 0.95 and parity["queries"] == 40
    items, ref, got = _task_scores(trained_copy, variant)
    assert max(float(np.max(np.abs(r - g))) for r, g in zip(ref, got)) == pytest.approx(parity["max_abs_diff"], rel=1e-6)
    # the task's own quality is kept: the served variant ranks the held-out queries as well as the original
    q_ref = ranking_quality(lambda q, ps: ref[[it["query"] for it in items].index(q)], items)
    q_got = ranking_quality(lambda q, ps: got[[it["query"] for it in items].index(q)], items)
    print(f"{precision}: NDCG@10 {q_ref['ndcg@10']} -> {q_got['ndcg@10']}, MRR {q_ref['mrr']} -> {q_got['mrr']},"
          f" max |diff| {parity['max_abs_diff']:.3f}")
    assert q_got["ndcg@10"] >= q_ref["ndcg@10"] - 0.02 and q_got["mrr"] >= q_ref["mrr"] - 0.05
    assert parity["ndcg@10"]["candidate"] == pytest.approx(q_got["ndcg@10"], abs=1e-3)
    listed = run_cli(["convert", str(trained_copy), "--list", "--json"])
    assert listed.returncode == 0
    assert [v["precision"] for v in json.loads(listed.stdout)] == [precision]


def test_int8_calibration_file_is_used(trained_copy, tmp_path):
    # A degenerate calibration set (one query, near-identical passages) gives a bad INT8 that parity rejects:
    # proof that the file is what calibrates, and that nothing is installed when parity fails.
    poor = tmp_path / "poor.jsonl"
    poor.write_text("\n".join(json.dumps({"query": "кака", "passage": f"кака {i}"}) for i in range(12)))
    evalset = ["--eval", str(trained_copy / "eval.jsonl"), "--bench-seconds", "0"]
    res = run_cli(["convert", str(trained_copy), "--precision", "int8", "--calibration", str(poor), *evalset],
                  timeout=240)
    assert res.returncode == 7 and "does not score like the original" in res.stderr, res.stderr
    assert not (trained_copy / "openvino-int8").exists()
    home = tmp_path / "home"
    home.mkdir()
    res = run_cli(["convert", str(trained_copy), "--precision", "int8", "--calibration",
                   str(trained_copy / "calibration.jsonl"), *evalset, "--json"], env=clean_env(HOME=str(home)),
                  timeout=240)
    assert res.returncode == 0, res.stderr
    assert not (home / "intel").exists(), "NNCF or OpenVINO's converter kept a telemetry client id"
    assert json.loads((trained_copy / "openvino-int8" / "manifest.json").read_text())["parity"]["passed"]
    assert json.loads(res.stdout)[0]["precision"] == "int8"  # NNCF's progress bars stay off stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": 1}\n')
    res = run_cli(["convert", str(trained_copy), "--precision", "int8", "--calibration", str(bad)])
    assert res.returncode != 0 and "bad.jsonl:1" in res.stderr and "Traceback" not in res.stderr


def test_the_trained_model_really_ranks(trained_model_dir):
    """Its held-out quality is recorded, and far above what random scores give."""
    import random

    from modelkit.trained import ranking_quality

    from reranker_ops.models.evalset import load_eval_jsonl

    quality = json.loads((trained_model_dir / "training.json").read_text())["held_out"]
    items = load_eval_jsonl(trained_model_dir / "eval.jsonl")
    rng = random.Random(0)
    chance = ranking_quality(lambda q, ps: [rng.random() for _ in ps], items)
    print(f"trained: {quality}; random scores: {chance}")
    assert quality["ndcg@10"] >= 0.85 and quality["mrr"] >= 0.85
    assert quality["ndcg@10"] - chance["ndcg@10"] >= 0.2 and quality["mrr"] - chance["mrr"] >= 0.3


def test_parity_check_bites_on_dropped_segment_ids_and_wrong_truncation(tiny_fp32, tmp_path):
    from reranker_ops.models.judge import check_parity
    from reranker_ops.settings import Settings

    settings = Settings()
    source = Path(json.loads((tiny_fp32 / "manifest.json").read_text())["source"]["path"])
    good = check_parity(settings, source, tiny_fp32, "fp32")
    assert good["passed"]

    # 1. segment ids dropped: the passage's token_type_ids become 0, as in peers that send zeros
    no_segments = tmp_path / "no-segments"
    shutil.copytree(tiny_fp32, no_segments)
    tok = json.loads((no_segments / "tokenizer.json").read_text())
    for piece in tok["post_processor"]["pair"]:
        for v in piece.values():
            v["type_id"] = 0
    (no_segments / "tokenizer.json").write_text(json.dumps(tok))
    bad = check_parity(settings, source, no_segments, "fp32")
    assert not bad["passed"] and bad["max_abs_diff"] > 1e-3

    # 2. wrong truncation: the variant truncates at 64 tokens instead of the model's 512
    short = tmp_path / "short"
    shutil.copytree(tiny_fp32, short)
    m = json.loads((short / "manifest.json").read_text())
    m["max_length"] = 64
    (short / "manifest.json").write_text(json.dumps(m))
    bad = check_parity(settings, source, short, "fp32")
    assert not bad["passed"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_give_clear_error_and_no_folder(model_copy, damage):
    st = model_copy / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    res = run_cli(["convert", str(model_copy), "--bench-seconds", "0"])
    assert res.returncode != 0
    assert "corrupt" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in model_copy.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])


def test_corrupt_weights_caught_by_the_download_manifest(model_copy):
    from reranker_ops.models.store import sha256_file, write_json_atomic

    st = model_copy / "model.safetensors"
    write_json_atomic(model_copy / "manifest.json", {"repo_id": "t/t", "commit": "c", "files": [
        {"path": "model.safetensors", "size": st.stat().st_size, "sha256": sha256_file(st)}]})
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the weights: loadable, but not what was downloaded
    st.write_bytes(bytes(data))
    res = run_cli(["convert", str(model_copy), "--bench-seconds", "0"])
    assert res.returncode != 0 and "does not match its download manifest" in res.stderr
    assert not (model_copy / "openvino-fp32").exists()


def test_missing_convert_extra_is_one_clear_line(model_copy, tmp_path):
    # Simulate an install without the extra: optimum cannot be imported in the child.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import sys\nsys.modules['optimum'] = None\n")
    env = clean_env(PYTHONPATH=str(tmp_path / "site"))
    res = run_cli(["convert", str(model_copy), "--bench-seconds", "0"], env=env)
    assert res.returncode != 0
    assert "pip install 'rerankctl[convert]'" in res.stderr and "Traceback" not in res.stderr


def test_onnx_rejects_reduced_precision(model_copy):
    res = run_cli(["convert", str(model_copy), "--format", "onnx", "--precision", "int8"])
    assert res.returncode != 0 and "fp32 only" in res.stderr


def test_a_tokenizer_config_that_disagrees_with_tokenizer_json_converts_and_serves_like_transformers(
        tiny_model_dir, tmp_path, make_server):
    """tokenizer_config.json says do_lower_case while tokenizer.json keeps case: transformers lowercases
    (it rebuilds the tokenizer from the config). The server must tokenize as the reference does."""
    from reranker_ops.models.reference import (
        load_reference,
        model_max_length,
        reference_scores,
    )

    model = tmp_path / "models" / "cased-json"
    shutil.copytree(tiny_model_dir, model)
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["normalizer"]["lowercase"] = False
    (model / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc["do_lower_case"] = True
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    tok, ref_model = load_reference(model)
    assert tok("Борщ MOSEC")["input_ids"] == tok("борщ mosec")["input_ids"]  # the reference lowercases
    res = run_cli(["convert", str(model), "--precision", "fp32", "--bench-seconds", "0"], timeout=240)
    assert res.returncode == 0, res.stderr
    parity = json.loads((model / "openvino-fp32" / "manifest.json").read_text())["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["tokens"]["agree"]
    server = make_server(model_dir=model)
    import httpx

    docs = ["Борщ — СУП из Свёклы.", "MOSEC Server", "Завтра ДОЖДЬ."]
    got = httpx.post(server.base + "/rerank", json={"query": "Как Приготовить БОРЩ", "documents": docs}).json()
    want = reference_scores(tok, ref_model, "Как Приготовить БОРЩ", docs, model_max_length(tok, ref_model))
    np.testing.assert_allclose(got["scores"], want, atol=1e-4)


def test_a_safetensors_file_is_checked_against_its_own_header(tiny_model_dir, tmp_path):
    """Before torch is imported: a truncated file, a zeroed header, or bytes past the last tensor."""
    from reranker_ops.errors import ConvertError
    from reranker_ops.models.reference import check_safetensors_layout

    good = tiny_model_dir / "model.safetensors"
    check_safetensors_layout(good)
    data = good.read_bytes()
    for name, damaged in (("half", data[: len(data) // 2]), ("zeroed", b"\x00" * 64 + data[64:]),
                          ("longer", data + b"\x00"), ("empty", b""), ("header", data[:8] + b"{not json" + data[17:])):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(damaged)
        with pytest.raises(ConvertError, match="corrupt or truncated"):
            check_safetensors_layout(path)
