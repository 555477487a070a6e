"""What the front reads of the supervisor (``front.health.HealthSource``), and nothing it could change: state,
probes, capacity, the current generation's address, the metric families only the supervisor knows."""

from __future__ import annotations

from typing import Any, Optional


class SupervisorView:
    def __init__(self, sup: Any) -> None:  # the Supervisor (which imports this module)
        self._sup = sup

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
        return self._sup.watch.capacity()

    def scored_totals(self) -> tuple[int, int]:
        return self._sup.watch.scored_totals()

    def upstream(self):
        """Where the gate sends: the current generation while its main process lives, else None."""
        from ..front.upstream import Upstream

        gen = self._sup.gen
        if gen is None or gen.exit_code is not None:
            return None
        return Upstream(gen.port, gen.secret, gen.number, gen.model_name, gen.max_length, gen.pid)

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
        """The served model's name, then its aliases (RERANKER_MODEL_ALIASES): what a request's model may say."""
        name = self._sup.model_name
        return [name, *(a for a in self._sup.settings.served_models if a != name)]

    def info(self) -> dict:
        """``GET /info``: text-embeddings-inference's fields (clients size their requests from them), then ours."""
        from .. import __version__
        from ..protocol.api import ROUTES
        from ..protocol.manifest import read_variant_manifest

        sup, s = self._sup, self._sup.settings
        manifest = read_variant_manifest(sup.variant_dir)
        gen = sup.gen
        window = gen.max_length if gen is not None else int(manifest.get("max_length") or 512)
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8",
                 "int8-weights": "int8"}.get(sup.precision, sup.precision)
        names = self.served_names()
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
            },
        }

    def extra_metrics(self) -> list:
        """The families only the supervisor knows, read when scraped: connections by port, batching."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from ..front.metrics import counter, gauge, labelled

        front, watch = self._sup.front, self._sup.watch
        out = [labelled(GaugeMetricFamily if kind == "gauge" else CounterMetricFamily, name.removesuffix("_total"),
                        what, "door", values)
               for name, kind, what, values in (front.connection_metrics() if front is not None else [])]
        batches, requests = watch.batches()
        in_flight = front.in_flight if front is not None else 0
        return out + self._memory() + [
            gauge("reranker_max_in_flight", "Requests admitted at once (RERANKER_MAX_IN_FLIGHT): beyond, 429.",
                  self._sup.settings.effective_max_in_flight()),
            gauge("reranker_in_flight_per_worker", "Requests in flight per live score worker (a scaling signal).",
                  round(in_flight / max(1, watch.capacity()["score"]["live"]), 3)),
            counter("reranker_batches", "Envelopes the live score workers scored (one scoring call each).", batches),
            counter("reranker_batched_requests", "Requests in those envelopes (over batches: the average batch).",
                    requests),
        ]

    def _memory(self) -> list:
        """PSS by role (the supervisor, MOSEC's main process, its controller, score workers, helpers): what the
        dashboard draws and ``rerankctl status`` lists. Read at scrape time: a read of smaps_rollup a process."""
        import os

        import psutil
        from prometheus_client.core import GaugeMetricFamily

        from ..front.metrics import labelled

        watch = self._sup.watch  # the roles from the heartbeats its last tick read, not the worker dir again
        procs = [(psutil.Process(os.getpid()), "supervisor"),
                 *watch.processes(self._sup.gen, watch.beats or None)]
        by_role: dict[str, float] = {}
        for proc, role in procs:
            try:
                by_role[role] = by_role.get(role, 0.0) + proc.memory_full_info().pss
            except (psutil.Error, AttributeError):  # gone meanwhile, or no PSS on this kernel
                continue
        return [labelled(GaugeMetricFamily, "reranker_process_memory_bytes", "Proportional set size (PSS) of the"
                         " server's processes, summed by role.", "role", sorted(by_role.items()))]
