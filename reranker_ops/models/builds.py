"""Where converted variants live: each build in its own dated folder under ``.builds``, installed by renaming a
finished folder into place and pointing the variant's name at it with one atomic symlink swap; old builds are
pruned, never one a server has marked in use."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional



BUILDS_DIR = ".builds"
KEEP_BUILDS = 2
IN_USE = ".in-use"


def install_build(tmp: Path, final: Path) -> Path:
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
    point_at(final, build)
    prune_builds(final)
    return build


def point_at(pointer: Path, build: Path) -> None:
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
