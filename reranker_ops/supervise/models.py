"""Reloads that concern which models are served: every model's generation in turn, and the list itself.

``rerankctl reload --models LIST`` (the value of RERANKER_MODELS) adds, removes and changes models without
dropping a request: each new or changed model boots beside what serves and must answer the canary on its own
port first; only when all did does the front route to them, and only then is each removed or replaced model
drained (its requests in flight answered) and stopped. If one fails, nothing changes and the reload says why.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from .slot import ModelSlot


def slots_for(sup, model: Optional[str]) -> tuple[list[ModelSlot], Optional[str]]:
    """The models a reload asks for: the one named (by its name, an alias or as RERANKER_MODELS gives it),
    every model when none is named; a name not served swaps the model of a server of one."""
    if not model:
        return list(sup.slots), None
    for slot in sup.slots:
        if model in (*slot.names(), slot.settings.model):
            return [slot], None
    if not sup.settings.several_models:
        return [sup.slots[0]], None
    return [], (f"model {model!r} is not served here (served: {', '.join(sl.model_name for sl in sup.slots)});"
                " to add one, reload with --models")


def report_reload(sup, rid: Optional[str], state: str, reason: str = "", **extra) -> None:
    sup.models_reload = {"id": rid, "state": state, "reason": reason, "at": time.time(), **extra}
    (sup.log.info if state in ("in_progress", "ok") else sup.log.warning)(
        "reload %s%s", state, f": {reason}" if reason else "")
    sup.status.publish()


async def reload_each(sup, slots: list[ModelSlot], request: dict) -> None:
    """Every model's generation replaced, one model after the other (each as ``reload --model`` does)."""
    rid = request.get("id")
    report_reload(sup, rid, "in_progress", f"reloading {len(slots)} models one after the other")
    verdicts = []
    for slot in slots:
        slot.reloader.ask({**request, "id": f"{rid}.{slot.key}"})
        if slot.reloader.task is not None and not slot.reloader.task.done():
            await asyncio.shield(slot.reloader.task)
        st = slot.reloader.status or {}
        verdicts.append((slot.model_name, st.get("state"), st.get("reason")))
    failed = [f"{name}: {state}: {why}" for name, state, why in verdicts if state != "ok"]
    report_reload(sup, rid, "failed" if failed else "ok",
                  "; ".join(failed) if failed else "; ".join(f"{name}: {why}" for name, _s, why in verdicts))


def _same(a, b) -> bool:
    """Two settings of one model that serve it alike (a change of any of these is a new generation)."""
    return all(getattr(a, f) == getattr(b, f) for f in ("model", "precision", "workers", "model_aliases",
                                                         "model_format"))


async def models_reload(sup, request: dict) -> None:
    """Serve the models of ``request["models"]`` (RERANKER_MODELS' syntax): new and changed ones booted and
    probed first, then the switch, then the old ones drained and stopped."""
    from ..settings import SettingsError, parse_model_specs
    from .view import SupervisorView

    rid = request.get("id")
    specs, problems = parse_model_specs(str(request.get("models") or ""))
    if problems or not specs:
        report_reload(sup, rid, "refused", "; ".join(problems) or "no model given")
        return
    if any(sl.reloader.running for sl in sup.slots) or (sup.models_reload or {}).get("state") == "in_progress":
        report_reload(sup, rid, "refused", "a reload is already in progress")
        return
    try:
        settings = sup.settings.replace(model=specs[0].model, models=request["models"] if len(specs) > 1 else "")
    except SettingsError as exc:
        report_reload(sup, rid, "refused", str(exc))
        return
    report_reload(sup, rid, "in_progress", "starting the new models")
    current = {sl.key: sl for sl in sup.slots}
    slots, new = [], []
    for i, spec in enumerate(specs):
        old = current.get(spec.key)
        if old is not None and old.down is None and _same(old.settings, settings.for_model(spec, first=i == 0)):
            slots.append(old)
            continue
        slot = sup.new_slot(spec, i == 0, settings=settings)
        if slot.down is not None:
            return await _undo(sup, rid, new, f"{spec.model}: {slot.down}")
        sup.builds.hold(slot.variant_dir)
        slot.gen = await slot.spawn(slot.variant_dir, slot.model_name)
        new.append(slot)
        slots.append(slot)
        ok, why = await slot.canary.boot_and_probe(slot.gen, slot.watch.observe_async, slot.watch.all_ready,
                                                   slot.watch.init_failure, lambda: bool(sup.stop_requests))
        if not ok:
            return await _undo(sup, rid, new, f"{slot.model_name}: {why}")
        slot.canary.ever_ready = True  # it answered the canary on its own port
    gone = [sl for sl in sup.slots if sl not in slots]
    sup.slots, sup.settings = slots, settings  # the switch: the front routes by the list from here
    await sup.front.set_models(SupervisorView(sup).models())
    for slot in new:
        slot.watch.front = sup.front.path(slot.key)
    from .report import pidfile_data

    sup.rundir.write_pidfile(pidfile_data(sup))  # what `restart` starts again: the new list
    for slot in gone:
        await _retire(sup, slot)
    report_reload(sup, rid, "ok", "serving " + ", ".join(sl.model_name for sl in slots)
                  + (f" (stopped: {', '.join(sl.model_name for sl in gone)})" if gone else ""))


async def _undo(sup, rid, new: list[ModelSlot], why: str) -> None:
    for slot in new:
        if slot.gen is not None:
            await slot.stop_generation(slot.gen, grace=0.2)
        sup.builds.let_go(slot.variant_dir)
    report_reload(sup, rid, "failed", f"{why}; still serving {', '.join(sl.model_name for sl in sup.slots)}")


async def _retire(sup, slot: ModelSlot) -> None:
    """A model no longer served: its requests in flight answered (within the deadline), then stopped."""
    slot.canary.cancel()
    await slot.reloader.cancel()
    if slot.gen is not None:
        await slot.drain_and_stop(slot.gen)
    if slot.variant_dir is not None and all(sl.variant_dir != slot.variant_dir for sl in sup.slots):
        sup.builds.let_go(slot.variant_dir)
