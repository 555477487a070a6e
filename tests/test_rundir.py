"""The run dir: process identity that survives clock steps and recycled pids, the run lock, the pidfile,
and a stop that never removes the pidfile of a server that started meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from reranker_ops.settings import Settings
from reranker_ops.supervise.procs import start_ticks
from reranker_ops.supervise.rundir import (
    RunDir,
    RunLock,
    identify,
    lock_holder,
    lock_is_held,
    read_pidfile,
    write_pidfile,
)

pytestmark = pytest.mark.timeout(60)


def test_identity_uses_clock_ticks_and_survives_a_clock_step(tmp_path, monkeypatch):
    me = psutil.Process()
    path = tmp_path / "p.json"
    write_pidfile(path, {"pid": me.pid, "start_ticks": start_ticks(me.pid), "pgid": os.getpgid(0), "instance": "i"})
    info, why = read_pidfile(path)
    assert why is None and identify(info.pid, info.start_ticks) is not None
    assert identify(info.pid, info.start_ticks - 1) is None  # same pid, other start: a recycled pid
    # a wall-clock step moves psutil's create_time (it is derived from btime): identity never reads it
    def create_time(self):
        raise AssertionError("identity read create_time, which a clock step moves")

    monkeypatch.setattr(psutil.Process, "create_time", create_time)
    assert identify(info.pid, info.start_ticks) is not None
    assert identify(info.pid, info.start_ticks - 1) is None
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


def test_stop_never_removes_the_pidfile_of_a_server_that_started_meanwhile(tmp_path, monkeypatch):
    """stop's stale-pidfile path used to read the pidfile, kill leftovers, then unlink: a server starting in
    that window lost its pidfile. Now stop holds the lock while it cleans, so a starting server either
    waits its turn or keeps its pidfile."""
    from reranker_ops import control

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


def test_state_json_is_whole_for_readers_and_never_flushed_to_the_disk(tmp_path, monkeypatch):
    """state.json is rewritten every second for as long as the server runs: an fsync each time blocked the
    supervisor's loop and wrote to the disk every second, for a file nothing needs after a power cut."""
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    settings = Settings(run_dir=tmp_path / "run", models_dir=tmp_path / "models")
    rd = RunDir(settings, "i")
    for n in range(3):
        rd.publish({"state": "ready", "n": n}, log=None)
    assert synced == []
    assert json.loads(settings.state_path.read_text(encoding="utf-8")) == {"state": "ready", "n": 2}
    assert [p.name for p in settings.state_path.parent.iterdir() if p.name.startswith(".state")] == []  # no temp left
    rd.lost = True  # a run dir that is not ours any more: nothing is written there
    rd.publish({"state": "gone"}, log=None)
    assert json.loads(settings.state_path.read_text(encoding="utf-8"))["n"] == 2
