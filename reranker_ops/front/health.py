"""/health, /ready, /live and /metrics, served by the supervisor on the health port (and the API port).

Health never lies: it is green only while the last real canary rerank request succeeded recently and
every worker the server should have is there.
- ``/health``: 200 ``healthy`` only then; 503 with ``degraded`` (serving, but a probe failed or capacity
  is reduced), ``starting``, ``stopping``... and the reason.
- ``/ready``: 200 while the server answers correctly now (a balancer may send traffic), even with
  reduced capacity; 503 otherwise.
- ``/live``: 200 while the supervisor's own loop turns (restarting the pod would help only if not).

It reads what it needs through ``HealthSource``, not the supervisor itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional, Protocol

import aiohttp
from aiohttp import web

from prometheus_client.core import GaugeMetricFamily

from .. import __version__
from ..settings import Settings
from .metrics import STATES, Metrics, counter, gauge, labelled

class Probe(Protocol):
    """A canary request's result, as health reads it (the supervisor's canary makes them)."""

    ok: bool
    error: Optional[str]
    mono: float  # when it ended, monotonic

    def to_dict(self) -> dict: ...


class HealthSource(Protocol):
    """What the health server reads from whoever supervises the service."""

    model_name: str
    precision: str
    metrics: Metrics
    last_probe: Optional[Probe]
    restarts: dict
    started_mono: float
    loop_tick: float  # monotonic

    @property
    def state_name(self) -> str: ...
    @property
    def state_reason(self) -> str: ...
    @property
    def http(self) -> Optional[aiohttp.ClientSession]: ...
    def mosec_metrics_url(self) -> Optional[str]: ...
    def capacity(self) -> dict[str, dict[str, int]]: ...
    def scored_totals(self) -> dict[str, int]: ...  # pairs, tokens, batches, requests: summed now
    def extra_metrics(self) -> list: ...  # metric families of its own, read when scraped
    def upstream(self) -> Optional[Any]: ...  # where the gate sends now (front.upstream.Upstream), or None
    def index(self) -> dict: ...
    def info(self) -> dict: ...  # GET /info
    def served_names(self) -> list[str]: ...  # each model's name, then its aliases
    def probes(self) -> list[Optional[Probe]]: ...  # each model's last canary (the models that are not down)
    def model_health(self) -> list[dict]: ...  # each model: state, capacity, precision


class Health:
    def __init__(self, settings: Settings, source: HealthSource) -> None:
        self.settings = settings
        self.src = source
        source.metrics.live.read = self.live_metrics

    def max_probe_age(self) -> float:
        s = self.settings
        return 2 * s.probe_interval_s + s.probe_timeout_s + 1.0

    def serving(self) -> tuple[bool, str]:
        """Answers correctly now: the last canary succeeded, recently (of a model's, with several: the
        server serves while one of them does; ``/health`` says which do not)."""
        state = self.src.state_name
        if state in ("stopping", "stopped", "failed"):
            return False, state
        why = "starting: no probe has succeeded yet"
        for i, probe in enumerate(self.src.probes()):
            if probe is None:
                continue
            age = time.monotonic() - probe.mono
            if probe.ok and age <= self.max_probe_age():
                return True, "ok"
            if i == 0 or why.startswith("starting"):
                why = f"last probe failed: {probe.error}" if not probe.ok else f"last successful probe is {age:.0f}s old"
        return False, why

    def verdict(self) -> tuple[bool, str]:
        """Healthy: serving, and nothing missing (state running)."""
        ok, reason = self.serving()
        if not ok:
            return ok, reason
        if self.src.state_name != "running":
            return False, self.src.state_reason or self.src.state_name
        return True, "ok"

    def body(self) -> dict:
        src = self.src
        ok, reason = self.verdict()
        probe = src.last_probe
        capacity = src.capacity()
        return {
            "status": "healthy" if ok else ("degraded" if src.state_name == "degraded" else "unhealthy"),
            "reason": reason,
            "state": src.state_name,
            "model": src.model_name,
            "precision": src.precision,
            "version": __version__,
            "uptime_s": round(time.monotonic() - src.started_mono, 1),
            "last_probe": probe.to_dict() if probe else None,
            "restarts": dict(src.restarts),
            "workers": {stage: c["live"] for stage, c in capacity.items()},
            "capacity": capacity,
            "models": [{k: v for k, v in m.items() if k != "variant_dir"} for m in src.model_health()],
        }

    async def handle_health(self, request: web.Request) -> web.Response:
        body = self.body()
        return web.json_response(body, status=200 if body["status"] == "healthy" else 503)

    async def handle_health_brief(self, request: web.Request) -> web.Response:
        """/health as the API port answers it: the verdict and the state, not the reason (which can hold model
        paths and MOSEC's error lines) or the rest; the detail is on the health port and in ``status``."""
        body = self.body()
        brief = {k: body[k] for k in ("status", "state", "model")}
        return web.json_response(brief, status=200 if body["status"] == "healthy" else 503)

    async def handle_ready(self, request: web.Request) -> web.Response:
        """Ready while a model serves; with several, which ones do (a balancer may route by model)."""
        ok, reason = self.serving()
        body: dict = {"ready": ok, "reason": reason}
        models = self.src.model_health()
        if len(models) > 1:
            body["models"] = {m["model"]: m["serving"] and ok for m in models}
        return web.json_response(body, status=200 if ok else 503)

    async def handle_live(self, request: web.Request) -> web.Response:
        # Live: the supervisor's loop answers (this handler runs) and its watchdog loop is turning.
        lag = time.monotonic() - self.src.loop_tick
        limit = self.settings.probe_interval_s + self.settings.probe_timeout_s + 10.0
        ok = lag <= limit
        return web.json_response({"live": ok, "watchdog_lag_s": round(lag, 2)}, status=200 if ok else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        src = self.src
        extra = ""
        url = src.mosec_metrics_url()
        session = src.http
        if url and session is not None:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                    if r.status == 200:
                        extra = await r.text()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                extra = ""
        return web.Response(body=src.metrics.render(extra), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def live_metrics(self) -> list:
        """What is read when scraped (``Metrics.live``): workers, state, health, scoring totals, and what the
        supervisor adds (connections by port, batching)."""
        src = self.src
        capacity = src.capacity()
        totals = src.scored_totals()
        state = src.state_name
        out = [
            labelled(GaugeMetricFamily, "reranker_workers", "Live, ready MOSEC worker processes, by stage.", "stage",
                     [(stage, c["live"]) for stage, c in sorted(capacity.items())]),
            labelled(GaugeMetricFamily, "reranker_workers_expected", "MOSEC worker processes the server should have,"
                     " by stage.", "stage", [(stage, c["expected"]) for stage, c in sorted(capacity.items())]),
            labelled(GaugeMetricFamily, "reranker_state", "The supervisor's state (1 for the current one).", "state",
                     [(name, 1.0 if name == state else 0.0) for name in STATES]),
            gauge("reranker_up", "1 while the last canary request succeeded recently.", 1.0 if self.verdict()[0] else 0.0),
            counter("reranker_pairs_scored", "Query/passage pairs scored by the model.", totals["pairs"]),
            counter("reranker_tokens_scored", "Tokens run through the model.", totals["tokens"]),
            counter("reranker_batches", "Envelopes the live score workers scored (one scoring call each).",
                    totals["batches"]),
            counter("reranker_batched_requests", "Requests in those envelopes (over batches: the average batch).",
                    totals["requests"]),
        ]
        return out + list(src.extra_metrics())
    def routes(self, brief: bool = False) -> list[tuple[str, str, object]]:
        """The routes; ``brief``: as the API port offers them (``handle_health_brief``)."""
        return [("GET", "/health", self.handle_health_brief if brief else self.handle_health),
                ("GET", "/ready", self.handle_ready), ("GET", "/live", self.handle_live),
                ("GET", "/metrics", self.handle_metrics)]

    def app(self) -> web.Application:
        app = web.Application()
        for method, path, handler in self.routes():
            app.router.add_route(method, path, handler)  # type: ignore[arg-type]
        return app
