"""/health, /ready, /live and /metrics, served by the supervisor on the health port (and the API port).

Health never lies: it is green only while the last real canary rerank request succeeded recently.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .. import __version__

if TYPE_CHECKING:  # pragma: no cover
    from ..process.supervisor import Supervisor


class Health:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup

    def max_probe_age(self) -> float:
        s = self.sup.settings
        return 2 * s.probe_interval_s + s.probe_timeout_s + 1.0

    def verdict(self) -> tuple[bool, str]:
        sup = self.sup
        if sup.state == "stopping":
            return False, "stopping"
        probe = sup.last_probe
        if probe is None:
            return False, "starting: no probe has succeeded yet"
        age = time.time() - probe.at
        if not probe.ok:
            return False, f"last probe failed: {probe.error}"
        if age > self.max_probe_age():
            return False, f"last successful probe is {age:.0f}s old"
        if sup.state != "running":
            return False, sup.reason or sup.state
        return True, "ok"

    def body(self) -> dict:
        sup = self.sup
        ok, reason = self.verdict()
        probe = sup.last_probe
        return {
            "status": "healthy" if ok else "unhealthy",
            "reason": reason,
            "state": sup.state,
            "model": sup.model_name,
            "precision": sup.settings.precision,
            "version": __version__,
            "uptime_s": round(time.time() - sup.started_at, 1),
            "last_probe": probe.to_dict() if probe else None,
            "restarts": dict(sup.restarts),
            "workers": sup.worker_counts(),
        }

    async def handle_health(self, request: web.Request) -> web.Response:
        body = self.body()
        return web.json_response(body, status=200 if body["status"] == "healthy" else 503)

    async def handle_ready(self, request: web.Request) -> web.Response:
        ok, reason = self.verdict()
        return web.json_response({"ready": ok, "reason": reason}, status=200 if ok else 503)

    async def handle_live(self, request: web.Request) -> web.Response:
        # Live: the supervisor's loop answers (this handler runs) and its watchdog loop is turning.
        lag = time.time() - self.sup.loop_tick
        limit = self.sup.settings.probe_interval_s + self.sup.settings.probe_timeout_s + 10.0
        ok = lag <= limit
        return web.json_response({"live": ok, "watchdog_lag_s": round(lag, 2)}, status=200 if ok else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        sup = self.sup
        extra = ""
        url = sup.upstream_base
        if url and sup.gate.session is not None:
            try:
                async with sup.gate.session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                    if r.status == 200:
                        extra = await r.text()
            except (aiohttp.ClientError, TimeoutError):
                extra = ""
        pairs, tokens = sup.scored_totals()
        text = sup.metrics.render(
            healthy=self.verdict()[0], pairs=pairs, tokens=tokens, workers=sup.worker_counts(), extra=extra
        )
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/ready", self.handle_ready)
        app.router.add_get("/live", self.handle_live)
        app.router.add_get("/metrics", self.handle_metrics)
        return app
