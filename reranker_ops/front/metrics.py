"""The server's Prometheus metrics: one ``prometheus_client`` registry per server.

What the server counts as it goes (requests, durations, schedule waits, drops, resends, probes, restarts,
poison requests, worker deaths) are the registry's counters, gauges and histograms. What is read when scraped
(workers live and expected, the state, health, pairs and tokens the workers scored, connections by port, the
batching) comes from a collector the health server fills in (``live``). ``/metrics`` is the registry's
exposition, with MOSEC's own metrics appended.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# No "_created" series: a timestamp per counter and label set that dashboards never read and that doubles the
# exposition. A process-wide switch of prometheus_client (since 0.17).
prometheus_client.disable_created_metrics()

STATES = ("starting", "running", "degraded", "restarting", "stopping", "stopped", "failed")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Live(Collector):
    """Values read at scrape time, from whatever the health server hands it."""

    def __init__(self) -> None:
        self.read: Optional[Callable[[], Iterable]] = None

    def collect(self):
        return list(self.read()) if self.read is not None else []


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self._request_series: dict[tuple[str, int], tuple] = {}  # (route, status) -> its counter and histogram
        self._schedule_series: dict[str, tuple] = {}  # lane -> its wait and service histograms
        self.requests = Counter("reranker_requests", "Requests answered, by route and HTTP status.",
                                ["route", "code"], registry=r)
        self.duration = Histogram("reranker_request_duration_seconds", "Time from request to answer, by route.",
                                  ["route"], buckets=DURATION_BUCKETS, registry=r)
        self.schedule = {
            name: Histogram(f"reranker_schedule_{name}_seconds",
                            f"Time a unit of work (small request or chunk of a large one) spent {what}.",
                            ["class"], buckets=DURATION_BUCKETS, registry=r)
            for name, what in (("wait", "in the gate's fair queue"), ("service", "in MOSEC (its queue and scoring)"))
        }
        self.dropped_units = Counter("reranker_dropped_units", "Work dropped before scoring: its client went away"
                                     " or its deadline passed.", ["class"], registry=r)
        self.dropped_pairs = Counter("reranker_dropped_pairs", "Pairs of split requests never scored because"
                                     " nobody waited for them.", registry=r)
        self.resent = Counter("reranker_upstream_resent", "Work the gate sent to MOSEC again: its connection was"
                              " refused or cut (connection), as while MOSEC is restarted, or a score worker died"
                              " while it was out (worker_lost).", ["reason"], registry=r)
        self.poisoned = Counter("reranker_poisoned_requests", "Requests refused because they killed score workers:"
                                " the second death, alone in an envelope (worker_died), or the same body again"
                                " (quarantined).", ["reason"], registry=r)
        self.untrusted = Counter("reranker_upstream_untrusted", "What came from MOSEC's internal port without proof"
                                 " of the generation's secret (answer), or a listener there that is not the"
                                 " generation's (listener).", ["what"], registry=r)
        self._in_flight = Gauge("reranker_requests_in_flight", "Requests being answered now.", registry=r)
        self._in_flight_now = 0
        self.probes = Counter("reranker_probe", "Watchdog canary requests, by result.", ["result"], registry=r)
        self.probe_latency = Gauge("reranker_probe_latency_seconds", "Latency of the last canary request.",
                                   registry=r)
        self.probe_latency.set(float("nan"))
        self.restarts = Counter("reranker_restarts", "Remediations: killed workers and restarted servers.",
                                ["kind"], registry=r)
        self.worker_deaths = Counter("reranker_worker_deaths", "Score workers that died without being killed by"
                                     " the watchdog (a crash, the OOM killer, a signal from outside); MOSEC replaces"
                                     " them.", registry=r)
        # the label values that exist from the start, at 0: a rule or a dashboard never sees a series appear
        for labels, metric in ((("small",), self.dropped_units), (("chunk",), self.dropped_units),
                               (("connection",), self.resent), (("worker_lost",), self.resent),
                               (("worker_died",), self.poisoned), (("quarantined",), self.poisoned),
                               (("answer",), self.untrusted), (("listener",), self.untrusted),
                               (("success",), self.probes), (("failure",), self.probes),
                               (("worker",), self.restarts), (("server",), self.restarts)):
            metric.labels(*labels)
        self.live = _Live()
        r.register(self.live)

    # --- what the server counts as it goes -------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight_now

    @in_flight.setter
    def in_flight(self, n: int) -> None:
        self._in_flight_now = n
        self._in_flight.set(n)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        # each series' child is looked up once: ``labels`` takes a lock and builds its key every call, on every
        # request's path. Routes and statuses are the gate's own few (no client text), so this stays small.
        key = (route, code)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = (self.requests.labels(route, str(code)), self.duration.labels(route))
        series[0].inc()
        series[1].observe(seconds)

    def observe_schedule(self, lane: str, wait: float, service: float) -> None:
        """A unit of work: its wait in the gate's queue, and its time in MOSEC (queue there + scoring)."""
        series = self._schedule_series.get(lane)
        if series is None:
            series = self._schedule_series[lane] = (self.schedule["wait"].labels(lane),
                                                    self.schedule["service"].labels(lane))
        series[0].observe(wait)
        series[1].observe(service)

    def count_dropped(self, lane: str, pairs: int) -> None:
        self.dropped_units.labels(lane).inc()
        self.dropped_pairs.inc(pairs)

    def count_resend(self, reason: str, n: int = 1) -> None:
        self.resent.labels(reason).inc(n)

    def count_poisoned(self, reason: str) -> None:
        self.poisoned.labels(reason).inc()

    def count_untrusted(self, what: str) -> None:
        self.untrusted.labels(what).inc()

    def count_worker_death(self) -> None:
        self.worker_deaths.inc()

    def observe_probe(self, ok: bool, latency: Optional[float]) -> None:
        self.probes.labels("success" if ok else "failure").inc()
        if latency is not None:
            self.probe_latency.set(latency)

    def count_restart(self, kind: str) -> None:
        self.restarts.labels(kind).inc()

    # --- the exposition ----------------------------------------------------------------------------------
    def render(self, extra: str = "") -> bytes:
        """The registry's exposition, then ``extra`` (MOSEC's own metrics) without its ``# EOF``."""
        text = generate_latest(self.registry)
        if extra:
            text += ("\n".join(ln for ln in extra.splitlines() if ln.strip() != "# EOF") + "\n").encode("utf-8")
        return text


def gauge(name: str, help_text: str, value: float, labels: Optional[dict[str, str]] = None) -> GaugeMetricFamily:
    return _family(GaugeMetricFamily, name, help_text, value, labels)


def counter(name: str, help_text: str, value: float, labels: Optional[dict[str, str]] = None) -> CounterMetricFamily:
    return _family(CounterMetricFamily, name, help_text, value, labels)


def _family(kind, name: str, help_text: str, value: float, labels: Optional[dict[str, str]]):
    if not labels:
        return kind(name, help_text, value=value)
    family = kind(name, help_text, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def labelled(kind, name: str, help_text: str, label: str, values: Iterable[tuple[str, float]]):
    """One family, one sample per (label value, value)."""
    family = kind(name, help_text, labels=[label])
    for key, value in values:
        family.add_metric([key], value)
    return family
