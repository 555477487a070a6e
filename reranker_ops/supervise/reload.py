"""Reload: a new generation beside the current one, probed, switched to, the old one drained and stopped.

Asked by ``rerankctl reload`` (a request file and SIGHUP) or by the supervisor itself (a run dir put back under
a running server). What to load is resolved first (the model's pointer now, or the model and precision asked);
a target that cannot be resolved or a generation that cannot answer the canary is refused, and the current one
goes on serving. The switch is one assignment: the gate reads the current generation per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Optional

from ..protocol.manifest import read_variant_manifest
from .procs import tree_pss

CHILD_TERM_GRACE = 3.0


def served_precision(variant_dir: Path, asked: str) -> str:
    """The precision a variant computes in: with ``auto``, the one auto chose (the build's manifest says)."""
    return read_variant_manifest(Path(variant_dir)).get("precision") or asked


class Builds:
    """The build folders a server uses, each held so ``convert`` never prunes it (``models.store.hold_build``)."""

    def __init__(self) -> None:
        self._held: dict[Path, Optional[int]] = {}

    def hold(self, variant_dir: Path) -> None:
        if variant_dir not in self._held:
            from ..models.store import hold_build

            self._held[variant_dir] = hold_build(variant_dir)

    def let_go(self, variant_dir: Path) -> None:
        fd = self._held.pop(variant_dir, None)
        if fd is not None:
            os.close(fd)


class Reloader:
    """One reload of a model at a time; its status (id, state, reason) is what ``rerankctl reload`` waits for.
    ``slot``: the model's ``ModelSlot`` (its settings, generation, canary, watch)."""

    def __init__(self, slot, log: logging.Logger) -> None:
        self.sup = slot
        self.log = log
        self.status: Optional[dict] = None
        self.task: Optional[asyncio.Task] = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def ask(self, request: dict, refuse: Optional[str] = None) -> None:
        """Start a reload for ``request`` (an ``id``, maybe ``model``/``precision``/``model_format``), unless one
        is under way or ``refuse`` says why not now."""
        if self.running:
            self.log.warning("reload asked while one is in progress: ignored")
            self.set(request.get("id"), "refused", "a reload is already in progress")
        elif refuse:
            self.set(request.get("id"), "refused", refuse)
        else:
            self.task = asyncio.ensure_future(self.run(request))

    def set(self, rid: Optional[str], state: str, reason: str = "", **extra) -> None:
        self.status = {"id": rid, "state": state, "reason": reason, "at": time.time(), **extra}
        (self.log.info if state in ("in_progress", "ok") else self.log.warning)(
            "reload %s%s", state, f": {reason}" if reason else "")
        self.sup.status.publish()

    async def cancel(self) -> None:
        if self.running:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    def _target(self, request: dict) -> tuple[Path, str, str]:
        from ..models.store import find_variant, resolve_model

        update = {k: request[k] for k in ("model", "precision", "model_format") if request.get(k)}
        settings = self.sup.settings.replace(**update)
        variant = find_variant(settings)
        return variant.resolve(), resolve_model(settings).name, served_precision(variant, settings.precision)

    async def run(self, request: dict) -> None:
        sup = self.sup
        rid = request.get("id")
        self.set(rid, "in_progress", "starting a new generation")
        try:
            variant, name, precision = self._target(request)
        except Exception as exc:  # noqa: BLE001 - a bad target is the reload's failure, not ours
            self.set(rid, "failed", f"{getattr(exc, 'message', None) or exc}; still serving "
                                    f"{sup.model_name} from {sup.variant_dir}")
            return
        new = await sup.spawn(variant, name)
        sup.builds.hold(variant)
        try:
            ok, why = await sup.canary.boot_and_probe(new, sup.watch.observe_async, sup.watch.all_ready,
                                                      sup.watch.init_failure, lambda: bool(sup.stop_requests))
            if not ok:
                await sup.stop_generation(new, grace=0.2)
                if variant != sup.variant_dir:
                    sup.builds.let_go(variant)
                self.set(rid, "failed", f"the new generation failed: {why}; still serving "
                                        f"{sup.model_name} from {sup.variant_dir}")
                return
            overlap = tree_pss()
            old, old_variant = sup.gen, sup.variant_dir
            # the switch: one assignment; the gate reads the upstream per request
            sup.gen, sup.variant_dir, sup.model_name, sup.precision = new, variant, name, precision
            sup.down = sup.restarting = None  # a model that was down serves again
            sup.watch.reset()
            self.log.info("reload: serving generation %d (%s, %s) now; draining generation %d", new.number, name,
                          variant, old.number if old else -1)
            if old is not None:
                await sup.drain_and_stop(old)
            if old_variant != variant:
                sup.builds.let_go(old_variant)
            self.set(rid, "ok", f"serving {name} from {variant}", generation=new.number, overlap_pss_bytes=overlap)
        except asyncio.CancelledError:
            await sup.stop_generation(new, grace=0.2)
            raise
