"""What the supervisor writes for others to read: the pidfile (where it is, what it runs, what ``restart``
starts again) and ``state.json`` (its state, capacity, probes, restarts, outages, the last reload), which
``rerankctl status`` reads. Never a secret: the API key is recorded only as the fact that one is required."""

from __future__ import annotations

import os
import sys
import time

from .. import __version__
from .procs import start_ticks


def pidfile_data(sup) -> dict:
    s = sup.settings
    me = os.getpid()
    return {
        "pid": me,
        "start_ticks": start_ticks(me),
        "pgid": os.getpgid(0),
        "instance": sup.instance,
        "host": s.host,
        "port": s.port,
        "health_port": s.health_port,
        "model": sup.model_name,
        "precision": sup.precision,
        "variant_dir": str(sup.variant_dir),
        "version": __version__,
        "argv": sup.argv or sys.argv,
        "log": str(s.log_path),
        "started_at": sup.started_at,
        "under_systemd": sup.notifier.enabled,
        # what `restart` starts again (secrets excluded: they come from the environment), and whether it needs
        # a key (the fact, never the key): a restart must not come back unauthenticated
        "settings": s.as_json(exclude=("api_key",)),
        "api_key_required": bool(s.api_key),
    }


def state_data(sup) -> dict:
    from .view import SupervisorView

    view = SupervisorView(sup)
    probe = sup.canary.last
    gen = sup.gen
    health = sup.front.health if sup.front is not None else None
    live = sup.sm.live and health is not None
    return {
        "pid": os.getpid(),
        "instance": sup.instance,
        "state": sup.sm.state.value,
        "reason": sup.sm.reason,
        "healthy": health.verdict()[0] if live else False,
        "serving": health.serving()[0] if live else False,
        "model": sup.model_name,
        "precision": sup.precision,
        "variant_dir": str(sup.variant_dir),
        "host": sup.settings.host,
        "port": sup.settings.port,
        "health_port": sup.settings.health_port,
        "started_at": sup.started_at,
        "updated_at": time.time(),
        "updated_mono": time.monotonic(),
        "mosec": {
            "pid": gen.pid if gen is not None and gen.exit_code is None else None,
            "port": gen.port if gen is not None else None,
            "generation": gen.number if gen is not None else None,
        },
        "capacity": view.capacity(),
        # the last reload asked: of one model, of several one after the other, or of the list of models
        "reload": max((st for st in (sup.models_reload, *(sl.reloader.status for sl in sup.slots)) if st),
                      key=lambda st: st["at"], default=None),
        "last_probe": probe.to_dict() if probe else None,
        "restarts": sup.restarts,
        "worker_deaths": sum(sl.watch.deaths for sl in sup.slots),
        "outages": [{**o, "model": sl.model_name} if len(sup.slots) > 1 else o
                    for sl in sup.slots for o in sl.outages.to_list()],
        "models": [{**m, "mosec_pid": sl.gen.pid if sl.gen is not None and sl.gen.exit_code is None else None}
                   for sl, m in zip(sup.slots, view.model_health())],
    }
