"""Start-up: without the cyclic garbage collector's overhead, and with the shortcuts that are verified.

Importing rerankctl's dependencies (typer, rich, aiohttp, pydantic) allocates a few hundred thousand objects,
and Python runs a collection every 700 allocations: those collections find nothing to free (modules,
classes and functions live as long as the process) but take a noticeable share of a command's start, and a
last full collection at exit costs as much again (benchmarks/HISTORY.md). ``gc.freeze()`` (public API)
moves every object tracked so far to a permanent generation that no later collection traverses: the
supervisor's own collections, while it serves, skip them too, and a forked daemon inherits them frozen
(copy-on-write pages stay shared).

A shortcut that relies on how a dependency is built inside (a module it imports, a private method) is
taken only on the versions it was checked on: ``verified_on`` looks the installed version up without
importing the package, and says in one log line when a shortcut is off.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path
from typing import Iterator


def installed_version(dist: str) -> str:
    """The installed version of distribution ``dist`` (its import name), from its dist-info folder beside the
    package, without importing either (importlib.metadata, the general way, is a heavy import for a process
    that starts often); "unknown" when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(dist)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        site = Path(spec.origin).resolve().parent.parent
        found = [p.name[len(dist) + 1:-len(".dist-info")] for p in site.glob(f"{dist}-*.dist-info")]
        if len(found) == 1:
            return found[0]
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def verified_on(dist: str, versions: tuple[str, ...], what: str, version: str = "") -> bool:
    """Whether the installed ``dist`` is one of ``versions`` (``"0.9.8"`` exactly, or ``"2026.4"`` for every
    2026.4.x); when not, one line on stderr (the supervisor's log) says that ``what`` is off."""
    version = version or installed_version(dist)
    if any(version == v or version.startswith(v + ".") for v in versions):
        return True
    print(f"rerankctl: {dist} {version} is not a version {what} was verified on ({', '.join(versions)}):"
          " it is off", file=sys.stderr, flush=True)
    return False


@contextlib.contextmanager
def frozen_imports() -> Iterator[None]:
    """Run the block (imports, model loading) with the collector off, then freeze what it made."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def freeze_before_exit() -> None:
    """Freeze everything before the interpreter exits: its last full collection then has nothing to do."""
    gc.freeze()
