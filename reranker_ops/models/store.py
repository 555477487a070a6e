"""Where models live, and how they get there.

Layout under ``models_dir``::

    <org>--<name>/               a hub download (or any local folder the user points at)
        manifest.json            repo, resolved commit, files with size and sha256 (written last, atomically)
        config.json, model.safetensors, tokenizer.json, ...
        openvino-fp32/           a converted variant (see convert.py), with its own manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..protocol.atomic import write_json_atomic
from ..settings import Settings
from ..errors import ConfigError, DownloadError, ModelNotFound

AUTO = "auto"  # the precision `convert --precision auto` chooses; its variant folder is a pointer to the choice

# Weights in safetensors only; config and tokenizer files. Never *.bin / *.pt / *.pkl (pickle).
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "README.md",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MANIFEST = "manifest.json"


def validate_repo_id(repo_id: str) -> str:
    """Reject anything that is not ``owner/name`` before touching disk or network."""
    if not repo_id or "\x00" in repo_id or ".." in repo_id or repo_id.startswith(("/", "~", "\\")):
        raise ConfigError(
            f"invalid repo id {repo_id!r}",
            "give one like 'DiTy/cross-encoder-russian-msmarco' (owner/name, no '..', no absolute path)",
        )
    if not REPO_ID_RE.match(repo_id) or repo_id.endswith((".git", ".")):
        raise ConfigError(
            f"invalid repo id {repo_id!r}",
            "give one like 'DiTy/cross-encoder-russian-msmarco' (owner/name of letters, digits, '.', '_', '-')",
        )
    return repo_id


def local_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


@dataclass
class ModelRef:
    """A resolved ``--model``: the folder it lives in, and the repo id it came from if any."""

    path: Path
    repo_id: Optional[str]

    @property
    def name(self) -> str:
        return self.repo_id or self.path.name

    def variant_dir(self, fmt: str, precision: str) -> Path:
        return self.path / f"{fmt}-{precision}"


def resolve_model(settings: Settings, model: Optional[str] = None) -> ModelRef:
    """``model`` is a path to a local folder, a name under models_dir, or a hub repo id."""
    value = model or settings.model
    if "\x00" in value:
        raise ConfigError("invalid model name (NUL character)", "give a repo id, a name or a folder path")
    as_path = Path(os.path.expanduser(value))
    if as_path.is_dir() and (as_path.is_absolute() or value.startswith((".", "~")) or (as_path / "config.json").exists()):
        manifest = read_manifest(as_path)
        return ModelRef(as_path.resolve(), manifest.get("repo_id"))
    under = settings.models_dir / value
    if "/" not in value and under.is_dir():
        manifest = read_manifest(under)
        return ModelRef(under.resolve(), manifest.get("repo_id"))
    if "/" in value and not value.startswith((".", "/", "~")):
        validate_repo_id(value)
        return ModelRef((settings.models_dir / local_name(value)).resolve(), value)
    raise ModelNotFound(
        f"no model folder {value!r} (looked at {as_path} and {under})",
        "give a repo id like 'owner/name', a name under the models dir, or a path to a model folder",
    )


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, str], None]  # (bytes done, bytes total, current description)


def _map_hub_error(exc: BaseException, repo_id: str, revision: Optional[str]) -> DownloadError:
    from huggingface_hub import errors as hf_errors

    name = type(exc).__name__
    if isinstance(exc, getattr(hf_errors, "OfflineModeIsEnabled", ())):
        return DownloadError(
            "offline mode is on (HF_HUB_OFFLINE=1), so nothing can be downloaded",
            "unset HF_HUB_OFFLINE, or copy the model folder into the models dir and use --model PATH",
        )
    if isinstance(exc, hf_errors.GatedRepoError):
        return DownloadError(
            f"{repo_id} is gated and this token has no access",
            "accept the model's terms on the hub, then set HF_TOKEN to a token that has access",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return DownloadError(f"revision {revision!r} not found in {repo_id}", "check the branch, tag or commit")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return DownloadError(
            f"repository {repo_id} not found on the hub (or it is private)",
            "check the repo id; for a private repo set HF_TOKEN",
        )
    code = getattr(exc, "code", "")
    if code == "GatedRepo":
        return DownloadError(
            f"{repo_id} is gated and this token has no access",
            "accept the model's terms on the hub, then set HF_TOKEN to a token that has access",
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return DownloadError(f"the hub refused access to {repo_id} (HTTP {status})", "set HF_TOKEN to a valid token")
    if status is not None:
        return DownloadError(f"the hub answered HTTP {status} for {repo_id}", "try again later")
    return DownloadError(
        f"the hub is unreachable ({name})",
        "check the network or HF_ENDPOINT, then run the same command again: it resumes",
    )


def download(
    settings: Settings,
    repo_id: str,
    revision: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
) -> Path:
    """Download ``repo_id`` pinned to its resolved commit; returns the model folder.

    The manifest is written last and atomically, so a folder with a manifest is a complete download and a
    folder without one is an interrupted one that the next call resumes.
    """
    validate_repo_id(repo_id)
    target = settings.models_dir / local_name(repo_id)
    done = complete_download(target)
    if done is not None and (revision is None or revision_matches(done, revision)):
        # On disk and whole: pinned means pinned. No hub is asked (works offline); --revision upgrades.
        total = sum(int(f.get("size", 0)) for f in done.get("files", []))
        if progress:
            progress(total, total, f"already downloaded at {str(done.get('commit'))[:12]}")
        return target
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:  # pragma: no cover
        raise DownloadError(f"huggingface_hub is missing ({exc})", "reinstall rerankctl") from exc

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - every hub failure maps to one line
        raise _map_hub_error(exc, repo_id, revision) from exc

    siblings = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
    if not any(f.endswith(".safetensors") for f in siblings):
        pickles = [f for f in siblings if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise DownloadError(
                f"{repo_id} has only pickle weights ({', '.join(sorted(pickles))}), which rerankctl never loads",
                "use a revision with model.safetensors, or convert the weights to safetensors yourself",
            )
        raise DownloadError(f"{repo_id} has no safetensors weights", "check the repo id and revision")
    wanted = {f: size for f, size in siblings.items() if _allowed(f)}
    total = sum(wanted.values())
    commit = info.sha
    target.mkdir(parents=True, exist_ok=True)
    old = read_manifest(target)
    if old.get("commit") == commit and complete_download(target) is not None:
        if progress:
            progress(total, total, "already complete")
        return target
    # A manifest from another commit no longer describes the folder: drop it before touching files.
    (target / MANIFEST).unlink(missing_ok=True)

    lfs_sha = {s.rfilename: getattr(getattr(s, "lfs", None), "sha256", None) for s in (info.siblings or [])}
    blob_ids = {s.rfilename: getattr(s, "blob_id", None) for s in (info.siblings or [])}
    unverifiable = sorted(rel for rel in wanted if not lfs_sha.get(rel) and not blob_ids.get(rel))
    if unverifiable:
        # every file is checked against the hub's own checksum after it arrives: one the hub gives none for
        # cannot be, and is not taken on trust
        raise DownloadError(f"the hub gave no checksum (sha256 or git blob id) for {', '.join(unverifiable)}",
                            "check HF_ENDPOINT: the hub's model_info must list files with their metadata")
    done_before = sum((target / f).stat().st_size for f in wanted if (target / f).is_file())
    state = {"done": done_before}
    for rel in sorted(wanted, key=lambda f: wanted[f]):
        dest = target / rel
        if dest.is_file() and dest.stat().st_size == wanted[rel] and _same_content(dest, lfs_sha[rel], blob_ids[rel]):
            continue  # this very content is already here (a size alone proves nothing across revisions)
        _fetch_file(api, repo_id, commit, rel, dest, wanted[rel], lfs_sha[rel], blob_ids[rel], state, total,
                    progress, revision)
    files = []
    for rel in sorted(wanted):
        path = target / rel
        if not path.is_file():
            raise DownloadError(f"{rel} is missing after the download", "run the same command again")
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    write_json_atomic(
        target / MANIFEST,
        {
            "repo_id": repo_id,
            "requested_revision": revision or "main",
            "commit": commit,
            "files": files,
            "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    if progress:
        progress(total, total, "done")
    return target


def _same_content(path: Path, lfs_sha256: Optional[str], blob_id: Optional[str]) -> bool:
    """True only if ``path`` provably holds the hub's content: LFS files by sha256, others by git blob id."""
    if lfs_sha256:
        return sha256_file(path) == lfs_sha256
    if blob_id:
        return git_blob_id(path) == blob_id
    return False


def git_blob_id(path: Path) -> str:
    """git's object id of a file: sha1 of ``blob <size>\\0`` and the content (what the hub calls blobId)."""
    import hashlib

    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def complete_download(folder: Path) -> Optional[dict]:
    """The manifest of a whole download (written last; every file it lists present with its size), else None.

    Only this says "downloaded": a config.json alone may be left from an interrupted upgrade.
    """
    m = read_manifest(folder)
    if not m.get("commit") or not m.get("files"):
        return None
    for f in m["files"]:
        p = folder / f["path"]
        if not p.is_file() or p.stat().st_size != int(f.get("size", -1)):
            return None
    return m


def revision_matches(manifest: dict, revision: str) -> bool:
    """A commit id (or an unambiguous prefix of one) that the folder already holds."""
    commit = str(manifest.get("commit") or "")
    rev = revision.strip().lower()
    return len(rev) >= 7 and all(c in "0123456789abcdef" for c in rev) and commit.startswith(rev)


def _fetch_file(api, repo_id, commit, rel, dest, size, sha256, blob_id, state, total, progress, revision) -> None:
    """GET one file into ``<dest>.partial``, resuming with a Range request; verify (its size when the hub gives
    one; its sha256 for LFS files, its git blob id for the others); rename into place."""
    import httpx
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    part = dest.with_name(dest.name + ".partial")
    have = part.stat().st_size if part.is_file() else 0
    if size and have > size:
        part.unlink()
        have = 0
    headers = build_hf_headers(token=api.token)
    headers["Accept-Encoding"] = "identity"
    if have:
        headers["Range"] = f"bytes={have}-"
    url = hf_hub_url(repo_id, rel, revision=commit, endpoint=api.endpoint)
    base = state["done"] - (dest.stat().st_size if dest.is_file() else 0)
    try:
        # follow_redirects: httpx drops Authorization when a redirect leaves the hub's origin.
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=httpx.Timeout(30.0)) as resp:
            if resp.status_code == 416:  # the partial file is already whole
                pass
            elif resp.status_code >= 400:
                resp.read()
                raise _HubStatus(resp)
            else:
                mode = "ab" if (have and resp.status_code == 206) else "wb"
                if mode == "wb":
                    have = 0
                with open(part, mode) as fh:
                    last = 0.0
                    for chunk in resp.iter_bytes(1 << 16):
                        fh.write(chunk)
                        have += len(chunk)
                        now = time.monotonic()
                        if progress and now - last > 0.1:
                            last = now
                            progress(min(base + have, total), total, rel)
    except _HubStatus as exc:
        raise _map_hub_error(exc, repo_id, revision) from exc
    except httpx.HTTPError as exc:
        raise _map_hub_error(exc, repo_id, revision) from exc
    if size and part.stat().st_size != size:
        raise DownloadError(
            f"{rel} arrived with {part.stat().st_size} bytes, expected {size}",
            "run the same command again: it resumes",
        )
    if not _same_content(part, sha256, blob_id):
        part.unlink()
        raise DownloadError(f"{rel} failed its {'sha256' if sha256 else 'git blob id'} check (deleted)",
                            "run the same command again")
    os.replace(part, dest)
    state["done"] = base + (size or dest.stat().st_size)
    if progress:
        progress(min(state["done"], total), total, rel)


class _HubStatus(Exception):
    def __init__(self, response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
        self.code = response.headers.get("X-Error-Code", "")


def _allowed(name: str) -> bool:
    from fnmatch import fnmatch

    return "/" not in name and any(fnmatch(name, pat) for pat in ALLOW_PATTERNS)


def variant_is_current(ref: ModelRef, fmt: str, precision: str) -> bool:
    """Converted, and from the commit the model folder holds now (an upgrade makes it stale)."""
    variant = read_manifest(ref.variant_dir(fmt, precision))
    if variant.get("kind") != "variant":
        return False
    downloaded = complete_download(ref.path)
    if downloaded is None:  # a local folder of the user's: converted is enough
        return True
    return variant.get("source", {}).get("commit") == downloaded.get("commit")


def list_variants(ref: ModelRef) -> list[dict]:
    """Converted variants of a model, each with its manifest."""
    out = []
    if not ref.path.is_dir():
        return out
    for child in sorted(ref.path.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and (child / MANIFEST).is_file():
            m = read_manifest(child)
            if m.get("kind") == "variant":
                out.append({"dir": str(child), **m})
    return out


def hold_build(variant_dir: Path) -> Optional[int]:
    """Take a shared lock on a converted build's ``.in-use`` file for as long as a server runs from it, so
    that ``convert`` never prunes it. Returns the descriptor (close it to let go), None for older layouts."""
    import fcntl

    marker = Path(variant_dir) / ".in-use"
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def find_variant(settings: Settings, model: Optional[str] = None) -> Path:
    """The converted folder ``serve`` loads, or an error naming the command that makes it."""
    ref = resolve_model(settings, model)
    variant = ref.variant_dir(settings.model_format, settings.precision)
    if (variant / "manifest.json").is_file():
        return variant
    if settings.precision == AUTO:  # no choice made yet: FP32, the reference's own numbers
        fp32 = ref.variant_dir(settings.model_format, "fp32")
        if (fp32 / "manifest.json").is_file():
            return fp32
    if not ref.path.is_dir():
        raise ModelNotFound(
            f"{ref.name} is not downloaded",
            f"run: rerankctl download {ref.repo_id or ref.name} && rerankctl convert {ref.name}"
            " (or serve --prepare to do both)",
        )
    raise ModelNotFound(
        f"{ref.name} has no {settings.model_format}-{settings.precision} conversion",
        f"run: rerankctl convert {ref.repo_id or ref.path} --precision {settings.precision}"
        f" --format {settings.model_format}",
    )
