"""The dispatch path's decisions that need no server: a unit dropped at its deadline is a timeout."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from reranker_ops.settings import Settings

pytestmark = pytest.mark.timeout(60)


def test_a_unit_dropped_at_its_deadline_is_a_504_not_a_503():
    """CI failed once with a late request answered 503 'the client went away': when the gate's loop is busy
    past a request's deadline, its queued unit is dropped (not sent) before wait_for's own timer fires. The
    client is still there and waited its whole deadline: that is a 504, like any other timeout."""
    import logging

    from reranker_ops.front.dispatch import Dispatch
    from reranker_ops.front.gate import limits_of
    from reranker_ops.front.metrics import Metrics
    from reranker_ops.front.scheduler import FairScheduler, Unit

    class OpenTransport:
        def is_closing(self) -> bool:
            return False

    class Request(dict):  # what the gate reads of an aiohttp request here: its flags and its transport
        transport = OpenTransport()

    async def main() -> tuple[int, dict]:
        settings = Settings(request_timeout_s=0.2)
        gate = Dispatch(settings, Metrics(), logging.getLogger("test"), lambda: None, limits_of(settings))
        deadline_at = time.monotonic() + 0.2
        request = Request()
        sent = []

        async def send(group, _envelope_id):
            sent.append(len(group))
            if len(sent) > 1:
                raise AssertionError("a unit past its deadline was sent")
            await asyncio.sleep(0)
            while time.monotonic() < deadline_at + 0.05:  # the loop is busy (parsing a large body, say)
                pass
            return [(200, b"[]", "m")] * len(group)

        gate.scheduler = FairScheduler(budget=1, send=send)  # one unit out at a time: the second one queues
        units = [Unit(cost=1, lane="chunk", owner=1, payload=None, alive=lambda: gate._alive(request, deadline_at))
                 for _ in range(2)]
        answer = await gate._wait_units(request, units, deadline_at)
        return answer.status, json.loads(answer.text)

    status, body = asyncio.run(main())
    assert status == 504 and "deadline" in body["message"], body


def test_windows_asked_under_cohere_name_cost_what_windows_cost():
    """A small request asking for windows is costed by its windows in the fair scheduler (each window is a
    model call); Cohere v1's ``max_chunks_per_doc`` is the same ask and must cost the same, not one window."""
    import logging

    from reranker_ops.front.dispatch import Dispatch
    from reranker_ops.front.gate import limits_of
    from reranker_ops.front.metrics import Metrics
    from reranker_ops.protocol.api import parse_job
    from reranker_ops.protocol.envelope import PART_HEAD_LEN

    settings = Settings()
    gate = Dispatch(settings, Metrics(), logging.getLogger("test"), lambda: None, limits_of(settings))
    long = "слово " * 2000
    costs = []
    for ask in ({"windows": 4}, {"max_chunks_per_doc": 4}, {}):
        raw = bytearray(b"\0" * PART_HEAD_LEN + json.dumps({"query": "q", "documents": [long], **ask}).encode())
        assert gate._windows_asked(raw) == bool(ask)
        job = parse_job("/v1/rerank", memoryview(raw)[PART_HEAD_LEN:], gate._limits())
        costs.append(gate._job_cost(job, 0, 1))
    assert costs[0] == costs[1] > costs[2]
