"""`rerankctl download` end to end against a fake hub on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env, free_port, run_cli
from fakehub import FakeHub, folder_files

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def hub(tiny_model_dir):
    with FakeHub() as h:
        h.add_repo("test/tiny", folder_files(tiny_model_dir))
        yield h


def hub_env(hub, **extra):
    return clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(Path(extra.pop("home", "/nonexistent-hf-home"))), **extra)


def test_download_writes_a_correct_manifest(hub, tmp_path, tiny_model_dir):
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=hub_env(hub, home=tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "test--tiny"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["repo_id"] == "test/tiny"
    assert manifest["commit"] == hub.repos["test/tiny"].refs["main"]
    names = {f["path"] for f in manifest["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    for f in manifest["files"]:
        data = (tiny_model_dir / f["path"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
        assert f["size"] == len(data)
    # pinned: every file request named the resolved commit, not the branch
    file_reqs = [r for r in hub.requests if "/resolve/" in r["path"]]
    assert file_reqs and all(manifest["commit"] in r["path"] for r in file_reqs)


def test_download_resumes_after_interruption(hub, tmp_path, tiny_model_dir):
    # A 24 MB file, paced after the first 10.5 MB, so the kill lands mid-transfer.
    files = dict(folder_files(tiny_model_dir), **{"model.safetensors": os.urandom(24 * 1024 * 1024)})
    hub.add_repo("test/big", files)
    hub.throttle["model.safetensors"] = (int(10.5 * 1024 * 1024), 0.01)
    env = hub_env(hub, home=tmp_path / "hf")
    proc = subprocess.Popen([sys.executable, "-m", "reranker_ops", "download", "test/big", "--models-dir", str(tmp_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "test--big"
    deadline = time.monotonic() + 60
    partial = []
    while time.monotonic() < deadline:
        # the big file's own partial: a small file caught mid-write would let the kill land before the big
        # file was asked for at all (seen once: the resume then had nothing to resume)
        partial = ([p for p in folder.rglob("model.safetensors.partial") if p.stat().st_size > 0]
                   if folder.exists() else [])
        if partial:
            break
        assert proc.poll() is None, "download finished before it could be interrupted"
        time.sleep(0.05)
    assert partial, "no partial file appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not (folder / "manifest.json").exists(), "an interrupted download must leave no manifest"

    hub.throttle.clear()
    res = run_cli(["download", "test/big", "--models-dir", str(tmp_path)], env=env)
    assert res.returncode == 0, res.stderr
    ranges = [r["range"] for r in hub.requests if r["path"].endswith("model.safetensors") and r["method"] == "GET"]
    assert any(r and r.startswith("bytes=") and not r.startswith("bytes=0-") for r in ranges), ranges
    manifest = json.loads((folder / "manifest.json").read_text())
    st = next(f for f in manifest["files"] if f["path"] == "model.safetensors")
    data = hub.repos["test/big"].files_by_commit[manifest["commit"]]["model.safetensors"]
    assert st["sha256"] == hashlib.sha256(data).hexdigest()


def test_download_pinned_revision(hub, tmp_path, tiny_model_dir):
    files = folder_files(tiny_model_dir)
    old = hub.repos["test/tiny"].refs["main"]
    newer = dict(files, **{"config.json": files["config.json"].replace(b"{", b'{"_newer": true,', 1)})
    new = hub.add_repo("test/tiny", newer, commit="b" * 40)
    assert new != old
    res = run_cli(["download", "test/tiny", "--revision", old, "--models-dir", str(tmp_path)], env=hub_env(hub))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "test--tiny" / "manifest.json").read_text())
    assert manifest["commit"] == old
    assert b"_newer" not in (tmp_path / "test--tiny" / "config.json").read_bytes()
    # pinned means pinned: a plain download keeps the commit it has (no silent move to a newer main)
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=hub_env(hub))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "test--tiny" / "manifest.json").read_text())["commit"] == old
    # an upgrade is asked for by name
    res = run_cli(["download", "test/tiny", "--revision", "main", "--models-dir", str(tmp_path)], env=hub_env(hub))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "test--tiny" / "manifest.json").read_text())["commit"] == new
    assert b"_newer" in (tmp_path / "test--tiny" / "config.json").read_bytes()


def test_pickle_only_repo_is_refused(hub, tmp_path, tiny_model_dir):
    files = {k: v for k, v in folder_files(tiny_model_dir).items() if k != "model.safetensors"}
    files["pytorch_model.bin"] = b"\x80\x04 not really a pickle"
    hub.add_repo("test/pickled", files)
    res = run_cli(["download", "test/pickled", "--models-dir", str(tmp_path)], env=hub_env(hub))
    assert res.returncode != 0
    assert "pickle" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("*.bin"))
    assert not any("/resolve/" in r["path"] for r in hub.requests)


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "a/../b", "owner/name/extra", "no-slash", "a/b.."])
def test_bad_repo_id_refused_before_any_request(hub, tmp_path, bad):
    res = run_cli(["download", bad, "--models-dir", str(tmp_path)], env=hub_env(hub))
    assert res.returncode != 0
    assert "invalid repo id" in res.stderr
    assert hub.requests == []
    assert list(tmp_path.iterdir()) == []


def test_nul_in_repo_id_refused():
    from reranker_ops.errors import ConfigError
    from reranker_ops.models.store import validate_repo_id

    with pytest.raises(ConfigError):
        validate_repo_id("a/b\x00c")


def test_hub_unreachable(tmp_path):
    port = free_port()  # nothing listens there
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)],
                  env=clean_env(HF_ENDPOINT=f"http://127.0.0.1:{port}"), timeout=90)
    assert res.returncode != 0
    assert "unreachable" in res.stderr and "Traceback" not in res.stderr


def test_missing_repo_and_offline_and_gated(hub, tmp_path, tiny_model_dir):
    res = run_cli(["download", "test/missing", "--models-dir", str(tmp_path)], env=hub_env(hub))
    assert res.returncode != 0 and "not found" in res.stderr

    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=hub_env(hub, HF_HUB_OFFLINE="1"))
    assert res.returncode != 0 and "offline" in res.stderr

    hub.add_repo("test/gated", folder_files(tiny_model_dir), gated=True)
    res = run_cli(["download", "test/gated", "--models-dir", str(tmp_path)], env=hub_env(hub, HF_TOKEN="hf_bad"))
    assert res.returncode != 0 and "gated" in res.stderr
    assert "hf_bad" not in res.stderr + res.stdout
    res = run_cli(["download", "test/gated", "--models-dir", str(tmp_path)], env=hub_env(hub, HF_TOKEN="hf_good"))
    assert res.returncode == 0, res.stderr
    assert "hf_good" not in res.stderr + res.stdout
    assert any(r["auth"] == "Bearer hf_good" for r in hub.requests)


def test_a_complete_download_asks_no_hub_and_works_offline(hub, tmp_path):
    env = hub_env(hub, home=tmp_path / "hf")
    assert run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=env).returncode == 0
    asked = len(hub.requests)
    # the hub is gone (an offline boot): a pinned, complete download is still a success, from disk
    offline = clean_env(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"))
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=offline)
    assert res.returncode == 0, res.stderr
    assert len(hub.requests) == asked
    # naming the commit it holds is the same; naming a branch asks the hub (an explicit upgrade)
    commit = hub.repos["test/tiny"].refs["main"]
    assert run_cli(["download", "test/tiny", "--models-dir", str(tmp_path), "--revision", commit[:10]],
                   env=offline).returncode == 0
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path), "--revision", "main"], env=offline)
    assert res.returncode != 0


def test_a_same_size_file_is_replaced_across_revisions(hub, tmp_path, tiny_model_dir):
    env = hub_env(hub, home=tmp_path / "hf")
    assert run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=env).returncode == 0
    files = folder_files(tiny_model_dir)
    config = files["config.json"]
    changed = config.replace(b'"gelu"', b'"relu"', 1)
    assert changed != config and len(changed) == len(config)
    new_commit = hub.add_repo("test/tiny", {**files, "config.json": changed}, commit="b" * 40, branch="v2")
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path), "--revision", "v2"], env=env)
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "test--tiny"
    assert (folder / "config.json").read_bytes() == changed
    assert json.loads((folder / "manifest.json").read_text())["commit"] == new_commit


def test_the_weights_hash_is_checked(hub, tmp_path, tiny_model_dir):
    real = (tiny_model_dir / "model.safetensors").read_bytes()
    hub.corrupt["model.safetensors"] = bytes(len(real))  # right size, wrong content
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=hub_env(hub, home=tmp_path / "hf"))
    assert res.returncode != 0 and "sha256 check" in res.stderr, res.stderr
    assert not (tmp_path / "test--tiny" / "manifest.json").exists()
    assert not (tmp_path / "test--tiny" / "model.safetensors").exists()


def test_a_file_without_lfs_is_checked_too_and_a_changed_one_is_refused(hub, tmp_path, tiny_model_dir):
    """tokenizer.json and config.json are plain git files: their git blob id is checked after the download
    like an LFS file's sha256 (it was not); a same-size change is refused and the file deleted."""
    data = (tiny_model_dir / "tokenizer.json").read_bytes()
    hub.corrupt["tokenizer.json"] = data.replace(b"[UNK]", b"[UNX]", 1)
    assert len(hub.corrupt["tokenizer.json"]) == len(data)
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=hub_env(hub, home=tmp_path / "hf"))
    assert res.returncode != 0 and "tokenizer.json failed its git blob id check" in res.stderr, res.stderr
    folder = tmp_path / "test--tiny"
    assert not (folder / "tokenizer.json").exists() and not (folder / "manifest.json").exists()
    del hub.corrupt["tokenizer.json"]
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path)], env=hub_env(hub, home=tmp_path / "hf"))
    assert res.returncode == 0, res.stderr


def test_a_hub_without_sizes_still_checks_every_file_and_one_without_checksums_is_refused(hub, tmp_path):
    hub.omit = {"size"}
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path / "a")], env=hub_env(hub, home=tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    hub.corrupt["config.json"] = b"{}"  # another size, and no size to compare with: the checksum catches it
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path / "b")], env=hub_env(hub, home=tmp_path / "hf"))
    assert res.returncode != 0 and "config.json failed its git blob id check" in res.stderr, res.stderr
    hub.corrupt.clear()
    hub.omit = {"blobId"}
    res = run_cli(["download", "test/tiny", "--models-dir", str(tmp_path / "c")], env=hub_env(hub, home=tmp_path / "hf"))
    assert res.returncode != 0 and "no checksum" in res.stderr and "config.json" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
