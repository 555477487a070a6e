"""The supervisor's own bookkeeping, without a model: one waiter per generation, /metrics with a MOSEC that
does not answer, the process tree it watches."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import psutil
import pytest

from reranker_ops.settings import Settings
from reranker_ops.supervise.sdnotify import Notifier

pytestmark = pytest.mark.timeout(60)


def test_waiting_on_the_child_keeps_one_waiter(tmp_path):
    """Each tick used to wait on child.wait() and cancel it; asyncio keeps every such waiter until the
    child exits (~4 MB a day). A generation has one waiter for its whole life."""
    import logging
    from collections import deque

    from reranker_ops.supervise.generation import Generation, generation_config
    from reranker_ops.supervise.supervisor import Supervisor

    async def main() -> int:
        settings = Settings(run_dir=tmp_path / "run")
        sup = Supervisor(settings, tmp_path, "m", Notifier(None))
        sup._wake = asyncio.Event()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)",
                                                    stdout=asyncio.subprocess.PIPE)
        config = generation_config(settings, 1, tmp_path / "g1", tmp_path, "m", False, port=0, secret=b"0" * 32)
        gen = Generation(1, proc, config, tmp_path, 60, logging.getLogger("t"), deque(maxlen=10))
        sup.gen = gen
        for _ in range(300):
            await sup.sleep(0.0005)
        waiters = len(proc._transport._exit_waiters)  # asyncio's own list for this process
        proc.kill()
        await gen.exited.wait()
        return waiters

    assert asyncio.run(main()) <= 1


def test_metrics_survive_a_mosec_that_does_not_answer(tmp_path):
    """/metrics asks MOSEC for its own metrics with a 1 s deadline; a silent MOSEC costs that, not a 500."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from reranker_ops.supervise.supervisor import Supervisor

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers

    async def main() -> tuple[int, float, str]:
        import aiohttp

        from reranker_ops.front.front import Front

        from reranker_ops.supervise.view import SupervisorView

        sup = Supervisor(Settings(run_dir=tmp_path / "run"), tmp_path, "m", Notifier(None))
        view = SupervisorView(sup)
        view.mosec_metrics_url = lambda: f"http://127.0.0.1:{silent.getsockname()[1]}/metrics"  # type: ignore
        sup.front = Front(sup.settings, sup.metrics, sup.log, sup.probe_token, view)
        sup.front.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/metrics", sup.front.health.handle_metrics)
        async with TestClient(TestServer(app)) as client:
            t0 = time.monotonic()
            r = await client.get("/metrics")
            text = await r.text()
        await sup.front.session.close()
        return r.status, time.monotonic() - t0, text

    try:
        status, took, text = asyncio.run(main())
    finally:
        silent.close()
    assert status == 200 and took < 3 and "reranker_up 0" in text and 'reranker_state{state="starting"} 1' in text


def test_process_tree_walks_every_threads_children_like_psutil_but_only_this_tree():
    """roles.tree reads the kernel's per-thread children lists: a child started from a second thread and a
    grandchild are found, exactly the set psutil finds by scanning every process on the machine."""
    from conftest import wait_until

    from reranker_ops.supervise import roles

    code = ("import subprocess, threading, time\n"
            "subprocess.Popen(['sh', '-c', 'sleep 60 & wait'])\n"  # a child with a child of its own
            "t = threading.Thread(target=lambda: subprocess.Popen(['sleep', '60']).wait())\n"
            "t.start(); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        proc = psutil.Process(parent.pid)
        wait_until(lambda: len(proc.children(recursive=True)) >= 3, 20, 0.05, what="the tree being started")
        expected = {parent.pid} | {p.pid for p in proc.children(recursive=True)}
        assert roles._descendants(parent.pid) is not None, "this kernel has /proc/<pid>/task/<tid>/children"
        assert {p.pid for p in roles.tree(parent.pid)} == expected and len(expected) == 4
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait(10)
    assert roles.tree(parent.pid) == []


def test_a_model_retired_while_the_tick_awaits_is_not_ticked(tmp_path):
    """A reload that removes a model switches the list and retires the model while the supervisor's tick is
    awaiting an earlier model's work. The retired model's tick ran anyway, from the list the loop had taken:
    it read its canary's probe, cancelled by the retirement, and the CancelledError ended the supervisor (a
    clean-clone run of test_several_models.py: every client of the kept model cut off). The tick now skips a
    model that is no longer in the list (the supervisor and its loop are real; the models are stand-ins)."""
    from types import SimpleNamespace

    from reranker_ops.supervise.supervisor import Supervisor

    ticked: list[str] = []

    async def main() -> None:
        sup = Supervisor(Settings(run_dir=tmp_path / "run"), tmp_path, "m", Notifier(None))
        sup._wake = asyncio.Event()

        class Model:
            def __init__(self, name: str) -> None:
                self.model_name, self.down = name, None
                self.reloader = SimpleNamespace(running=False)
                self.canary = SimpleNamespace(ever_ready=True)

            def verdict(self) -> tuple[bool, str]:
                return True, "ok"

            async def tick(self, now: float) -> None:
                ticked.append(self.model_name)
                if self.model_name == "kept":
                    sup.slots = [self]  # the reload's switch, while this tick awaits
                    await asyncio.sleep(0)

        sup.slots = [Model("kept"), Model("removed")]
        sup.rundir.lock_is_here = lambda: True
        sup.status = SimpleNamespace(derive=lambda v: None, serving_ready=lambda v: None,
                                     publish_due=lambda now: None)
        assert await sup.tick() is False
        assert await sup.tick() is False  # the next tick sees the new list only

    asyncio.run(main())
    assert ticked == ["kept", "kept"]


def test_a_cancelled_canary_gives_no_verdict_and_raises_nothing():
    """``Canary.cancel`` (a model retired by a reload, a stop) leaves a cancelled probe task; reading it
    raised CancelledError into the tick. It is now dropped without a verdict, and the next probe can start."""
    import logging

    from reranker_ops.supervise.canary import Canary

    async def main() -> tuple:
        canary = Canary(Settings(), None, None, logging.getLogger("t"), None, lambda: None, "t", lambda: None)
        canary._task = asyncio.ensure_future(asyncio.sleep(30))
        canary.cancel()
        with pytest.raises(asyncio.CancelledError):
            await canary._task
        verdict = canary.collect(None)
        return verdict, canary._task, canary.last

    assert asyncio.run(main()) == (None, None, None)


def test_a_model_retired_while_its_watch_looks_is_not_restarted(tmp_path):
    """A reload can retire a model while that model's own tick awaits its watch (a worker kill that did not
    take, say). The watch's verdict then belongs to a generation the reload is stopping: restarting it would
    start a MOSEC for a model nobody serves any more. The slot's tick is real; what it looks at (the
    generation, the canary, the watch, the supervisor's list) are stand-ins, and the restart is recorded
    instead of done."""
    from types import SimpleNamespace

    from reranker_ops.supervise.slot import ModelSlot

    restarts: list[str] = []
    probes: list[float] = []

    async def main() -> None:
        slot = ModelSlot.__new__(ModelSlot)
        sup = SimpleNamespace(slots=[slot], wake=lambda: None)

        async def watch_tick(gen, now):
            sup.slots = []  # the reload's switch, while the watch awaits
            await asyncio.sleep(0)
            return "worker 1 did not exit after SIGKILL"

        async def fail_generation(cause, *, ever_ready, ours=False):
            restarts.append(cause)

        slot.sup, slot.down, slot.restarting = sup, None, None
        slot.gen = SimpleNamespace(gone=lambda: False, booted=True)
        slot.canary = SimpleNamespace(collect=lambda gen: None, ever_ready=True,
                                      maybe_start=lambda now, wake: probes.append(now))
        slot.watch = SimpleNamespace(tick=watch_tick)
        slot.log = SimpleNamespace(warning=lambda *a: None)
        slot.fail_generation = fail_generation
        await slot.tick(1.0)
        # the same slot, still in the list: the same verdict restarts it (the stand-ins can tell)
        sup.slots = [slot]
        slot.watch = SimpleNamespace(tick=lambda gen, now: asyncio.sleep(0, "worker 1 did not exit after SIGKILL"))
        await slot.tick(2.0)

    asyncio.run(main())
    assert restarts == ["worker 1 did not exit after SIGKILL"]
    assert probes == []
