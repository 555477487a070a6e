"""Supervision logic without a server: the watchdog policy on a fake monotonic clock, the state machine,
process identity, the run lock, heartbeats, sd_notify, and the supervisor's own bookkeeping."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from reranker_ops.health.watchdog import WatchdogPolicy, WorkerView
from reranker_ops.process.runstate import (
    RunLock,
    identify,
    lock_holder,
    lock_is_held,
    read_pidfile,
    start_ticks,
    write_pidfile,
)
from reranker_ops.process.sdnotify import Notifier
from reranker_ops.process.states import InvalidTransition, State, StateMachine

pytestmark = pytest.mark.timeout(60)


def policy(**kw) -> WatchdogPolicy:
    return WatchdogPolicy(failures_needed=2, hang_after_s=10, restart_budget=3, restart_window_s=100, **kw)


# --- the watchdog looks at every worker on every tick, whatever the canary says ------------------------------
def test_a_stopped_worker_is_killed_even_while_probes_pass():
    # two workers: the healthy one keeps answering the canary; the stopped one must still be found
    p = policy()
    p.record_probe(True, 100)
    kills = p.inspect(100, [WorkerView(1, "score", "stopped"), WorkerView(2, "score", "sleeping")])
    assert [(k.pid, k.dump_stack) for k in kills] == [(1, False)]


def test_a_worker_without_progress_inside_forward_is_hung_and_dumped_first():
    p = policy()
    p.record_probe(True, 100)
    hung = WorkerView(7, "score", "running", busy_since=80, progress_at=85)
    [kill] = p.inspect(100, [hung])
    assert kill.pid == 7 and kill.dump_stack and "no progress" in kill.reason
    progressing = WorkerView(7, "score", "running", busy_since=80, progress_at=95)
    assert p.inspect(100, [progressing]) == []  # busy, not hung
    idle = WorkerView(7, "score", "sleeping", busy_since=None, progress_at=1)
    assert p.inspect(100, [idle]) == []  # idle for long is fine


def test_zombie_and_dead_workers_are_left_to_mosec():
    p = policy()
    assert p.inspect(100, [WorkerView(3, "score", "zombie"), WorkerView(4, "validate", "dead")]) == []


def test_the_canary_rule_restarts_a_wedged_server_but_not_an_overloaded_one():
    p = policy()
    idle = [WorkerView(1, "score", "sleeping", busy_since=None, progress_at=50)]
    p.record_probe(False, 100)
    assert p.wedged(100, idle) is None  # one failure is not enough
    p.record_probe(False, 105)
    assert "2 probes failed" in p.wedged(105, idle)
    progressing = [WorkerView(1, "score", "running", busy_since=101, progress_at=104)]
    assert p.wedged(105, progressing) is None  # overloaded: work goes on
    p.record_probe(True, 110)
    assert p.consecutive_failures == 0 and p.wedged(110, idle) is None


def test_restart_budget_and_backoff():
    p = policy()
    assert p.backoff() == 0.0
    delays = []
    for t in (0, 1, 2):
        assert p.allow_restart(t)
        delays.append(p.backoff())
    assert delays == [0.0, 1.0, 2.0]  # a one-off crash is repaired at once, a crash loop slows down
    assert p.allow_restart(3) is False  # budget spent inside the window
    assert p.allow_restart(101) is True  # the oldest fell out of the window


@pytest.mark.parametrize("step", [+3600.0, -3600.0])
def test_a_wall_clock_step_changes_no_decision(tmp_path, monkeypatch, step):
    """Heartbeats and the policy run on CLOCK_MONOTONIC: stepping the wall clock either way neither makes a
    busy worker look hung (step forward) nor hides a hung one (step back)."""
    from reranker_ops.serving.heartbeat import Heartbeat, read_heartbeat

    p = policy()
    busy = Heartbeat(str(tmp_path), "score")
    busy.write(busy_since=time.monotonic(), progress_at=time.monotonic(), ready=1)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + step)

    def view(hb: Heartbeat) -> WorkerView:
        rec = read_heartbeat(next(tmp_path.glob("score-*.hb")))
        return WorkerView(os.getpid(), "score", "running", True, rec["busy_since"], rec["progress_at"])

    assert p.inspect(time.monotonic(), [view(busy)]) == []  # busy and fresh: never killed
    busy.write(busy_since=time.monotonic() - 60, progress_at=time.monotonic() - 60)  # stuck for a minute
    assert [k.pid for k in p.inspect(time.monotonic(), [view(busy)])] == [os.getpid()]  # always found


# --- the state machine --------------------------------------------------------------------------------------
def test_state_machine_transitions_and_listeners():
    seen = []
    sm = StateMachine(State.STARTING, "loading")
    sm.subscribe(seen.append)
    sm.to(State.RUNNING)
    assert sm.to(State.RUNNING) is None  # no change, no publication
    sm.to(State.DEGRADED, "1 of 2 score workers")
    sm.to(State.DEGRADED, "probe failed")  # a new reason is published
    sm.to(State.RESTARTING, "wedged")
    sm.to(State.DEGRADED, "generation 2 starting")
    sm.to(State.RUNNING)
    sm.to(State.STOPPING, "draining")
    sm.to(State.STOPPED)
    assert [(t.old.value, t.new.value) for t in seen] == [
        ("starting", "running"), ("running", "degraded"), ("degraded", "degraded"), ("degraded", "restarting"),
        ("restarting", "degraded"), ("degraded", "running"), ("running", "stopping"), ("stopping", "stopped")]
    assert sm.terminal
    with pytest.raises(InvalidTransition):
        sm.to(State.RUNNING)  # nothing leaves a terminal state


@pytest.mark.parametrize("old,new", [
    (State.RUNNING, State.STARTING),  # once served, a restart is 'degraded', never 'starting' again
    (State.STOPPING, State.RUNNING),  # a drain is never undone
    (State.FAILED, State.STOPPED),
    (State.STARTING, State.STOPPED),  # a stop always drains first
])
def test_state_machine_refuses_what_makes_no_sense(old, new):
    sm = StateMachine(old)
    with pytest.raises(InvalidTransition):
        sm.to(new, "x")
    assert sm.state == old


# --- process identity, lock, pidfile -------------------------------------------------------------------------
def test_identity_uses_clock_ticks_and_survives_a_clock_step(tmp_path, monkeypatch):
    me = psutil.Process()
    path = tmp_path / "p.json"
    write_pidfile(path, {"pid": me.pid, "start_ticks": start_ticks(me.pid), "pgid": os.getpgid(0), "instance": "i"})
    info, why = read_pidfile(path)
    assert why is None and identify(info.pid, info.start_ticks) is not None
    assert identify(info.pid, info.start_ticks - 1) is None  # same pid, other start: a recycled pid
    # a wall-clock step moves psutil's create_time (it is derived from btime); identity does not care
    real = psutil.Process.create_time
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + 100.0)
    assert identify(info.pid, info.start_ticks) is not None
    for content, reason in (("", "empty"), ("{not json", "garbage"), ('{"pid": 1}', "garbage")):
        path.write_text(content)
        assert read_pidfile(path) == (None, reason)
    assert read_pidfile(tmp_path / "none.json") == (None, "missing")


def test_start_ticks_handles_odd_process_names(tmp_path):
    exe = tmp_path / "a b) (c"
    exe.symlink_to(sys.executable)
    proc = subprocess.Popen([str(exe), "-c", "import time; time.sleep(30)"])
    try:
        ticks = start_ticks(proc.pid)
        assert ticks is not None and ticks >= start_ticks(os.getpid())
    finally:
        proc.kill()
        proc.wait()


def test_lock_is_exclusive_freed_on_death_and_looking_never_takes_it(tmp_path, monkeypatch):
    import fcntl

    path = tmp_path / "x.lock"
    code = ("import fcntl,os,sys,time; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT); fcntl.flock(fd,fcntl.LOCK_EX);"
            " print('ok',flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert lock_holder(path) == holder.pid
        assert RunLock(path).acquire() is False
    finally:
        holder.kill()
        holder.wait()
    # looking must not take the lock, even for an instant (a 'serve' starting then would fail)
    def no_flock(*a, **k):
        raise AssertionError("lock_is_held took the lock")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert not lock_is_held(path)  # the kernel freed it: it can never go stale
    monkeypatch.undo()
    lock = RunLock(path)
    assert lock.acquire()
    assert lock_holder(path) == os.getpid()
    lock.release()
    assert lock_holder(tmp_path / "never-created.lock") is None


# --- heartbeats --------------------------------------------------------------------------------------------
def test_heartbeat_record_roundtrip_and_torn_reads(tmp_path, monkeypatch):
    import struct

    from reranker_ops.serving import heartbeat as hbmod
    from reranker_ops.serving.heartbeat import Heartbeat, forget_worker, read_heartbeat, read_worker_dir

    hb = Heartbeat(str(tmp_path), "score")
    hb.publish_info(heavy_modules=[])
    hb.write(busy_since=123.5, progress_at=124.0, pairs=7, tokens=70, ready=1)
    path = next(tmp_path.glob("score-*.hb"))
    got = read_heartbeat(path)
    assert got["busy_since"] == 123.5 and got["pairs"] == 7 and got["tokens"] == 70 and got["ready"] == 1
    hb.write(busy_since=None)
    assert read_heartbeat(path)["busy_since"] is None
    [(pid, rec)] = read_worker_dir(tmp_path).items()
    assert pid == os.getpid() and rec["stage"] == "score" and rec["heavy_modules"] == []
    # a write caught half-way (odd sequence number) is never taken for a consistent record
    struct.pack_into("<Q", hb._mm, 0, 41)
    hb._mm.flush()
    assert read_heartbeat(path) is None
    hb.write(pairs=8)
    # a write that starts and ends between the reader's two looks (the sequence moved): torn, rejected
    real_pread = os.pread
    calls = {"n": 0}

    def racing_pread(fd, n, off):
        calls["n"] += 1
        data = real_pread(fd, n, off)
        if n == 8:  # the re-read of the sequence: a writer finished a whole update meanwhile
            hb.write(pairs=hb.data["pairs"] + 1)
            return real_pread(fd, n, off)
        return data

    monkeypatch.setattr(hbmod.os, "pread", racing_pread)
    assert read_heartbeat(path, attempts=3) is None
    monkeypatch.undo()
    assert read_heartbeat(path)["pairs"] == hb.data["pairs"]
    forget_worker(tmp_path, os.getpid())
    assert read_worker_dir(tmp_path) == {}


# --- sd_notify -------------------------------------------------------------------------------------------
def test_sd_notify_datagrams_and_bounded_memory(tmp_path):
    addr = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(addr))
    sock.settimeout(2)
    try:
        n = Notifier(str(addr))
        assert n.ready("serving") and sock.recv(100) == b"READY=1\nSTATUS=serving"
        assert n.watchdog() and sock.recv(100) == b"WATCHDOG=1"
        assert n.stopping() and sock.recv(100).startswith(b"STOPPING=1")
        for _ in range(500):
            n.watchdog()
            sock.recv(100)
        assert len(n.sent) <= 32  # a year of pings keeps no more than the last few
    finally:
        sock.close()
    assert Notifier(None).ready("x") is False  # silent outside systemd
    assert Notifier(str(tmp_path / "gone.sock")).watchdog() is False  # never raises


# --- the supervisor's loop does not leak ------------------------------------------------------------------
def test_waiting_on_the_child_keeps_one_waiter(tmp_path):
    """Each tick used to wait on child.wait() and cancel it; asyncio keeps every such waiter until the
    child exits (~4 MB a day). A generation has one waiter for its whole life."""
    import logging
    from collections import deque

    from reranker_ops.config import Settings
    from reranker_ops.process.child import Generation
    from reranker_ops.process.supervisor import Supervisor

    async def main() -> int:
        sup = Supervisor(Settings(run_dir=tmp_path / "run"), tmp_path, "m", Notifier(None))
        sup._wake = asyncio.Event()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)",
                                                    stdout=asyncio.subprocess.PIPE)
        gen = Generation(1, proc, 0, 60, logging.getLogger("t"), deque(maxlen=10))
        sup.gen = gen
        for _ in range(300):
            await sup._sleep(0.0005)
        waiters = len(proc._transport._exit_waiters)  # asyncio's own list for this process
        proc.kill()
        await gen.exited.wait()
        return waiters

    assert asyncio.run(main()) <= 1


def test_metrics_survive_a_mosec_that_does_not_answer(tmp_path):
    """/metrics asks MOSEC for its own metrics with a 1 s deadline; a silent MOSEC costs that, not a 500."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from reranker_ops.config import Settings
    from reranker_ops.process.supervisor import Supervisor

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers

    async def main() -> tuple[int, float, str]:
        sup = Supervisor(Settings(run_dir=tmp_path / "run"), tmp_path, "m", Notifier(None))
        sup._open_front()
        await sup.gate.start()
        sup.mosec_metrics_url = lambda: f"http://127.0.0.1:{silent.getsockname()[1]}/metrics"  # type: ignore
        app = web.Application()
        app.router.add_get("/metrics", sup.health.handle_metrics)
        async with TestClient(TestServer(app)) as client:
            t0 = time.monotonic()
            r = await client.get("/metrics")
            text = await r.text()
        await sup.gate.close()
        return r.status, time.monotonic() - t0, text

    try:
        status, took, text = asyncio.run(main())
    finally:
        silent.close()
    assert status == 200 and took < 3 and "reranker_up 0" in text and 'reranker_state{state="starting"} 1' in text


def test_stop_never_removes_the_pidfile_of_a_server_that_started_meanwhile(tmp_path, monkeypatch):
    """stop's stale-pidfile path used to read the pidfile, kill leftovers, then unlink: a server starting in
    that window lost its pidfile. Now stop holds the lock while it cleans, so a starting server either
    waits its turn or keeps its pidfile."""
    from reranker_ops.config import Settings
    from reranker_ops.process import control

    settings = Settings(run_dir=tmp_path / "run")
    settings.run_dir.mkdir()
    write_pidfile(settings.pidfile_path, {"pid": 999999, "start_ticks": 1, "pgid": 999999, "instance": "dead"})
    code = ("import fcntl,json,os,sys; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT)\n"
            "try:\n fcntl.flock(fd,fcntl.LOCK_EX|fcntl.LOCK_NB)\nexcept BlockingIOError:\n print('busy'); sys.exit(0)\n"
            "json.dump({'pid':os.getpid(),'start_ticks':1,'pgid':1,'instance':'new'},open(sys.argv[2],'w'))\n"
            "print('started', flush=True); sys.stdin.read()")
    started: dict = {}

    def a_server_starts_now(instance: str, *a, **k):
        p = subprocess.Popen([sys.executable, "-c", code, str(settings.lock_path), str(settings.pidfile_path)],
                             stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        started["proc"], started["said"] = p, p.stdout.readline().strip()
        return []

    monkeypatch.setattr(control, "kill_instance", a_server_starts_now)
    try:
        control.stop_server(settings)
        if started["said"] == "started":  # it got the lock: its pidfile must still be there
            assert read_pidfile(settings.pidfile_path)[0].instance == "new"
        else:
            assert started["said"] == "busy"  # it could not start while stop cleaned up
    finally:
        started["proc"].kill()
        started["proc"].wait()


def test_process_tree_walks_every_threads_children_like_psutil_but_only_this_tree():
    """roles.tree reads the kernel's per-thread children lists: a child started from a second thread and a
    grandchild are found, exactly the set psutil finds by scanning every process on the machine."""
    from conftest import wait_until
    from reranker_ops.process import roles

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


def test_a_unit_dropped_at_its_deadline_is_a_504_not_a_503():
    """CI failed once with a late request answered 503 'the client went away': when the gate's loop is busy
    past a request's deadline, its queued unit is dropped (not sent) before wait_for's own timer fires. The
    client is still there and waited its whole deadline: that is a 504, like any other timeout."""
    import json
    import logging

    from reranker_ops.config import Settings
    from reranker_ops.metrics import Metrics
    from reranker_ops.serving.gate import Gate
    from reranker_ops.serving.scheduler import FairScheduler, Unit

    class OpenTransport:
        def is_closing(self) -> bool:
            return False

    class Request(dict):  # what the gate reads of an aiohttp request here: its flags and its transport
        transport = OpenTransport()

    async def main() -> tuple[int, dict]:
        gate = Gate(Settings(request_timeout_s=0.2), Metrics(), logging.getLogger("test"), upstream=lambda: None,
                    probe_token="t", index=dict)
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
