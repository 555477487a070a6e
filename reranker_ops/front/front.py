"""The supervisor's HTTP side, as one object: the two ports (API and health), what answers on them, and the
request path to MOSEC. The supervisor talks to nothing else of this package.

    :8080  listener (FrontDoor: connection caps, deadlines) -> fast lane (a scoring POST's head and body; the
           rest to aiohttp) -> gate (key, admission, body, errors)
           -> router (which model) -> dispatch (scheduler, envelopes, MOSEC's port) -> that model's MOSEC
    :8081  listener -> health (/health /ready /live /metrics)

Imported by the supervisor only once MOSEC is spawned: aiohttp and all of this load while the model compiles.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Callable, Optional

import aiohttp
from aiohttp import web

from ..errors import PortInUse, ServerStartError
from ..settings import Settings
from .fastlane import FastLane
from .gate import Gate
from .health import Health, HealthSource
from .listener import FrontDoor, tracked
from .metrics import Metrics
from .router import Router
from .tracing import Tracing

# The health port: probes and scrapers, a few connections each
HEALTH_CONNECTIONS = 256
HEALTH_PER_PEER = 32
HEALTH_IDLE_S = 300.0  # Prometheus scrapes each minute by default: its connection is kept between scrapes
LOOPBACK_RESERVE = 32  # connections of each port that only loopback peers (the canary, a local balancer) get


FD_RESERVE = 512  # descriptors kept for the health port, MOSEC's connections, logs, the canary


def connection_budget(wanted: int) -> int:
    """How many client connections the API port may hold: raise the soft descriptor limit to the hard one,
    then keep ``FD_RESERVE`` free, so a flood of clients can never take the descriptors the canary needs."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(8, min(wanted, soft - FD_RESERVE))


class Front:
    def __init__(self, settings: Settings, metrics: Metrics, log: logging.Logger, probe_token: str,
                 source: HealthSource) -> None:
        """``source``: what the front reads of whoever supervises it (health, the current upstream, the index and
        ``/info``, the served names); it never changes it."""
        self.settings = settings
        self.log = log
        self.dispatch = Router(metrics, log, source.models())  # each model's own request path
        self.tracing = Tracing(log)
        self.gate = Gate(settings, metrics, log, self.dispatch, probe_token, source, self.tracing)
        self.health = Health(settings, source)
        self.session: Optional[aiohttp.ClientSession] = None  # the supervisor's own calls: canary, MOSEC's metrics
        self.doors: list[FrontDoor] = []
        self._runners: list[web.AppRunner] = []

    # --- what the supervisor reads and asks ------------------------------------------------------------
    @property
    def taken(self) -> int:
        """User requests taken and not answered yet (their bodies still arriving included)."""
        return self.gate.taken

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

    @property
    def idle(self):
        return self.gate.idle

    def drain(self) -> None:
        """New requests get 503 from now on; those taken are answered."""
        self.gate.draining = True

    async def drained(self, until: float, give_up: Callable[[], bool]) -> int:
        """New requests get 503 from now on; waits until those taken are answered, the monotonic ``until``
        or ``give_up()``; how many are left."""
        self.drain()
        while self.taken and not give_up() and time.monotonic() < until:
            try:
                await asyncio.wait_for(self.idle.wait(), timeout=0.2)
            except asyncio.TimeoutError:
                pass
        return self.taken

    def upstream_in_flight(self, generation: int) -> int:
        return self.dispatch.upstream_in_flight(generation)

    def path(self, key: str):
        """One model's request path (its ``Dispatch``: what its workers' watch reports lost envelopes to)."""
        return self.dispatch.path(key)

    async def set_models(self, models: list) -> None:
        await self.dispatch.set_models(models)

    def worker_lost(self, held: set[int]) -> tuple[int, int]:
        return self.dispatch.default.worker_lost(held)

    def forgive(self) -> int:
        return self.dispatch.default.forgive()

    # --- life ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """The client side, then both ports (``PortInUse`` / ``ServerStartError`` when one cannot be bound)."""
        max_connections = connection_budget(self.settings.max_connections)
        if max_connections < self.settings.max_connections:
            self.log.warning("RERANKER_MAX_CONNECTIONS=%d does not fit the descriptor limit: using %d",
                             self.settings.max_connections, max_connections)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, force_close=False),
            auto_decompress=False,
        )
        await self.dispatch.start()
        self.tracing.start()
        s = self.settings
        health_app = self.health.app()
        health_app.middlewares.append(tracked(lambda: self.doors[1] if len(self.doors) > 1 else None))
        ports = (
            # (app, port, what, connections, per address, the idle deadline)
            (self.gate.app(self.gate.ops_routes(self.health.routes(brief=True))), s.port, "API", max_connections,
             s.max_connections_per_peer, s.keepalive_timeout_s, FastLane(self.gate, self.log)),
            (health_app, s.health_port, "health", HEALTH_CONNECTIONS, HEALTH_PER_PEER, HEALTH_IDLE_S, None),
        )
        for app, port, what, conns, per_peer, idle_s, fast in ports:
            # auto_decompress off: a compressed body is never inflated, not even by aiohttp's parser
            runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False,
                                   keepalive_timeout=idle_s + 5)
            await runner.setup()
            door = FrontDoor(runner.server, max_connections=conns, header_timeout_s=s.header_timeout_s,
                             idle_timeout_s=idle_s, send_timeout_s=s.send_timeout_s, per_peer=per_peer,
                             reserve=LOOPBACK_RESERVE, name="api" if what == "API" else "health", fast=fast)
            try:
                await door.listen(s.host, port)
            except OSError as exc:
                await runner.cleanup()
                if exc.errno == errno.EADDRINUSE:
                    from ..addresses import port_owner

                    raise PortInUse(
                        f"{what} port {port} on {s.host} is already in use by {port_owner(port)}",
                        f"stop that program or choose another port (--{'port' if what == 'API' else 'health-port'})",
                    ) from None
                raise ServerStartError(f"cannot listen on {s.host}:{port}: {exc.strerror}", "check --host") from None
            self.doors.append(door)
            self._runners.append(runner)
        self.gate.door = self.doors[0]

    async def close(self) -> None:
        for door in self.doors:
            await door.close()
        for runner in self._runners:
            try:
                await runner.cleanup()
            except Exception:  # noqa: BLE001 - closing must go on
                pass
        await self.dispatch.close()
        self.tracing.close()
        if self.session is not None:
            await self.session.close()

    def connection_metrics(self) -> list[tuple[str, str, str, list[tuple[str, float]]]]:
        """(name, kind, help, [(door, value)]) of the connection metrics, for the exposition."""
        out = []
        for name, kind, what, attr in (
            ("open", "gauge", "Open client connections, by port (door).", "open_connections"),
            ("rejected_total", "counter", "Connections refused: the port full (nothing idle to close) or an"
             " address over its share.", "rejected_total"),
            ("timed_out_total", "counter", "Connections closed for not sending a request (or its body) in time.",
             "timed_out_total"),
            ("evicted_total", "counter", "Idle connections closed to make room for a new one on a full port.",
             "evicted_total"),
            ("send_timed_out_total", "counter", "Connections cut because the client read nothing of its answer"
             " for RERANKER_SEND_TIMEOUT_S.", "send_timed_out_total"),
        ):
            out.append((f"reranker_connections_{name}", kind, what,
                        [(door.name, float(getattr(door, attr))) for door in self.doors]))
        return out
