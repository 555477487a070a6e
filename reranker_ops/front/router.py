"""Which model's request path a request takes, in a server of several models (``RERANKER_MODELS``).

Each model has its own ``Dispatch``: its own fair scheduler over its own workers, its own generation to send
to, its own quarantine. So one model's long requests queue behind that model's workers only, never in front
of another model's short ones, and a hung or reloading model holds nobody else's requests.

A request names its model in ``model`` (the model's name or one of its aliases); one that names none goes to
the default model (the first), and so does ``/inference`` (a list, with no room for a name). An unknown name is
a 404 that lists the served names. With one model nothing is read here: the request goes straight on, as it
always did (the score worker checks the name).
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional, Protocol

from aiohttp import web

from ..protocol.envelope import PART_HEAD_LEN
from .dispatch import Dispatch
from .gate import limits_of
from .metrics import Metrics
from .responses import error_response


class ModelSource(Protocol):
    """What the front reads of one served model (``supervise.view.SlotView``)."""

    key: str
    ident: int  # the same model's room while it lives (a model replaced by a reload of the list: another)
    settings: object
    down: Optional[str]  # why the model gave up, or None

    def upstream(self): ...
    def names(self) -> list[str]: ...


class Router:
    def __init__(self, metrics: Metrics, log: logging.Logger, models: list[ModelSource]) -> None:
        self.metrics, self.log = metrics, log
        self.paths: dict[str, Dispatch] = {}
        self.retired: list[Dispatch] = []  # paths of models no longer served, while their requests finish
        self._sources: dict[str, ModelSource] = {}
        self._draining = False
        self._started = False
        self._place(models)

    def _place(self, models: list[ModelSource]) -> list[Dispatch]:
        """Each model's path (a new one for a model not served before); those no longer served, returned."""
        old, known = self.paths, {key: src.ident for key, src in self._sources.items()}
        self.paths = {m.key: old[m.key] if known.get(m.key) == m.ident else
                      Dispatch(m.settings, self.metrics, self.log, m.upstream, limits_of(m.settings)) for m in models}
        self._sources = {m.key: m for m in models}
        # each name (a model's or an alias) to its model, built when the models change, not per request
        self._by_name = {name: m.key for m in reversed(models) for name in m.names()}
        for d in self.paths.values():
            d.draining = self._draining
        self.default = next(iter(self.paths.values()))
        kept = {id(d) for d in self.paths.values()}
        return [d for d in old.values() if id(d) not in kept]

    async def set_models(self, models: list[ModelSource]) -> None:
        """Serve these models from now on (a reload of the settings added or removed some)."""
        gone = self._place(models)
        if self._started:
            for d in self.paths.values():
                if d.client is None:
                    await d.start()
        for d in gone:  # requests already on their way keep their client until it is closed with the front
            d.draining = True
        self.retired += gone

    def path(self, key: str) -> Dispatch:
        return self.paths[key]

    def names(self) -> list[str]:
        return [name for m in self._sources.values() for name in m.names()]

    @property
    def count(self) -> int:
        return len(self.paths)

    @property
    def limits(self):
        return self.default.limits

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        for d in self.paths.values():
            d.draining = value

    @property
    def client(self):
        return self.default.client

    def upstream_in_flight(self, generation: int) -> int:
        return sum(d.upstream_in_flight.get(generation, 0) for d in (*self.paths.values(), *self.retired))

    async def start(self) -> None:
        self._started = True
        for d in self.paths.values():
            await d.start()

    async def close(self) -> None:
        for d in (*self.paths.values(), *self.retired):
            await d.close()

    def route(self, route: str, body: bytearray) -> Dispatch | web.Response:
        """The path of the model the request names, the default's when it names none, or a 404."""
        if route == "/inference" or b'"model"' not in body:
            return self.default
        try:
            doc = json.loads(body[PART_HEAD_LEN:])
        except (ValueError, RecursionError):  # the score worker answers a malformed request with its reason
            return self.default
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, str):
            return self.default  # no name, or not a string: the worker's checks answer the latter (422)
        key = self._by_name.get(model)
        if key is None:
            return error_response(404, f"model {model[:200]!r} is not served here; served: {', '.join(self.names())}")
        source = self._sources[key]
        if source.down is not None:
            return error_response(503, f"model {model[:200]!r} is down ({source.down[:300]}); the other models"
                                       " serve; rerankctl reload --model brings it back", {"Retry-After": "30"})
        return self.paths[key]

    async def answer(self, request: web.Request, route: str, body: bytearray, deadline_at: float,
                     hold: Callable[[web.Request, int], None]) -> web.StreamResponse:
        path = self.default if len(self.paths) == 1 else self.route(route, body)
        if path is self.default and len(self.paths) > 1:
            source = next(iter(self._sources.values()))
            if source.down is not None:
                return error_response(503, f"the default model {source.names()[0]!r} is down ({source.down[:300]});"
                                           " name another served model in \"model\"", {"Retry-After": "30"})
        if isinstance(path, web.Response):
            return path
        return await path.answer(request, route, body, deadline_at, hold)

    def source_of(self, key: str) -> Optional[ModelSource]:
        return self._sources.get(key)
