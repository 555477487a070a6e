"""What the front reads of the supervisor (``front.health.HealthSource``), and nothing it could change: state,
probes, capacity, the current generation's address, the metric families only the supervisor knows."""

from __future__ import annotations

from typing import Any, Optional

from .workerwatch import SCORE_COUNTERS


class SlotView:
    """What the front reads of one served model (``front.router.ModelSource``): where to send its requests,
    the names a request may give it."""

    def __init__(self, slot: Any) -> None:  # a supervise.slot.ModelSlot
        self._slot = slot
        self.key, self.ident = slot.key, id(slot)
        self.settings = slot.settings

    @property
    def down(self):
        """Why the model gave up, or None: its requests are answered 503 at once, not held to their deadline."""
        return self._slot.down

    def names(self) -> list[str]:
        return self._slot.names()

    def upstream(self):
        """Where the gate sends this model's requests: its current generation while its main process lives."""
        from ..front.upstream import Upstream

        gen = self._slot.gen
        if gen is None or gen.exit_code is not None or self._slot.down is not None:
            return None
        return Upstream(gen.port, gen.secret, gen.number, gen.model_name, gen.max_length, gen.pid)


class SupervisorView:
    def __init__(self, sup: Any) -> None:  # the Supervisor (which imports this module)
        self._sup = sup

    def models(self) -> list[SlotView]:
        return [SlotView(slot) for slot in self._sup.slots]

    model_name = property(lambda self: self._sup.model_name)
    precision = property(lambda self: self._sup.precision)  # changes with a reload
    metrics = property(lambda self: self._sup.metrics)
    started_mono = property(lambda self: self._sup.started_mono)
    loop_tick = property(lambda self: self._sup.loop_tick)
    state_name = property(lambda self: self._sup.sm.state.value)
    state_reason = property(lambda self: self._sup.sm.reason)
    last_probe = property(lambda self: self._sup.canary.last)
    restarts = property(lambda self: self._sup.restarts)
    http = property(lambda self: self._sup.front.session if self._sup.front is not None else None)

    def capacity(self) -> dict:
        """Every model's workers, summed by stage (each model's: ``model_health``)."""
        out: dict[str, dict[str, int]] = {}
        for slot in self._sup.slots:
            for stage, c in slot.watch.capacity().items():
                total = out.setdefault(stage, {"live": 0, "expected": 0})
                total["live"] += 0 if slot.down else c["live"]
                total["expected"] += c["expected"]
        return out

    def scored_totals(self) -> dict[str, int]:
        totals = [slot.watch.scored_totals() for slot in self._sup.slots]
        return {f: sum(t[f] for t in totals) for f in SCORE_COUNTERS}

    def probes(self) -> list:
        return [slot.canary.last for slot in self._sup.slots if slot.down is None]

    def model_health(self) -> list[dict]:
        """Each model as /health, /info, state.json and the metrics show it."""
        out = []
        for i, slot in enumerate(self._sup.slots):
            state, reason = slot.verdict()
            probe = slot.canary.last
            out.append({"model": slot.model_name, "default": i == 0, "aliases": slot.names()[1:],
                        "state": "down" if slot.down is not None else state.value, "reason": reason,
                        "serving": bool(slot.down is None and probe is not None and probe.ok),
                        "precision": slot.precision, "variant_dir": str(slot.variant_dir or ""),
                        "capacity": slot.watch.capacity(),
                        "generation": slot.gen.number if slot.gen is not None else None,
                        "last_probe": probe.to_dict() if probe else None,
                        "restarts": {"worker": slot.watch.kills, "server": slot.server_restarts}})
        return out

    def upstream(self):
        """Where the gate sends the default model's requests: its current generation, else None."""
        return SlotView(self._sup.slots[0]).upstream()

    def mosec_metrics_url(self) -> Optional[str]:
        gen = self._sup.gen
        return None if gen is None or gen.exit_code is not None else f"http://127.0.0.1:{gen.port}/metrics"

    def index(self) -> dict:
        from ..addresses import base_url
        from ..protocol.api import ROUTES

        s = self._sup.settings
        return {"name": "rerankctl", "model": self._sup.model_name, "routes": list(ROUTES),
                "models": self.served_names(), "health": f"{base_url(s.host, s.health_port)}/health"}

    def served_names(self) -> list[str]:
        """What a request's model may say: each served model's name, then its aliases (the default model's
        first, its aliases from RERANKER_MODEL_ALIASES)."""
        return [name for slot in self._sup.slots for name in slot.names()]

    def info(self) -> dict:
        """``GET /info``: text-embeddings-inference's fields (clients size their requests from them), then ours."""
        from .. import __version__
        from ..protocol.api import ROUTES
        from ..protocol.manifest import read_variant_manifest

        sup, s = self._sup, self._sup.settings
        manifest = read_variant_manifest(sup.variant_dir) if sup.variant_dir is not None else {}
        gen = sup.gen
        window = gen.max_length if gen is not None else int(manifest.get("max_length") or 512)
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8",
                 "int8-weights": "int8"}.get(sup.precision, sup.precision)
        names = sup.slots[0].names()
        return {
            "model_id": names[0],
            "model_sha": (manifest.get("source") or {}).get("commit"),
            "model_dtype": dtype,
            "served_model_name": names[0],
            "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
            "max_concurrent_requests": s.effective_max_in_flight(),
            "max_input_length": window,
            "max_batch_tokens": s.token_budget,
            "max_batch_requests": s.max_batch_requests,
            "max_client_batch_size": s.max_documents,
            "auto_truncate": True,  # a text over the window is cut (or windowed) unless a request says truncate: false
            "tokenization_workers": s.workers,
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "rerankctl": {
                "aliases": names[1:],
                "precision": sup.precision,
                "long_documents": "truncate" if s.windows <= 1 else "windows",  # windows: the best of up to that many
                "windows": s.windows,
                "max_windows": s.max_windows,
                "window_stride": s.window_stride,
                "max_document_chars": s.max_document_chars,
                "max_query_chars": s.max_query_chars,
                "routes": list(ROUTES),
                "models": [{k: m[k] for k in ("model", "default", "aliases", "state", "precision")}
                           for m in self.model_health()],
            },
        }

    def extra_metrics(self) -> list:
        """The families only the supervisor knows, read when scraped: connections by port, memory, models."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from ..front.metrics import gauge, labelled

        front = self._sup.front
        out = [labelled(GaugeMetricFamily if kind == "gauge" else CounterMetricFamily, name.removesuffix("_total"),
                        what, "door", values)
               for name, kind, what, values in (front.connection_metrics() if front is not None else [])]
        in_flight = front.in_flight if front is not None else 0
        return out + self._memory() + self._models() + [
            gauge("reranker_max_in_flight", "Requests admitted at once (RERANKER_MAX_IN_FLIGHT): beyond, 429.",
                  self._sup.settings.effective_max_in_flight()),
            gauge("reranker_in_flight_per_worker", "Requests in flight per live score worker (a scaling signal).",
                  round(in_flight / max(1, self.capacity()["score"]["live"]), 3)),
        ]

    def _models(self) -> list:
        """Each served model, labelled ``model``: its state, whether it answers, its workers, its precision."""
        from prometheus_client.core import GaugeMetricFamily

        from ..front.metrics import STATES

        fams = {name: GaugeMetricFamily(name, what, labels=labels) for name, what, labels in (
            ("reranker_model_state", "Each model's state (1 for the current one; failed: the model is down).",
             ["model", "state"]),
            ("reranker_model_up", "1 while the model's last canary request succeeded.", ["model"]),
            ("reranker_model_workers", "The model's live, ready MOSEC workers, by stage.", ["model", "stage"]),
            ("reranker_model_workers_expected", "The MOSEC workers the model should have.", ["model", "stage"]),
            ("reranker_model_info", "1 per served model: its precision and whether it is the default.",
             ["model", "precision", "default"]))}
        for m in self.model_health():
            name = m["model"]
            state = "failed" if m["state"] == "down" else m["state"]
            for st in STATES:
                fams["reranker_model_state"].add_metric([name, st], 1.0 if st == state else 0.0)
            fams["reranker_model_up"].add_metric([name], 1.0 if m["serving"] else 0.0)
            for stage, c in m["capacity"].items():
                fams["reranker_model_workers"].add_metric([name, stage], 0.0 if m["state"] == "down" else c["live"])
                fams["reranker_model_workers_expected"].add_metric([name, stage], c["expected"])
            fams["reranker_model_info"].add_metric([name, m["precision"], str(m["default"]).lower()], 1.0)
        return list(fams.values())

    def _memory(self) -> list:
        """PSS by role (the supervisor, MOSEC's main process, its controller, score workers, helpers): what the
        dashboard draws and ``rerankctl status`` lists. Read at scrape time: a read of smaps_rollup a process."""
        import os

        import psutil
        from prometheus_client.core import GaugeMetricFamily

        from ..front.metrics import labelled

        by_role: dict[str, float] = {}
        by_model: dict[str, float] = {}

        def add(proc, role: str, model: Optional[str] = None) -> None:
            try:
                pss = proc.memory_full_info().pss
            except (psutil.Error, AttributeError):  # gone meanwhile, or no PSS on this kernel
                return
            by_role[role] = by_role.get(role, 0.0) + pss
            if model is not None:
                by_model[model] = by_model.get(model, 0.0) + pss

        add(psutil.Process(os.getpid()), "supervisor")
        for slot in self._sup.slots:  # the roles from the heartbeats its last tick read, not the worker dir again
            for proc, role in slot.watch.processes(slot.gen, slot.watch.beats or None):
                add(proc, role, slot.model_name)
        return [labelled(GaugeMetricFamily, "reranker_process_memory_bytes", "Proportional set size (PSS) of the"
                         " server's processes, summed by role.", "role", sorted(by_role.items())),
                labelled(GaugeMetricFamily, "reranker_model_memory_bytes", "Proportional set size (PSS) of each"
                         " model's MOSEC processes (the supervisor's own is the role supervisor's).", "model",
                         sorted(by_model.items()))]
