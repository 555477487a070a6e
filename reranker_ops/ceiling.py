"""The in-process ceiling: the same kind of pairs scored with no server, what this machine can do at best, and
the served figures set beside it (interleaved runs, and paired differences for a lone request's latency)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from .bench import CLIENTS, BenchResult, LeanClient, endpoint_and_headers, percentile, request_stream, run_load
from .worker.engine import ATTENTION_BUDGET, TOKEN_BUDGET, Scorer, configure_process_threads, sigmoid


class Ceiling:
    """The same kind of pairs scored in-process, no server: what this machine can do at best.

    ``select`` tries every group size (requests per call) with the server's memory budgets, and the best
    group without them (a 4096-token micro-batch, no attention cap), so the ceiling is the best batching,
    not the server's own. ``measure`` then scores with the configuration selected, as often as asked: the
    figure reported is those fresh measurements. Reporting the fastest of several short noisy trials would
    report the luckiest one (on a shared 2-core machine the same group measured twice differs by 10-20 %),
    and every ratio to it would be biased low; the trials are kept in ``selection``.
    """

    def __init__(self, variant_dir: Path, *, workload: str = "tiny", seed: int = 0, threads: int = 0,
                 token_budget: int = TOKEN_BUDGET, attention_budget: int = ATTENTION_BUDGET, batch_requests: int = 32) -> None:
        configure_process_threads()
        self.workload = workload
        self.threads = threads
        self.batch_requests = batch_requests
        self.scorer = Scorer(variant_dir, threads=threads, token_budget=token_budget,
                             attention_budget=attention_budget)
        stream = request_stream(workload, seed)
        reqs = [next(stream) for _ in range(max(batch_requests * 4, 64))]
        self.encoded = [self.scorer.tokenizer.encode_pairs(r["query"], r["documents"]) for r in reqs]
        self.scorer.score_encoded(self.encoded[0])  # warm-up
        self._next = 0
        self.budgets = (token_budget, attention_budget)
        self.best = 1
        self.chosen = self.budgets
        self.selection: dict = {}
        self.single: dict = {}

    def _run(self, group: int, seconds: float) -> tuple[int, int, float, list[float]]:
        """Calls of ``group`` requests each for ``seconds`` (at least one): requests, pairs, elapsed, latencies."""
        done_req = done_pairs = 0
        lat: list[float] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or done_req == 0:
            batch = [self.encoded[(self._next + k) % len(self.encoded)] for k in range(group)]
            self._next += group
            flat = [e for req in batch for e in req]
            t1 = time.perf_counter()
            self.scorer.score_encoded(flat)
            lat.append(time.perf_counter() - t1)
            done_req += group
            done_pairs += len(flat)
        return done_req, done_pairs, time.perf_counter() - t0, lat

    TRIAL_PASSES = 3

    def _trials(self, candidates: list[tuple[int, tuple[int, int]]], seconds_each: float
                ) -> dict[tuple[int, tuple[int, int]], tuple[int, int, float, list[float]]]:
        """Each candidate (requests a call, memory budgets) scored for ``seconds_each`` in all, in
        ``TRIAL_PASSES`` round-robin slices, the order reversed every pass: so the candidates meet the same
        machine, whose speed drifts by 10-30 % within a minute here (one candidate after the other, the
        selection picked 8 requests a call over 10 in some rounds and 10 in others). A single pass when one
        call is longer than a slice (``rag``'s calls of 4 requests take ~13 s): more would only lengthen it."""
        sc = self.scorer
        acc = {c: (0, 0, 0.0, []) for c in candidates}
        for p in range(self.TRIAL_PASSES):
            for c in (candidates if p % 2 == 0 else candidates[::-1]):
                sc.token_budget, sc.attention_budget = c[1]
                try:
                    req, pairs, el, lat = self._run(c[0], seconds_each / self.TRIAL_PASSES)
                finally:
                    sc.token_budget, sc.attention_budget = self.budgets
                a = acc[c]
                acc[c] = (a[0] + req, a[1] + pairs, a[2] + el, a[3] + lat)
            if p == 0 and max(a[2] for a in acc.values()) > 1.5 * seconds_each / self.TRIAL_PASSES:
                break
        return acc

    def select(self, seconds: float) -> float:
        """Try every group size (on a CPU without VNNI, BERT-base costs about the same per pair at any batch
        size, and the fastest group differs by workload and machine), then the best one without the memory
        budgets, each against the other in alternating slices (``_trials``); keep the fastest configuration.
        Returns the seconds each trial took."""
        avg_pairs = sum(len(e) for e in self.encoded) / len(self.encoded)
        groups = sorted({g for g in (1, 2, 4, 8, 16, 32, self.batch_requests)
                         if g <= self.batch_requests and g * avg_pairs <= 256} | {1})
        per_group = max(2.0, seconds / (len(groups) + 1))
        trials = self._trials([(g, self.budgets) for g in groups], per_group)
        pps = {g: t[1] / t[2] for (g, _b), t in trials.items()}
        self.best = max(groups, key=lambda g: pps[g])
        unbounded_budgets = (max(4096, self.budgets[0]), 0)
        pair = self._trials([(self.best, self.budgets), (self.best, unbounded_budgets)], per_group)
        bounded, unbounded = pair[(self.best, self.budgets)], pair[(self.best, unbounded_budgets)]
        self.chosen = unbounded_budgets if unbounded[1] / unbounded[2] > bounded[1] / bounded[2] else self.budgets
        s_req, s_pairs, s_el, s_lat = trials[(1, self.budgets)]
        self.single = {"requests_per_s": round(s_req / s_el, 3), "pairs_per_s": round(s_pairs / s_el, 3),
                       "latency_ms_p50": round(percentile(s_lat, 0.5) * 1000, 2)}
        self.selection = {"by_group": {str(g): round(v, 3) for g, v in pps.items()}, "max_group": self.batch_requests,
                          "pairs_per_s_without_memory_budgets": round(unbounded[1] / unbounded[2], 3),
                          "seconds_each": per_group}
        return per_group

    def measure(self, seconds: float) -> tuple[int, int, float]:
        """The selected configuration scored for ``seconds``: requests, pairs, elapsed."""
        sc = self.scorer
        sc.token_budget, sc.attention_budget = self.chosen
        try:
            req, pairs, elapsed, _lat = self._run(self.best, seconds)
        finally:
            sc.token_budget, sc.attention_budget = self.budgets
        return req, pairs, elapsed

    def report(self, blocks: list[tuple[int, int, float]]) -> dict:
        req = sum(b[0] for b in blocks)
        pairs = sum(b[1] for b in blocks)
        elapsed = sum(b[2] for b in blocks)
        return {
            "workload": self.workload,
            "threads": self.threads or "auto",
            "batched": {"requests_per_s": round(req / elapsed, 3), "pairs_per_s": round(pairs / elapsed, 3),
                        "requests_per_call": self.best, "memory_budgets": self.chosen == self.budgets},
            "selection": self.selection,
            "single": self.single,
        }


def run_ceiling(variant_dir: Path, *, workload: str = "tiny", seconds: float = 10.0, seed: int = 0, threads: int = 0,
                token_budget: int = TOKEN_BUDGET, attention_budget: int = ATTENTION_BUDGET, batch_requests: int = 32) -> dict:
    """The in-process ceiling alone (``Ceiling``): selected, then measured once for ``seconds``.

    ``batched``: many requests' pairs per call under the token budget (the throughput ceiling).
    ``single``: one request per call (the latency floor for a lone client).
    """
    c = Ceiling(variant_dir, workload=workload, seed=seed, threads=threads, token_budget=token_budget,
                attention_budget=attention_budget, batch_requests=batch_requests)
    per_group = c.select(seconds)
    return c.report([c.measure(max(seconds, per_group))])


def run_interleaved(url: str, variant_dir: Path, *, workload: str = "tiny", concurrency: int = 1,
                    seconds: float = 10.0, blocks: int = 3, seed: int = 0, threads: int = 0,
                    token_budget: int = TOKEN_BUDGET, attention_budget: int = ATTENTION_BUDGET, batch_requests: int = 32,
                    timeout: float = 120.0, warmup: int = 0, model_name: Optional[str] = None,
                    api_key: Optional[str] = None, client: str = "stdlib") -> dict:
    """Served throughput against the in-process ceiling, measured side by side. The ceiling batches at most
    ``concurrency`` requests a call (and at most ``batch_requests``): a closed loop of ``concurrency``
    clients never has more requests in the server than that, so a bigger call is a batching no server can
    make of this load (AMD EPYC, AVX-512: the best call of ``tiny`` was 32 requests, 34.8 pairs/s against 30.8
    for 8 in the same selection, and c=10 served 0.93 of it with 98.5 % of the worker's time in inference).
    After the ceiling's selection, ``blocks`` rounds of a served block and a ceiling block of ``seconds / blocks`` each, their
    order alternating (served first, then ceiling first, ...). Measured one after the other, each in a window
    of its own, the two met a machine whose speed moves 10-30 % from one window to the next on a shared host,
    and their ratio moved with it (``rag`` c=4 gave 0.88, 0.89 and 1.02 in three runs of the same code); in
    adjacent blocks they share the machine's state. The served and ceiling figures are each the sum of
    their blocks (pairs over seconds); ``blocks`` keeps every pair's figures and ratio."""
    c = Ceiling(variant_dir, workload=workload, seed=seed + 1, threads=threads, token_budget=token_budget,
                attention_budget=attention_budget, batch_requests=max(1, min(batch_requests, concurrency)))
    c.select(max(4.0, min(30.0, seconds)))
    blocks = max(1, blocks)
    each = seconds / blocks
    served: list[BenchResult] = []
    ceiled: list[tuple[int, int, float]] = []
    rows = []
    for b in range(blocks):
        def serve() -> BenchResult:
            return run_load(url, workload=workload, concurrency=concurrency, duration=each, seed=seed + 7919 * b,
                            timeout=timeout, warmup=warmup if b == 0 else 0, model_name=model_name, api_key=api_key,
                            client=client)
        if b % 2 == 0:
            res = serve()
            blk = c.measure(each)
        else:
            blk = c.measure(each)
            res = serve()
        served.append(res)
        ceiled.append(blk)
        s_pps = res.pairs / res.seconds if res.seconds else 0.0
        c_pps = blk[1] / blk[2]
        rows.append({"first": "served" if b % 2 == 0 else "ceiling", "served_pairs_per_s": round(s_pps, 3),
                     "ceiling_pairs_per_s": round(c_pps, 3), "ratio": round(s_pps / c_pps, 3)})
    total = BenchResult.merged(served)
    out = {"served": total.summary(), "ceiling": c.report(ceiled), "blocks": rows}
    out["ratios"] = served_over_ceiling(out["served"], out["ceiling"])
    return out


def served_over_ceiling(s: dict, ce: dict) -> dict:
    """A served summary against a ceiling report."""
    return {
        "served_pairs_per_s_over_batched_ceiling": round(s["pairs_per_s"] / ce["batched"]["pairs_per_s"], 3),
        "served_requests_per_s_over_batched_ceiling": round(s["requests_per_s"] / ce["batched"]["requests_per_s"], 3),
        "served_p50_minus_inprocess_ms": round(s["latency_ms"]["p50"] - ce["single"]["latency_ms_p50"], 2),
    }


def run_paired(
    url: str,
    variant_dir: Path,
    *,
    workload: str = "tiny",
    seconds: float = 10.0,
    seed: int = 0,
    threads: int = 0,
    timeout: float = 120.0,
    warmup: int = 2,
    api_key: Optional[str] = None,
    client: str = "stdlib",
) -> dict:
    """What the server adds to a lone request, as paired differences: one client sends a request, and the
    same request (tokenized and scored) is run in-process right before or after it, alternately.

    The served latency and the in-process one used to come from separate windows of several seconds each.
    On a shared machine the model itself runs 10-30 % slower or faster from one window to the next (the same
    in-process p50 measured 55.7 and 78.7 ms a minute apart), which made their difference swing by +-10 ms
    on the same code. Pairs taken a few milliseconds apart share the machine's state; the median of their
    differences is the server's cost. The scores of both are compared too (the largest difference is reported).

    ``client``: ``stdlib`` (``LeanClient``, the default: the server's cost) or ``httpx`` (what a client built
    on httpx, like ours in ``client.py``, sees on top).
    """
    import httpx
    import numpy as np

    configure_process_threads()
    scorer = Scorer(variant_dir, threads=threads)
    endpoint, headers = endpoint_and_headers(url, api_key)
    stream = request_stream(workload, seed)
    served: list[float] = []
    local: list[float] = []
    added: list[float] = []
    worst = 0.0
    failed = 0
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}")
    if client == "httpx":
        hx = httpx.Client(timeout=timeout, headers=headers)

        def send(req: dict) -> tuple[int, bytes]:
            r = hx.post(endpoint, json=req)
            return r.status_code, r.content

        closer: Callable[[], None] = hx.close
    else:
        lean = LeanClient(endpoint, headers, timeout)
        send, closer = lean.post, lean.close
    try:
        t_end = None
        n = 0
        def serve(req: dict) -> tuple[float, Optional[list]]:
            t0 = time.perf_counter()
            try:
                status, data = send(req)
                took = time.perf_counter() - t0
                return took, (json.loads(data).get("scores") if status == 200 else None)
            except (httpx.HTTPError, ConnectionError, ValueError):
                return 0.0, None  # counted as failed, like run_load's errors

        def score_here(req: dict) -> tuple[float, np.ndarray]:
            t0 = time.perf_counter()
            logits = scorer.score(req["query"], req["documents"])
            return time.perf_counter() - t0, logits

        while t_end is None or time.perf_counter() < t_end:
            req = next(stream)
            if n % 2 == 0:  # which side goes first alternates
                (t_served, got), (t_local, logits) = serve(req), score_here(req)
            else:
                (t_local, logits), (t_served, got) = score_here(req), serve(req)
            n += 1
            if n <= warmup:
                continue
            if t_end is None:  # measured from the first request after the warm-up
                t_end = time.perf_counter() + seconds
            if got is None:
                failed += 1
                continue
            # /rerank answers sigmoid(logit) unless raw_scores is asked for
            worst = max(worst, float(np.max(np.abs(np.asarray(got) - sigmoid(logits)))))
            served.append(t_served)
            local.append(t_local)
            added.append(t_served - t_local)
    finally:
        closer()
    ms = lambda v: round(v * 1000, 2)  # noqa: E731
    return {
        "workload": workload,
        "client": client,
        "pairs_measured": len(added),
        "failed": failed,
        "served_p50_ms": ms(percentile(served, 0.5)),
        "inprocess_p50_ms": ms(percentile(local, 0.5)),
        "added_ms": {"p25": ms(percentile(added, 0.25)), "p50": ms(percentile(added, 0.5)),
                     "p75": ms(percentile(added, 0.75))},
        "max_score_difference": worst,
    }
