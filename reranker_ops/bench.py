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
from typing import Callable, Iterator, Optional

from .http1 import BadAnswer, ClientConnection

# The benchmark workloads' vocabulary (tests/modelkit/synthetic.py trains the DiTy-shaped model's tokenizer on it, so a
# Russian word becomes ~1.8 pieces, as with DiTy's own mBERT-style vocabulary).
BENCH_RU_WORDS = (
    "борщ суп свёкла капуста бульон сметана рецепт кухня погода дождь солнце ветер прогулка набережная город "
    "москва река кремль история наука книга библиотека школа университет студент учитель модель данные поиск "
    "документ запрос ответ сервер память процессор сеть обучение нейронный машинный быстрый медленный новый "
    "старый хороший плохой большой маленький красивый важный простой сложный первый последний весь каждый "
    "работа жизнь время человек дело день рука глаз голова дом страна мир вопрос сторона система группа"
).split()
_RU = BENCH_RU_WORDS

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


def endpoint_and_headers(url: str, api_key: Optional[str]) -> tuple[str, dict]:
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
    its CPU is taken from the server's: httpx costs several times the CPU of ``LeanClient`` a request
    (benchmarks/HISTORY.md), so with httpx a served/ceiling ratio also measures the client."""
    import httpx

    endpoint, headers = endpoint_and_headers(url, api_key)
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
    # httpx's pool only when asked for: making one builds a TLS context, tens of ms of CPU
    pool = (httpx.Client(timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=concurrency + 4))
            if client == "httpx" else None)

    def sender() -> tuple[Callable[[dict], tuple[int, bytes, Optional[str]]], Callable[[], None]]:
        """One client's way to POST a request: (status, body, its x-compute-tokens header)."""
        if client == "httpx":
            def send(req: dict) -> tuple[int, bytes, Optional[str]]:
                assert pool is not None
                r = pool.post(endpoint, json=req)
                return r.status_code, r.content, r.headers.get(COMPUTE_TOKENS)
            return send, lambda: None
        lean = LeanClient(endpoint, headers, timeout)
        return (lambda req: (*lean.post(req), lean.header(COMPUTE_TOKENS))), lean.close

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
                        status, data, compute_tokens = send(req)
                        dt = time.perf_counter() - t0
                        tokens = answer_tokens(data, compute_tokens) if status == 200 else 0
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


COMPUTE_TOKENS = "x-compute-tokens"  # TEI's header (and ours): the tokens an answer cost


def answer_tokens(data: bytes, compute_tokens: Optional[str]) -> int:
    """The tokens a 200 answer cost: its ``usage.total_tokens`` (ours, infinity's), else the x-compute-tokens
    header (text-embeddings-inference answers a bare list), else 0: tokens/s then reads 0, not a guess."""
    try:
        body = json.loads(data)
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict) and usage.get("total_tokens"):
            return int(usage["total_tokens"])
    except (ValueError, TypeError):
        pass
    return int(compute_tokens) if compute_tokens and compute_tokens.isdigit() else 0


class LeanClient:
    """POST JSON over one kept-alive blocking socket, with httptools (``http1.py``) for the HTTP: the lightest a
    client gets, so a lone request's latency is the server's, not the client library's. On a 2-core machine
    the client's CPU is taken from the server's, and ``http.client`` parses every answer's headers with the
    ``email`` package (``httpx`` costs more again; benchmarks/HISTORY.md has the measured difference).

    A request is sent again, once, only when a reused connection ended before any byte of its answer (the
    server had closed it while idle); never after a timeout, which would double the work a load generator
    measures."""

    def __init__(self, endpoint: str, headers: dict, timeout: float) -> None:
        parts, self._tls, self._host, self._port = _address(endpoint)
        self._timeout = timeout
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = [("Host", parts.netloc or self._host), ("Content-Type", "application/json"),
                         *headers.items()]
        self._sock = None
        self._http: Optional[ClientConnection] = None
        self._last: Optional[list] = None  # the last answer's headers

    def post(self, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        for attempt in (0, 1):
            reused = self._sock is not None
            try:
                if self._sock is None:
                    self._connect()
                assert self._sock is not None and self._http is not None
                self._sock.sendall(b"".join(self._http.request(self._path, self._headers, (data,))))
                while True:
                    answer = self._http.receive(self._sock.recv(1 << 16))
                    if answer is not None:
                        break
                self._last = self._http.headers
                if not self._http.reusable():
                    self.close()
                return answer
            except OSError as exc:  # ConnectionError (and BadAnswer), TimeoutError (socket.timeout) and the rest
                answered = self._http is not None and self._http.answered
                again = (not attempt and reused and not answered and isinstance(exc, ConnectionError)
                         and not isinstance(exc, (TimeoutError, BadAnswer)))
                self.close()
                if not again:
                    raise ConnectionError(str(exc) or type(exc).__name__) from exc
        raise AssertionError("unreachable")

    def header(self, name: str) -> Optional[str]:
        """A header of the last answer (None when it had none)."""
        if self._last is None:
            return None
        wanted = name.lower().encode("ascii")
        return next((v.decode("latin-1") for k, v in self._last if k == wanted), None)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._http = None

    def _connect(self) -> None:
        import socket

        sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls:
            import ssl

            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
        self._sock = sock
        self._http = ClientConnection()


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
