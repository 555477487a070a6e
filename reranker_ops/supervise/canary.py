"""The canary: a real rerank request through the whole pipeline, judged on its answer, not its status.

``Canary`` runs it every probe interval as its own task (a slow probe never stops the watchdog), and reads each
result: the first success makes the server ready; a wrong answer while booting is fatal after a few; failures
feed the "whole server wedged" rule and open an outage that the next success closes. ``boot_and_probe`` checks
a reload's new generation the same way, straight on its port, before the gate switches to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Optional

PROBE_HEADER = "X-Reranker-Probe"  # with the supervisor's token, the gate's reserved canary slot
# Two documents, so the answer must score and rank each; short, because it runs at every start (healthy only
# after it is answered) and every probe interval under load, on the cores the model uses (a few tokens each:
# benchmarks/HISTORY.md has what a longer one cost).
CANARY = {
    "query": "борщ",
    "documents": ["Борщ — суп.", "Дождь."],
}


@dataclass
class ProbeResult:
    ok: bool
    at: float  # wall clock, for people
    latency_s: Optional[float]
    status: Optional[int]
    error: Optional[str]
    mono: float = 0.0  # monotonic, for every comparison

    @property
    def busy(self) -> bool:
        """Failed, but the way a live server that is overloaded, booting or slow fails (not a wrong answer)."""
        return not self.ok and (self.status is None or self.status in (408, 429, 503, 504))

    def to_dict(self) -> dict:
        return asdict(self)


def judge(status: int, body: Any) -> Optional[str]:
    """None if the answer is a correct rerank answer for the canary, else what is wrong with it."""
    if status != 200:
        text = body if isinstance(body, str) else str(body)
        return f"HTTP {status}: {text[:200]}"
    if not isinstance(body, dict):
        return "answer is not a JSON object"
    scores = body.get("scores")
    if not isinstance(scores, list) or len(scores) != len(CANARY["documents"]):
        return "answer has no score per document"
    for s in scores:
        if not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
            return f"score {s!r} is not a probability"
    results = body.get("results")
    if not isinstance(results, list) or sorted(r.get("index") for r in results) != [0, 1]:
        return "answer's results do not rank every document"
    return None


def probe_sync(client: Any, base_url: str, timeout: float, api_key: Optional[str] = None) -> ProbeResult:
    """For ``rerankctl watchdog``: one canary with the caller's ``httpx.Client``, kept for every probe (a new
    client per call builds a TLS context, tens of ms of CPU)."""
    import httpx

    headers = {PROBE_HEADER: "1"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.monotonic()
    at = time.time()
    try:
        resp = client.post(f"{base_url.rstrip('/')}/rerank", json=CANARY, headers=headers, timeout=timeout)
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        error = judge(resp.status_code, body)
        return ProbeResult(error is None, at, time.monotonic() - t0, resp.status_code, error, t0)
    except httpx.TimeoutException:
        return ProbeResult(False, at, time.monotonic() - t0, None, f"no answer within {timeout:g}s", t0)
    except httpx.HTTPError as exc:
        return ProbeResult(False, at, time.monotonic() - t0, None, f"{type(exc).__name__}: {exc}", t0)


STARTUP_PROBE_INTERVAL = 0.05  # until the first answer: a start is healthy the moment it can be


class Outages:
    """Periods when the server could not serve: opened by what stopped it (a failed probe, a generation
    replaced, no worker left), closed by the next successful probe. The last 20 are kept for ``status``."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.recent: deque[dict] = deque(maxlen=20)
        self.current: Optional[dict] = None

    def open(self, cause: str) -> None:
        if self.current is None:
            self.current = {"start": time.time(), "mono": time.monotonic(), "end": None, "seconds": None,
                            "cause": cause}
            self.recent.append(self.current)

    def close(self) -> None:
        o = self.current
        if o is None:
            return
        o["end"] = time.time()
        o["seconds"] = round(time.monotonic() - o.pop("mono"), 2)
        self.log.warning("service restored after %.1fs (%s)", o["seconds"], o["cause"])
        self.current = None

    def to_list(self) -> list[dict]:
        return [{k: v for k, v in o.items() if k != "mono"} for o in self.recent]


class Canary:
    """The supervisor's probes: when to send one, what its result means."""

    def __init__(self, settings, policy, metrics, log: logging.Logger, outages: Outages,
                 session: Callable[[], Any], probe_token: str, on_success: Callable[[], None],
                 model: Optional[Callable[[], str]] = None) -> None:
        self.settings = settings
        self.model = model  # the name of the model it probes (the gate routes by it in a server of several)
        self.policy = policy  # WatchdogPolicy: failures feed its "wedged" rule
        self.metrics = metrics
        self.log = log
        self.outages = outages
        self.session = session  # the front's aiohttp session (the supervisor's own calls)
        self.probe_token = probe_token
        self.on_success = on_success  # the systemd watchdog ping: only ever after a successful probe
        self.last: Optional[ProbeResult] = None
        self.ever_ready = False
        self.wrong_answers = 0
        self._task: Optional[asyncio.Task] = None
        self._next = 0.0

    def maybe_start(self, now: float, wake: Callable[[], None]) -> None:
        if self._task is not None or now < self._next:
            return
        self._task = asyncio.ensure_future(self.probe())
        self._task.add_done_callback(lambda _t: wake())

    def collect(self, gen) -> Optional[str]:
        """Read a finished probe's result, if one finished. Returns a fatal reason when the server answers the
        canary wrongly while it boots (a broken model or pipeline, not a slow boot)."""
        task = self._task
        if task is None or not task.done():
            return None
        self._task = None
        if task.cancelled():
            # cancelled by ``cancel`` (a reload retiring this model, a stop): no answer, so no verdict. Its
            # result() would raise CancelledError into the supervisor's tick, and out of the supervisor.
            return None
        fatal = self.judge_result(task.result(), gen)
        fast = not self.ever_ready or (gen is not None and gen.ready_at is None)
        self._next = time.monotonic() + (STARTUP_PROBE_INTERVAL if fast else self.settings.probe_interval_s)
        return fatal

    def judge_result(self, result: "ProbeResult", gen) -> Optional[str]:
        from .generation import GenState

        self.last = result
        now = time.monotonic()
        if result.ok:
            self.policy.record_probe(True, now)
            self.wrong_answers = 0
            if gen is not None and gen.transition(GenState.READY, "answered the canary"):
                self.log.info("MOSEC generation %d answered its first probe after %.2fs", gen.number,
                              now - gen.started)
            if not self.ever_ready:
                self.ever_ready = True
                self.log.info("ready: first probe answered in %.3fs", result.latency_s or 0)
            self.outages.close()
            self.on_success()
            return None
        if not result.busy:
            # It answers, but wrongly: a broken model or pipeline, not a slow boot or an overload.
            self.wrong_answers += 1
            if gen is not None and gen.ready_at is None and self.wrong_answers >= self.settings.probe_failures:
                return f"the server answers but fails the canary request: {result.error}; {gen.last_error()}"
        if gen is None or not gen.booted:
            return None  # booting: no verdict yet (the generation's deadline decides)
        self.policy.record_probe(False, now)
        if self.ever_ready:
            self.log.warning("probe failed: %s", result.error)
            self.outages.open(result.error or "probe failed")
        return None

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def reset(self) -> None:
        """A new generation: nothing the old one answered says anything of it."""
        self.wrong_answers = 0
        self.policy.reset()

    async def probe(self) -> "ProbeResult":
        """One canary through the front door, like any client's request (with the canary's reserved slot)."""
        import aiohttp

        from ..addresses import base_url

        s = self.settings
        url = f"{base_url(s.host, s.port)}/rerank"
        headers = {PROBE_HEADER: self.probe_token}
        if s.api_key:
            headers["Authorization"] = f"Bearer {s.api_key.get_secret_value()}"
        t0 = time.monotonic()
        at = time.time()
        try:
            request = CANARY if self.model is None else {**CANARY, "model": self.model()}
            async with self.session().post(url, json=request, headers=headers,
                                           timeout=aiohttp.ClientTimeout(total=s.probe_timeout_s)) as resp:
                raw = await resp.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                error = judge(resp.status, body)
                result = ProbeResult(error is None, at, time.monotonic() - t0, resp.status, error, t0)
        except asyncio.TimeoutError:
            result = ProbeResult(False, at, time.monotonic() - t0, None, f"no answer within {s.probe_timeout_s:g}s", t0)
        except aiohttp.ClientError as exc:
            result = ProbeResult(False, at, time.monotonic() - t0, None, f"{type(exc).__name__}: {exc}", t0)
        self.metrics.observe_probe(result.ok, result.latency_s)
        return result

    async def boot_and_probe(self, gen, observe: Callable[[Any], Awaitable[tuple]], all_ready: Callable[[list], bool],
                             init_failure: Callable[[int, dict], Optional[str]],
                             stopping: Callable[[], bool]) -> tuple[bool, str]:
        """Wait until every worker of ``gen`` is ready and it answers the canary correctly, straight on its port
        (a reload's new generation, before the gate switches to it). (True, "") or (False, why not)."""
        import aiohttp

        from ..protocol.api import ROUTE_TAGS
        from ..protocol.envelope import open_answer, part_head, read_answers, seal
        from .generation import GenState

        request = CANARY if self.model is None else {**CANARY, "model": gen.model_name}  # the new one's name
        canary = json.dumps(request, ensure_ascii=False).encode("utf-8")
        part = part_head(ROUTE_TAGS["/rerank"], len(canary)) + canary
        envelope_id = secrets.randbits(63) or 1
        body = seal(gen.secret, envelope_id, [part]) + part  # an envelope of one
        url = f"http://127.0.0.1:{gen.port}/score"
        last = "no answer yet"
        while time.monotonic() < gen.deadline:
            if stopping():
                return False, "the server is stopping"
            # before gone(): when every worker failed to load, MOSEC exits too, and the reason is the workers'
            beats, views = await observe(gen)
            failure = init_failure(gen.number, beats)
            if failure:
                return False, failure
            if gen.gone():
                await gen.drain_output()
                return False, f"MOSEC exited ({gen.exit_code}): {gen.last_error()}"
            if all_ready(views):
                gen.mark_booted()
                try:
                    async with self.session().post(
                        url, data=body, timeout=aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)
                    ) as resp:
                        status, raw = resp.status, await resp.read()
                        try:
                            if status == 200:
                                [(status, raw, _timing)] = read_answers(open_answer(gen.secret, envelope_id, raw), 1)
                            answer: object = json.loads(raw)
                        except ValueError:  # an EnvelopeError (Untrusted too) is one
                            answer = raw.decode("utf-8", "replace")
                        error = judge(status, answer)
                    if error is None:
                        gen.transition(GenState.READY, "answered the canary")
                        return True, ""
                    last = error
                    if status not in (408, 429, 503, 504):
                        return False, f"wrong answer to the canary: {error}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
        return False, f"not ready within {self.settings.startup_timeout_s:g}s ({last})"
