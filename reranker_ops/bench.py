"""A closed-loop load generator for any endpoint with the ``/rerank`` shape, and the in-process ceiling.

Requests are distinct and seeded (no cache can flatter a result) and the same seed gives the same
requests, so two endpoints — ours and infinity_emb's — can be measured on identical work.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from .models.synthetic import BENCH_RU_WORDS as _RU

WORKLOADS = ("tiny", "rag", "mixed", "short", "long", "wide")
CLIENTS = ("stdlib", "httpx")  # see LeanClient

def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        w = rng.choice(_RU)
        words.append(w)
        size += len(w) + 1
    text = " ".join(words)[:chars]
    return text[:1].upper() + text[1:] + "."


def make_request(workload: str, rng: random.Random, n: int) -> dict:
    """One distinct request: the counter ``n`` is in the query, so no two requests are alike."""
    query = f"{_text(rng, rng.randint(20, 60))} {n}"
    if workload == "tiny":
        docs = [_text(rng, rng.randint(20, 40))]
    elif workload == "rag":
        docs = [_text(rng, rng.randint(540, 660)) for _ in range(20)]
    elif workload == "mixed":
        docs = [_text(rng, rng.randint(20, 3000)) for _ in range(rng.randint(1, 100))]
    elif workload == "short":  # a chat turn: five short passages
        docs = [_text(rng, rng.randint(60, 200)) for _ in range(5)]
    elif workload == "long":  # a batch job: a hundred long passages
        docs = [_text(rng, 1000) for _ in range(100)]
    elif workload == "wide":  # eight passages past the model's window: the largest activations there are
        docs = [_text(rng, rng.randint(2000, 3000)) for _ in range(8)]
    else:
        raise ValueError(f"unknown workload {workload!r}")
    return {"query": query, "documents": docs}


def request_stream(workload: str, seed: int) -> Iterator[dict]:
    rng = random.Random(seed)
    n = 0
    while True:
        yield make_request(workload, rng, n)
        n += 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class BenchResult:
    workload: str
    concurrency: int
    seconds: float
    requests: int
    pairs: int
    tokens: int
    latencies: list[float] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    @classmethod
    def merged(cls, parts: list["BenchResult"]) -> "BenchResult":
        """Several runs of one workload and concurrency as one: their counts and seconds summed."""
        out = cls(parts[0].workload, parts[0].concurrency, 0.0, 0, 0, 0)
        for p in parts:
            out.seconds += p.seconds
            out.requests += p.requests
            out.pairs += p.pairs
            out.tokens += p.tokens
            out.latencies.extend(p.latencies)
            out.codes.update(p.codes)
            out.errors.update(p.errors)
        return out

    def summary(self) -> dict:
        ok = self.codes.get(200, 0)
        lat = self.latencies
        return {
            "workload": self.workload,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "ok": ok,
            "requests_per_s": round(ok / self.seconds, 3) if self.seconds else 0.0,
            "pairs_per_s": round(self.pairs / self.seconds, 3) if self.seconds else 0.0,
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
            "latency_ms": {
                "p50": round(percentile(lat, 0.50) * 1000, 2),
                "p95": round(percentile(lat, 0.95) * 1000, 2),
                "p99": round(percentile(lat, 0.99) * 1000, 2),
                "max": round(max(lat) * 1000, 2) if lat else float("nan"),
                "mean": round(statistics.fmean(lat) * 1000, 2) if lat else float("nan"),
            },
            "codes": {str(k): v for k, v in sorted(self.codes.items())},
            "errors": dict(self.errors),
        }


def _endpoint(url: str, api_key: Optional[str]) -> tuple[str, dict]:
    """The ``/rerank`` URL under a base URL (or the URL itself), and the headers that carry the key."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/rerank"):
        endpoint += "/rerank"
    return endpoint, ({"Authorization": f"Bearer {api_key}"} if api_key else {})


def _address(url: str):
    """``url`` split, and whether it is TLS, its host and its port (the scheme's default when it names none)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    tls = parts.scheme == "https"
    return parts, tls, parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80)


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise ``Unreachable`` (one line, with what to do) unless something accepts a connection at ``url``'s host
    and port: a closed loop aimed at nothing would otherwise count thousands of refusals a second for its whole
    duration and report them as a measurement."""
    import socket

    from .errors import Unreachable

    _parts, _tls, host, port = _address(url)
    hint = "start the server with 'rerankctl serve --daemon' (see 'rerankctl status'), or pass --url"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror as exc:
        raise Unreachable(f"cannot resolve {host!r}: {exc.strerror or exc}", "check the host in --url") from exc
    except TimeoutError as exc:  # socket.timeout is TimeoutError since Python 3.10
        raise Unreachable(f"{host}:{port} did not accept a connection within {timeout:g}s", hint) from exc
    except ConnectionRefusedError as exc:
        raise Unreachable(f"nothing listens at {host}:{port} (connection refused)", hint) from exc
    except OSError as exc:
        raise Unreachable(f"cannot connect to {host}:{port}: {exc.strerror or exc}", hint) from exc


def run_load(
    url: str,
    *,
    workload: str = "tiny",
    concurrency: int = 1,
    duration: Optional[float] = 10.0,
    requests: Optional[int] = None,
    seed: int = 0,
    timeout: float = 120.0,
    warmup: int = 0,
    model_name: Optional[str] = None,
    api_key: Optional[str] = None,
    on_progress: Optional[Callable[[int], None]] = None,
    client: str = "stdlib",
) -> BenchResult:
    """Closed loop: ``concurrency`` clients, each sending its next request when the last is answered.

    ``client``: ``stdlib`` (the default: each client its own kept-alive ``LeanClient``) or ``httpx`` (one
    pooled client, as a service built on httpx sends). The load generator runs on the server's machine and
    its CPU is taken from the server's: httpx costs ~1.4 ms of CPU a request here, ``http.client`` ~0.5 ms
    and ``LeanClient`` less (AMD EPYC, 2 cores), so with httpx a served/ceiling ratio also measured the client."""
    import httpx

    endpoint, headers = _endpoint(url, api_key)
    stream = request_stream(workload, seed)
    lock = threading.Lock()
    result = BenchResult(workload, concurrency, 0.0, 0, 0, 0)
    issued = [0]

    def next_request(measured: bool = True) -> Optional[dict]:
        with lock:
            if measured:
                if requests is not None and issued[0] >= requests:
                    return None
                issued[0] += 1
            req = next(stream)
        if model_name:
            req["model"] = model_name
        return req

    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}")
    failures = (httpx.HTTPError, OSError)  # OSError: LeanClient's ConnectionError, and timeouts
    # httpx's pool only when asked for: making one builds a TLS context (~33 ms of CPU here)
    pool = (httpx.Client(timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=concurrency + 4))
            if client == "httpx" else None)

    def sender() -> tuple[Callable[[dict], tuple[int, bytes]], Callable[[], None]]:
        """One client's way to POST a request: (status, body)."""
        if client == "httpx":
            def send(req: dict) -> tuple[int, bytes]:
                assert pool is not None
                r = pool.post(endpoint, json=req)
                return r.status_code, r.content
            return send, lambda: None
        lean = LeanClient(endpoint, headers, timeout)
        return lean.post, lean.close

    try:
        send, close = sender()
        try:
            for _ in range(warmup):
                req = next_request(measured=False)
                if req is not None:
                    try:
                        send(req)
                    except failures:
                        break  # the measured loop counts what is wrong
        finally:
            close()
        t_start = time.perf_counter()
        stop_at = t_start + duration if duration else None

        def one_client() -> None:
            send, close = sender()
            try:
                while stop_at is None or time.perf_counter() < stop_at:
                    req = next_request()
                    if req is None:
                        return
                    t0 = time.perf_counter()
                    try:
                        status, data = send(req)
                        dt = time.perf_counter() - t0
                        tokens = 0
                        if status == 200:
                            try:
                                usage = json.loads(data).get("usage") or {}
                                tokens = int(usage.get("total_tokens") or 0)
                            except (ValueError, AttributeError):
                                pass
                        with lock:
                            result.codes[status] += 1
                            result.requests += 1
                            if status == 200:
                                result.latencies.append(dt)
                                result.pairs += len(req["documents"])
                                result.tokens += tokens
                            n = result.requests
                    except failures as exc:
                        with lock:
                            result.errors[type(exc).__name__] += 1
                            result.requests += 1
                            n = result.requests
                    if on_progress:
                        on_progress(n)
            finally:
                close()

        threads = [threading.Thread(target=one_client, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result.seconds = time.perf_counter() - t_start
    finally:
        if pool is not None:
            pool.close()
    return result


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
                 token_budget: int = 2048, attention_budget: int = 512 * 512, batch_requests: int = 32) -> None:
        from .serving.engine import Scorer, configure_process_threads

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
                token_budget: int = 2048, attention_budget: int = 512 * 512, batch_requests: int = 32) -> dict:
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
                    token_budget: int = 2048, attention_budget: int = 512 * 512, batch_requests: int = 32,
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


class _NoAnswer(ConnectionError):
    """The connection ended before a byte of the answer came: a kept-alive one the server closed while idle."""


class LeanClient:
    """POST JSON over one kept-alive connection, with HTTP/1.1 written and read here over a socket: the
    lightest a client gets, so a lone request's latency is the server's, not the client library's. On a
    2-core machine the client's CPU is taken from the server's: ``http.client`` parses every answer's headers
    with the ``email`` package, 115-167 us of CPU a request against 21-52 us here, and it added 0.2-0.3 ms to
    each lone ``tiny`` request's measured latency (paired differences, median 2.32-2.37 ms with it, 2.02-2.15
    ms with this, three runs each alternated, AMD EPYC; ``httpx`` costs 1-2 ms more than either).

    It reads answers by ``Content-Length``, chunked, or up to the connection's end, and honours
    ``Connection: close``. A request is sent again, once, only when a reused connection ended before any byte
    of its answer (the server had closed it while idle); never after a timeout, which would double the
    work a load generator measures."""

    def __init__(self, endpoint: str, headers: dict, timeout: float) -> None:
        parts, self._tls, self._host, self._port = _address(endpoint)
        self._timeout = timeout
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = {"Host": parts.netloc or self._host, "Content-Type": "application/json", **headers}
        self._head = (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())).encode("latin-1")
        self._sock = None
        self._buf = b""
        self._answered = False

    def post(self, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        message = self._head + b"Content-Length: %d\r\n\r\n" % len(data) + data
        for attempt in (0, 1):
            reused = self._sock is not None
            self._answered = False  # a byte of this answer came
            try:
                if self._sock is None:
                    self._connect()
                assert self._sock is not None
                self._sock.sendall(message)
                try:
                    return self._answer()
                except ValueError as exc:  # a length or chunk size that is not a number
                    raise ConnectionError(f"an unreadable answer: {exc}") from exc
            except OSError as exc:  # ConnectionError, TimeoutError (socket.timeout) and the rest
                again = (not attempt and reused and not self._answered and isinstance(exc, ConnectionError)
                         and not isinstance(exc, TimeoutError))
                self.close()
                if not again:
                    raise ConnectionError(str(exc) or type(exc).__name__) from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def _connect(self) -> None:
        import socket

        sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls:
            import ssl

            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
        self._sock = sock
        self._buf = b""

    def _more(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-answer") if self._answered else _NoAnswer(
                "the server closed the connection without an answer")
        self._answered = True
        self._buf += chunk

    def _until(self, mark: bytes, what: str) -> bytes:
        """What comes before ``mark`` (read as needed, at most 64 KiB), consumed with it."""
        while mark not in self._buf:
            if len(self._buf) > 1 << 16:
                raise ConnectionError(f"an answer's {what} is over 64 KiB")
            self._more()
        out, _, self._buf = self._buf.partition(mark)
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._more()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _answer(self) -> tuple[int, bytes]:
        lines = self._until(b"\r\n\r\n", "head").split(b"\r\n")
        first = lines[0].split(None, 2)
        if len(first) < 2 or not first[0].startswith(b"HTTP/1.") or not first[1].isdigit():
            raise ConnectionError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        status = int(first[1])
        length: Optional[int] = None
        chunked = False
        close = first[0] == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif name == b"connection":
                close = value == b"close" or (close and value != b"keep-alive")
        if chunked:
            parts = []
            while True:
                size = int(self._until(b"\r\n", "line").split(b";")[0], 16)
                if size == 0:
                    while self._until(b"\r\n", "line"):  # trailers, up to the empty line
                        pass
                    break
                parts.append(self._exactly(size))
                self._exactly(2)  # the CRLF after each chunk
            body = b"".join(parts)
        elif length is not None:
            body = self._exactly(length)
        elif status in (204, 304) or status < 200:
            body = b""
        else:  # delimited by the end of the connection
            assert self._sock is not None
            while chunk := self._sock.recv(1 << 16):
                self._buf += chunk
            body, self._buf, close = self._buf, b"", True
        if close:
            self.close()
        return status, body


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

    from .serving.engine import Scorer, configure_process_threads, sigmoid

    configure_process_threads()
    scorer = Scorer(variant_dir, threads=threads)
    endpoint, headers = _endpoint(url, api_key)
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


MIXED_TARGETS = {"short_p95_ratio_max": 10.0, "long_pairs_ratio_min": 0.9, "short_failed_max": 0}


def run_mixed(url: str, *, seconds: float = 60.0, timeout: float = 600.0, api_key: Optional[str] = None,
              short_c: int = 2, long_c: int = 2, seed: int = 0) -> dict:
    """Short requests alone, long requests alone, then both at once (same server, one run)."""
    kw = dict(timeout=timeout, api_key=api_key, warmup=1)
    short_alone = run_load(url, workload="short", concurrency=short_c, duration=seconds / 2, seed=seed, **kw)
    long_alone = run_load(url, workload="long", concurrency=long_c, duration=seconds, seed=seed + 1, **kw)
    out: dict = {}

    def long_side() -> None:
        out["long"] = run_load(url, workload="long", concurrency=long_c, duration=seconds, seed=seed + 2, **kw)

    t = threading.Thread(target=long_side)
    t.start()
    time.sleep(min(5.0, seconds / 10))  # the long load is under way before the short clients start
    short_mixed = run_load(url, workload="short", concurrency=short_c, duration=seconds - min(5.0, seconds / 10),
                           seed=seed + 3, **kw)
    t.join()
    long_mixed = out["long"]
    sa, sm, la, lm = (r.summary() for r in (short_alone, short_mixed, long_alone, long_mixed))
    report = {
        "short_alone": sa, "short_mixed": sm, "long_alone": la, "long_mixed": lm,
        "short_p95_ratio": round(sm["latency_ms"]["p95"] / sa["latency_ms"]["p95"], 2) if sa["latency_ms"]["p95"] else None,
        "long_pairs_ratio": round(lm["pairs_per_s"] / la["pairs_per_s"], 3) if la["pairs_per_s"] else None,
        "short_failed": sm["requests"] - sm["ok"],
        "targets": MIXED_TARGETS,
    }
    report["met"] = bool(
        report["short_p95_ratio"] is not None and report["short_p95_ratio"] <= MIXED_TARGETS["short_p95_ratio_max"]
        and report["long_pairs_ratio"] is not None and report["long_pairs_ratio"] >= MIXED_TARGETS["long_pairs_ratio_min"]
        and report["short_failed"] <= MIXED_TARGETS["short_failed_max"])
    return report
