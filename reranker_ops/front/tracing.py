"""OpenTelemetry traces of API requests: optional (``pip install 'rerankctl[otel]'``), off unless configured.

On when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and
neither ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none`` says otherwise; the OTLP/HTTP exporter and
the SDK read every other standard ``OTEL_*`` variable themselves (headers, sampler, service name, resource).
One server span per request continues the client's trace (W3C ``traceparent``), with a child for each stage:
``admission`` (the body read and a place in flight taken), ``queue`` (waiting in the gate's scheduler for a
worker), ``tokenize`` and ``inference`` (measured by the score worker and reported in its answer). Spans are
exported in batches off the request path.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from aiohttp import web


def configured(env: Optional[dict] = None) -> bool:
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._tracer: Any = None
        self._provider: Any = None
        self._propagator: Any = None
        self._trace: Any = None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start(self) -> None:
        if not configured():
            return
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            self.log.warning("an OTLP endpoint is set, but OpenTelemetry is not installed: no traces"
                             " (install it with: pip install 'rerankctl[otel]')")
            return
        from .. import __version__

        attributes = {"service.version": __version__}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "rerankctl"
        self._provider = TracerProvider(resource=Resource.create(attributes))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._tracer = self._provider.get_tracer("rerankctl", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._trace = trace
        self.log.info("tracing: OpenTelemetry spans go to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                      or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))

    def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # exports what is still batched
            self._provider = self._tracer = None

    def request_span(self, request: web.Request, route: str, request_id: str) -> Any:
        """The server span of one request, child of the client's trace if it sent one; None when off."""
        if self._tracer is None:
            return None
        context = self._propagator.extract(carrier=dict(request.headers))
        request["trace_clock"] = time.time_ns() - time.monotonic_ns()  # monotonic -> epoch nanoseconds
        return self._tracer.start_span(
            f"{request.method} {route}", context=context, kind=self._trace.SpanKind.SERVER,
            start_time=int(request["t0"] * 1e9) + request["trace_clock"],
            attributes={"http.request.method": request.method, "http.route": route, "url.path": request.path,
                        "rerankctl.request_id": request_id})

    def end_request(self, span: Any, request: web.Request, status: int) -> None:
        """Its stages as children (from what the gate and the worker measured), then the span itself."""
        if span is None:
            return
        offset = request["trace_clock"]
        ns = lambda mono: int(mono * 1e9) + offset  # noqa: E731
        context = self._trace.set_span_in_context(span)
        stages = []
        admitted = request.get("admitted_at")
        if admitted is not None:
            stages.append(("admission", request["t0"], admitted))
        queue = request.get("queue")  # (enqueued, dispatched), monotonic
        timing = request.get("timing")
        if queue is not None:
            enqueued, dispatched = queue
            stages.append(("queue", enqueued, dispatched))
            if timing is not None:
                tokenized = dispatched + timing.tokenize_us / 1e6
                stages.append(("tokenize", dispatched, tokenized))
                stages.append(("inference", tokenized, tokenized + timing.inference_us / 1e6))
        for name, start, end in stages:
            child = self._tracer.start_span(name, context=context, start_time=ns(start))
            if name == "inference" and timing is not None:
                child.set_attribute("rerankctl.tokens", timing.tokens)
            child.end(end_time=ns(max(start, end)))
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.end()
