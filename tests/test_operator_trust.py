"""Operator-side trust (issue 33): what root and an operator's tools do in a run dir the service user controls,
what ``restart`` brings back, and what the API port shows without the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import DOCS, QUERY, clean_env, run_cli, wait_until

from reranker_ops.settings import Settings

SERVICE_UID = 4242  # stands for a systemd DynamicUser


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: the case is root acting in a run dir another user owns")


def service_run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, SERVICE_UID, SERVICE_UID)
    return run


def test_a_symlink_swapped_in_for_a_request_file_leaves_its_target_alone(tmp_path, monkeypatch):
    """Root writes a stop or reload request into the unit's run dir (owned by the service user). A compromised
    service user swaps the file for a symlink right after it appears: root must not chown (or write) what
    the symlink points to. The swap is made at the worst moment: right after the rename that names the file."""
    needs_root()
    from reranker_ops import control

    run = service_run_dir(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    os.chown(victim, 0, 0)
    real_replace = os.replace

    def replace_then_swap(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        name = Path(dst).name if not isinstance(dst, int) else dst
        target = run / name
        if target.exists() and not target.is_symlink():
            target.unlink()
            target.symlink_to(victim)  # the service user's move

    monkeypatch.setattr(os, "replace", replace_then_swap)
    settings = Settings(run_dir=run)
    for name in ("stop-request.json", "reload-request.json"):
        control._write_request(settings, name, {"pid": 1, "drain_s": 5})
        st = victim.stat()
        assert (st.st_uid, st.st_gid) == (0, 0) and victim.read_text() == "root's file"


def test_a_request_file_belongs_to_the_run_dirs_owner_and_no_link_is_followed(tmp_path):
    needs_root()
    from reranker_ops import control

    run = service_run_dir(tmp_path)
    settings = Settings(run_dir=run)
    control._write_request(settings, "stop-request.json", {"pid": 1, "drain_s": 5})
    st = (run / "stop-request.json").stat()
    assert (st.st_uid, st.st_gid) == (SERVICE_UID, SERVICE_UID) and st.st_mode & 0o777 == 0o600
    # a run dir that is itself a symlink is not written through
    link = tmp_path / "link-run"
    link.symlink_to(run)
    with pytest.raises(OSError):
        control._write_request(Settings(run_dir=link), "stop-request.json", {"pid": 1})


def _hold_lock(lock: Path) -> subprocess.Popen:
    """Another process that holds the run lock (as a server would), until killed."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_pidfile_naming_a_process_that_does_not_hold_the_lock_is_refused(tmp_path):
    """A server holds the lock; the pidfile names some other live process (with its true start time, so the
    pid-reuse check passes). stop and reload must refuse, in one line, and signal nobody."""
    from reranker_ops.supervise.procs import start_ticks

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    holder = _hold_lock(run / "rerankctl.lock")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        wait_until(lambda: start_ticks(bystander.pid) is not None, 10, what="the bystander started")
        (run / "rerankctl.pid.json").write_text(json.dumps({
            "pid": bystander.pid, "start_ticks": start_ticks(bystander.pid), "pgid": bystander.pid,
            "instance": "0" * 32, "port": 1, "health_port": 2}))
        env = clean_env(RERANKER_RUN_DIR=str(run))
        for command in (["stop", "--timeout", "2"], ["reload"]):
            res = run_cli(command, env=env, timeout=60)
            assert res.returncode != 0, res
            lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
            assert "does not hold the run lock" in res.stderr and f"pid {holder.pid}" in res.stderr, res.stderr
            assert len(lines) <= 2 and "Traceback" not in res.stderr, lines
            assert bystander.poll() is None  # not signalled
    finally:
        bystander.kill()
        holder.kill()


def test_root_reads_no_env_file_it_does_not_own_or_others_can_write(tmp_path, monkeypatch):
    needs_root()
    from reranker_ops import settings as config

    monkeypatch.chdir(tmp_path)
    env_file = tmp_path / ".env"
    env_file.write_text("RERANKER_PORT=1234\n")
    for owner, mode, read in ((0, 0o600, True), (0, 0o644, True), (0, 0o666, False), (0, 0o620, False),
                              (SERVICE_UID, 0o600, False)):
        os.chown(env_file, owner, 0)
        env_file.chmod(mode)
        settings = Settings()
        assert (settings.port == 1234) == read, (owner, oct(mode))
        if not read:
            assert config.ENV_FILE_IGNORED and ".env" in config.ENV_FILE_IGNORED


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_restart_without_the_key_starts_nothing_and_with_it_the_key_is_asked(make_server):
    server = make_server(api_key="a-real-key-0123456789")
    pid = server.pidfile()["pid"]
    assert server.pidfile().get("api_key_required") is True
    assert "a-real-key" not in json.dumps(server.pidfile())  # the fact, never the key
    env = {k: v for k, v in server.env.items() if k != "RERANKER_API_KEY"}
    res = run_cli(["restart"], env=env, timeout=120)
    assert res.returncode != 0 and "API key" in res.stderr and "RERANKER_API_KEY" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert server.pidfile()["pid"] == pid and server.status()["healthy"]  # the old one still serves, untouched
    res = run_cli(["restart"], env=server.env, timeout=180)
    assert res.returncode == 0, res.stderr
    assert server.pidfile()["pid"] != pid
    body = {"query": QUERY, "documents": DOCS}
    assert httpx.post(server.base + "/rerank", json=body, timeout=30).status_code == 401
    ok = httpx.post(server.base + "/rerank", json=body, timeout=30,
                    headers={"Authorization": "Bearer a-real-key-0123456789"})
    assert ok.status_code == 200


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_with_a_key_the_api_ports_ops_routes_ask_for_it_and_say_no_detail(make_server):
    server = make_server(api_key="a-real-key-0123456789")
    auth = {"Authorization": "Bearer a-real-key-0123456789"}
    with httpx.Client(timeout=10) as c:
        for path in ("/metrics", "/health", "/ready", "/live"):
            assert c.get(server.base + path).status_code == 401, path
            assert c.get(server.base + path, headers=auth).status_code in (200, 503), path
            assert c.get(server.health + path).status_code in (200, 503), path  # the health port: for probes
        on_api = c.get(server.base + "/health", headers=auth).json()
        on_health = c.get(server.health + "/health").json()
    assert set(on_api) <= {"status", "state", "model"}, on_api  # state, not paths or MOSEC's lines
    assert "reason" in on_health and "capacity" in on_health


def test_placeholder_keys_are_refused():
    from reranker_ops.settings import SettingsError

    for key in ("change-me", "CHANGEME", "secret", "password"):
        with pytest.raises(SettingsError, match="placeholder"):
            Settings(api_key=key)
    with pytest.raises(SettingsError, match="set but empty"):  # api-key.env.example copied as it is
        Settings(api_key="  ")
    assert Settings(api_key="a-real-key-0123456789").api_key


# --- the smaller ones ------------------------------------------------------------------------------------------
def test_pruning_one_variant_never_touches_anothers_builds(tmp_path):
    """openvino-int8's old builds are pruned; openvino-int8-weights' (whose names start the same) are not: a
    glob of "openvino-int8-*" took them for its own and deleted the other variant's rollbacks."""
    from reranker_ops.models.builds import BUILDS_DIR, build_of, prune_builds

    model = tmp_path / "model"
    builds = model / BUILDS_DIR
    builds.mkdir(parents=True)
    made = {}
    for variant in ("openvino-int8", "openvino-int8-weights"):
        for i in range(4):
            b = builds / f"{variant}-2026120{i}T120000-abc12{i}"
            b.mkdir()
            os.utime(b, (1_700_000_000 + i, 1_700_000_000 + i))
            made.setdefault(variant, []).append(b)
        (model / variant).symlink_to(made[variant][-1])
    assert build_of("openvino-int8-weights-20261201T120000-abc121") == "openvino-int8-weights"
    assert build_of("openvino-int8-20261201T120000-legacy-abc121") == "openvino-int8"
    assert build_of("openvino-int8") is None
    removed = prune_builds(model / "openvino-int8", keep=2)
    assert sorted(p.name for p in removed) == sorted(p.name for p in made["openvino-int8"][:2])
    assert all(b.is_dir() for b in made["openvino-int8-weights"])


def test_a_kill_the_watchdog_may_not_make_never_ends_the_supervisors_loop(tmp_path):
    """After a worker's pid is reused by someone else's process, os.kill raises PermissionError: the watchdog
    logs it and goes on (it caught only ProcessLookupError, and the exception would have ended the loop)."""
    import asyncio
    import logging

    from reranker_ops.supervise import supervisor as sup
    from reranker_ops.supervise.policy import Kill
    from reranker_ops.supervise.sdnotify import Notifier

    s = sup.Supervisor(Settings(run_dir=tmp_path / "run"), tmp_path, "m", Notifier(None),
                       log=logging.getLogger("test-kill"))

    class Refusing:
        def kill(self, pid, sig):
            raise PermissionError(1, "Operation not permitted")

    s.watch.os = Refusing()  # the OS calls of the watchdog, faked: the pid is someone else's now
    kill = Kill(pid=424242, stage="score", reason="score worker 424242 is stopped (stopped)", dump_stack=True)
    asyncio.run(s.watch.kill(None, kill))  # type: ignore[arg-type]
    assert s.watch.pending == {} and s.restarts["worker"] == 0


def test_sending_an_envelope_again_never_changes_bytes_an_earlier_send_may_still_hold(tmp_path):
    """The gate writes each part's head in place, in the room kept in front of its body (no copy). A part head
    once carried the generation's secret, so a copy sent to a new generation rewrote bytes the first send
    could still have queued in its transport. The head is now the same for every send; the seal, which does
    change, is a buffer of its own."""
    import asyncio
    import logging

    from reranker_ops.front.dispatch import Dispatch
    from reranker_ops.front.gate import limits_of
    from reranker_ops.front.metrics import Metrics
    from reranker_ops.front.upstream import Upstream
    from reranker_ops.protocol.envelope import PART_HEAD_LEN, open_envelope

    sent: list[list[bytes]] = []
    held: list[list] = []

    class Client:
        async def post(self, port, path, body, timeout, owner=0):
            held.append(list(body))  # the buffers themselves, as a transport would hold them
            sent.append([bytes(b) for b in body])
            return 500, b"no"

    async def main() -> None:
        gate = Dispatch(Settings(), Metrics(), logging.getLogger("t"), lambda: None, limits_of(Settings()))
        gate.client = Client()
        body = bytearray(PART_HEAD_LEN) + b'{"query": "q", "documents": ["d"]}'
        for generation, secret in ((1, b"a" * 32), (2, b"b" * 32)):
            await gate._post_to(Upstream(1000 + generation, secret, generation), [(body, "/rerank")], 7, 1e12)

    asyncio.run(main())
    first, second = sent
    assert [bytes(b) for b in held[0][1:]] == first[1:]  # what the first send held was not rewritten
    assert first[1:] == second[1:] and first[0] != second[0]  # the same parts; a seal per generation
    assert open_envelope(b"a" * 32, b"".join(first))[0] == 7 and open_envelope(b"b" * 32, b"".join(second))[0] == 7
