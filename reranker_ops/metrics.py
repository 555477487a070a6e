"""Prometheus text exposition for the supervisor: a few counters and histograms, no extra dependency."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Iterable

STATES = ("starting", "running", "degraded", "restarting", "stopping", "stopped", "failed")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    items = [f'{k}="{str(v)}"' for k, v in pairs]
    return "{" + ",".join(items) + "}" if items else ""


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.duration_counts: dict[str, list[int]] = {}
        self.duration_sum: dict[str, float] = defaultdict(float)
        self.duration_n: dict[str, int] = defaultdict(int)
        self.in_flight = 0
        self.probes: dict[str, int] = defaultdict(int)
        self.last_probe_latency = float("nan")
        self.restarts: dict[str, int] = defaultdict(int)
        self.worker_deaths = 0
        self.sched_counts: dict[tuple[str, str], list[int]] = {}
        self.sched_sum: dict[tuple[str, str], float] = defaultdict(float)
        self.sched_n: dict[tuple[str, str], int] = defaultdict(int)
        self.dropped_units: dict[str, int] = defaultdict(int)
        self.dropped_pairs = 0
        self.resent: dict[str, int] = defaultdict(int)
        self.poisoned: dict[str, int] = defaultdict(int)
        self.untrusted: dict[str, int] = defaultdict(int)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, code)] += 1
            buckets = self.duration_counts.setdefault(route, [0] * len(DURATION_BUCKETS))
            for i, b in enumerate(DURATION_BUCKETS):
                if seconds <= b:
                    buckets[i] += 1
            self.duration_sum[route] += seconds
            self.duration_n[route] += 1

    def observe_schedule(self, lane: str, wait: float, service: float) -> None:
        """A unit of work: its wait in the gate's queue, and its time in MOSEC (queue there + scoring)."""
        with self._lock:
            for name, value in (("wait", wait), ("service", service)):
                key = (lane, name)
                buckets = self.sched_counts.setdefault(key, [0] * len(DURATION_BUCKETS))
                for i, b in enumerate(DURATION_BUCKETS):
                    if value <= b:
                        buckets[i] += 1
                self.sched_sum[key] += value
                self.sched_n[key] += 1

    def count_dropped(self, lane: str, pairs: int) -> None:
        with self._lock:
            self.dropped_units[lane] += 1
            self.dropped_pairs += pairs

    def count_resend(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.resent[reason] += n

    def count_poisoned(self, reason: str) -> None:
        with self._lock:
            self.poisoned[reason] += 1

    def count_untrusted(self, what: str) -> None:
        with self._lock:
            self.untrusted[what] += 1

    def observe_probe(self, ok: bool, latency: float | None) -> None:
        with self._lock:
            self.probes["success" if ok else "failure"] += 1
            if latency is not None:
                self.last_probe_latency = latency

    def count_worker_death(self) -> None:
        with self._lock:
            self.worker_deaths += 1

    def count_restart(self, kind: str) -> None:
        with self._lock:
            self.restarts[kind] += 1

    def render(self, *, healthy: bool, pairs: int, tokens: int, workers: dict[str, int],
               expected: dict[str, int] | None = None, state: str = "", extra: str = "") -> str:
        out: list[str] = []
        with self._lock:
            out += ["# HELP reranker_requests_total Requests answered, by route and HTTP status.",
                    "# TYPE reranker_requests_total counter"]
            for (route, code), n in sorted(self.requests.items()):
                out.append(f"reranker_requests_total{_labels([('route', route), ('code', code)])} {n}")
            out += ["# HELP reranker_request_duration_seconds Time from request to answer, by route.",
                    "# TYPE reranker_request_duration_seconds histogram"]
            for route, buckets in sorted(self.duration_counts.items()):
                for b, n in zip(DURATION_BUCKETS, buckets):
                    out.append(f"reranker_request_duration_seconds_bucket{_labels([('route', route), ('le', b)])} {n}")
                out.append(
                    f"reranker_request_duration_seconds_bucket{_labels([('route', route), ('le', '+Inf')])} "
                    f"{self.duration_n[route]}"
                )
                out.append(f"reranker_request_duration_seconds_sum{_labels([('route', route)])} {self.duration_sum[route]}")
                out.append(f"reranker_request_duration_seconds_count{_labels([('route', route)])} {self.duration_n[route]}")
            for name, what in (("wait", "in the gate's fair queue"), ("service", "in MOSEC (its queue and scoring)")):
                metric = f"reranker_schedule_{name}_seconds"
                out += [f"# HELP {metric} Time a unit of work (small request or chunk of a large one) spent {what}.",
                        f"# TYPE {metric} histogram"]
                for (lane, kind), buckets in sorted(self.sched_counts.items()):
                    if kind != name:
                        continue
                    for b, n in zip(DURATION_BUCKETS, buckets):
                        out.append(f"{metric}_bucket{_labels([('class', lane), ('le', b)])} {n}")
                    out.append(f"{metric}_bucket{_labels([('class', lane), ('le', '+Inf')])} {self.sched_n[(lane, kind)]}")
                    out.append(f"{metric}_sum{_labels([('class', lane)])} {self.sched_sum[(lane, kind)]}")
                    out.append(f"{metric}_count{_labels([('class', lane)])} {self.sched_n[(lane, kind)]}")
            out += ["# HELP reranker_dropped_units_total Work dropped before scoring: its client went away or its deadline passed.",
                    "# TYPE reranker_dropped_units_total counter"]
            for lane in ("small", "chunk"):
                out.append(f"reranker_dropped_units_total{_labels([('class', lane)])} {self.dropped_units[lane]}")
            out += ["# HELP reranker_dropped_pairs_total Pairs of split requests never scored because nobody waited for them.",
                    "# TYPE reranker_dropped_pairs_total counter", f"reranker_dropped_pairs_total {self.dropped_pairs}"]
            out += ["# HELP reranker_upstream_resent_total Work the gate sent to MOSEC again: its connection was refused"
                    " or cut (connection), as while MOSEC is restarted, or a score worker died while it was out"
                    " (worker_lost: every envelope out is sent again, the first answer wins).",
                    "# TYPE reranker_upstream_resent_total counter"]
            for reason in ("connection", "worker_lost"):
                out.append(f"reranker_upstream_resent_total{_labels([('reason', reason)])} {self.resent[reason]}")
            out += ["# HELP reranker_poisoned_requests_total Requests refused because they killed score workers: the"
                    " second death, alone in an envelope (worker_died), or the same body again (quarantined).",
                    "# TYPE reranker_poisoned_requests_total counter"]
            for reason in ("worker_died", "quarantined"):
                out.append(f"reranker_poisoned_requests_total{_labels([('reason', reason)])} {self.poisoned[reason]}")
            out += ["# HELP reranker_upstream_untrusted_total What came from MOSEC's internal port without proof of the"
                    " generation's secret (an answer), or a listener there that is not the generation's (listener).",
                    "# TYPE reranker_upstream_untrusted_total counter"]
            for what in ("answer", "listener"):
                out.append(f"reranker_upstream_untrusted_total{_labels([('what', what)])} {self.untrusted[what]}")
            out += ["# HELP reranker_requests_in_flight Requests being answered now.",
                    "# TYPE reranker_requests_in_flight gauge", f"reranker_requests_in_flight {self.in_flight}"]
            out += ["# HELP reranker_pairs_scored_total Query/passage pairs scored by the model.",
                    "# TYPE reranker_pairs_scored_total counter", f"reranker_pairs_scored_total {pairs}"]
            out += ["# HELP reranker_tokens_scored_total Tokens run through the model.",
                    "# TYPE reranker_tokens_scored_total counter", f"reranker_tokens_scored_total {tokens}"]
            out += ["# HELP reranker_probe_total Watchdog canary requests, by result.",
                    "# TYPE reranker_probe_total counter"]
            for result in ("success", "failure"):
                out.append(f"reranker_probe_total{_labels([('result', result)])} {self.probes[result]}")
            out += ["# HELP reranker_probe_latency_seconds Latency of the last canary request.",
                    "# TYPE reranker_probe_latency_seconds gauge",
                    f"reranker_probe_latency_seconds {self.last_probe_latency}"]
            out += ["# HELP reranker_restarts_total Remediations: killed workers and restarted servers.",
                    "# TYPE reranker_restarts_total counter"]
            for kind in ("worker", "server"):
                out.append(f"reranker_restarts_total{_labels([('kind', kind)])} {self.restarts[kind]}")
            out += ["# HELP reranker_worker_deaths_total Score workers that died without being killed by the"
                    " watchdog (a crash, the OOM killer, a signal from outside); MOSEC replaces them.",
                    "# TYPE reranker_worker_deaths_total counter", f"reranker_worker_deaths_total {self.worker_deaths}"]
        out += ["# HELP reranker_workers Live, ready MOSEC worker processes, by stage.", "# TYPE reranker_workers gauge"]
        for stage, n in sorted(workers.items()):
            out.append(f"reranker_workers{_labels([('stage', stage)])} {n}")
        out += ["# HELP reranker_workers_expected MOSEC worker processes the server should have, by stage.",
                "# TYPE reranker_workers_expected gauge"]
        for stage, n in sorted((expected or {}).items()):
            out.append(f"reranker_workers_expected{_labels([('stage', stage)])} {n}")
        if state:
            out += ["# HELP reranker_state The supervisor's state (1 for the current one).", "# TYPE reranker_state gauge"]
            for name in STATES:
                out.append(f"reranker_state{_labels([('state', name)])} {1 if name == state else 0}")
        out += ["# HELP reranker_up 1 while the last canary request succeeded recently.",
                "# TYPE reranker_up gauge", f"reranker_up {1 if healthy else 0}"]
        text = "\n".join(out) + "\n"
        if extra:
            text += "\n".join(l for l in extra.splitlines() if l.strip() != "# EOF") + "\n"
        return text
