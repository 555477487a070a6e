"""The front door under hostile clients: slow bodies and headers, floods of connections, requests that try
to go around the gate, secrets in child environments, compressed bodies, unknown routes."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gzip
import json
import os
import socket
import stat
import time

import httpx
import psutil
import pytest
from conftest import DOCS, QUERY, Clients, proc_env, wait_until

from reranker_ops.protocol.envelope import part_head, seal

pytestmark = pytest.mark.timeout(300)


def raw_request(port: int, head: bytes, body_chunks: list[bytes] = (), pause: float = 0.0,
                timeout: float = 30) -> tuple[bytes, float]:
    """Send ``head`` then each chunk with ``pause`` between; return all the server sent and when it closed."""
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(pause)
            try:
                data = s.recv(65536)
                if data:
                    got += data
                else:
                    break
            except socket.timeout:
                continue
            finally:
                s.settimeout(timeout)
        while True:
            data = s.recv(65536)
            if not data:
                break
            got += data
    except (ConnectionResetError, socket.timeout):
        pass
    finally:
        s.close()
    return got, time.monotonic() - t0


def test_a_slow_body_is_cut_off_while_others_are_served(make_server):
    server = make_server(body_timeout_s=3, header_timeout_s=2, keepalive_timeout_s=5)
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    head = (f"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with Clients(server.base, 10, n=2) as clients:
        got, took = raw_request(server.port, head, [body[i:i + 1] for i in range(len(body))], pause=1.0)
        slow_headers, took_h = raw_request(server.port, b"POST /rerank HTTP/1.1\r\nHost: x\r\n", [b"X-A: 1\r\n"] * 10,
                                           pause=1.0)
        silent, took_s = raw_request(server.port, b"")
    assert got.startswith(b"HTTP/1.1 408") and b"RERANKER_BODY_TIMEOUT_S" in got, got[:300]
    assert 2.5 <= took <= 8, took
    assert slow_headers.startswith(b"HTTP/1.1 408"), slow_headers[:200]
    assert took_h <= 6
    assert silent.startswith(b"HTTP/1.1 408") and took_s <= 6
    outcomes = [o for *_, o in clients.records]
    assert outcomes.count(200) >= 5 and set(outcomes) == {200}, set(outcomes)


def test_two_thousand_connections_get_answers_or_429_never_a_reset(make_server):
    server = make_server(queue_capacity=64, request_timeout_s=60)
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    request = (f"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def one() -> object:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 30)
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 90)
            writer.close()
            if not data:
                return "empty"
            return int(data.split(b" ", 2)[1])
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            return type(exc).__name__

    async def flood() -> list[object]:
        return await asyncio.gather(*(one() for _ in range(2000)))

    t0 = time.monotonic()
    outcomes = asyncio.run(flood())
    took = time.monotonic() - t0
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print(f"2000 connections in {took:.1f}s: {counts}")
    assert set(counts) <= {200, 429}, counts  # never a reset, a hang or an empty answer
    assert counts.get(200, 0) >= 50 and counts.get(429, 0) >= 1
    st = server.status()
    assert st["healthy"] and st["restarts"] == {"worker": 0, "server": 0}
    metrics = httpx.get(server.health + "/metrics").text
    assert "reranker_connections_rejected_total" in metrics


def test_nothing_reaches_mosec_around_the_gate(make_server):
    server = make_server()
    state = json.loads((server.run_dir / "state.json").read_text())
    internal = state["mosec"]["port"]
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    stranger = b"0123456789abcdef0123456789abcdef"  # a secret's shape, not this instance's
    part = part_head("0", len(body)) + body
    for payload in (b"0\n" + body, stranger + b" 0\n" + body, body, part, seal(stranger, 1, [part]) + part):
        r = httpx.post(f"http://127.0.0.1:{internal}/score", content=payload, timeout=10)
        assert r.status_code == 400 and "through the API port" in r.text, r.text
    assert httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}).status_code == 200


def test_requests_around_the_gate_are_refused_while_the_gates_own_are_served(make_server):
    """Two workers under the gate's traffic (its envelopes), and direct POSTs to MOSEC at the same time: every
    direct one is refused (400) before any work, and every request through the gate is answered 200."""
    server = make_server(workers=2)
    state = json.loads((server.run_dir / "state.json").read_text())
    internal = f"http://127.0.0.1:{state['mosec']['port']}/score"
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    part = part_head("0", len(body)) + body
    stranger = seal(b"f" * 32, 1, [part]) + part

    direct: list[tuple[int, str]] = []
    with Clients(server.base, 30.0, n=4) as clients, httpx.Client(timeout=30) as c:
        wait_until(lambda: sum(1 for *_, o in clients.records if o == 200) >= 5, 30, what="traffic flowing")
        served_before = len(clients.records)

        def mixed_in() -> bool:
            for payload in (stranger, b"0\n" + body):
                r = c.post(internal, content=payload)
                direct.append((r.status_code, r.text))
            return len(direct) >= 60 and len(clients.records) - served_before >= 20

        wait_until(mixed_in, 90, 0, what="direct requests among the gate's")
    assert direct and all(status == 400 and "through the API port" in text for status, text in direct), direct[:3]
    outcomes = [o for *_, o in clients.records]
    assert set(outcomes) == {200}, {o: outcomes.count(o) for o in set(outcomes)}
    print(f"{len(direct)} direct requests refused; {len(outcomes)} through the gate, all 200")


def test_children_hold_no_secret_and_the_run_dir_is_private(make_server, tmp_path):
    server = make_server(start=False, api_key="s3cret-key")
    server.run_dir.mkdir(mode=0o755)
    server.run_dir.chmod(0o755)  # a folder someone made with the default umask: made private at start
    server.env["HF_TOKEN"] = "hf_secret_token"
    server.start()
    sup = psutil.Process(server.pidfile()["pid"])
    children = sup.children(recursive=True)
    assert len(children) >= 3
    for p in children:
        env = proc_env(p)
        assert env, f"cannot read the environment of {p.pid}"
        leaked = [k for k, v in env.items() if "s3cret-key" in v or "hf_secret_token" in v
                  or k in ("RERANKER_API_KEY", "HF_TOKEN")]
        assert not leaked, (p.pid, leaked)
    assert stat.S_IMODE(os.stat(server.run_dir).st_mode) == 0o700
    config = next((server.run_dir / "mosec").glob("*.json"))
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_a_run_dir_owned_by_someone_else_is_refused(make_server, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the folder to another user")
    server = make_server(start=False)
    server.run_dir.mkdir(mode=0o700)
    os.chown(server.run_dir, 65534, 65534)
    res = server.cli("serve", "--daemon")
    assert res.returncode != 0 and "belongs to uid 65534" in res.stderr, res.stderr


def test_compressed_bodies_are_refused_without_inflating_them(make_server):
    server = make_server()
    sup = psutil.Process(server.pidfile()["pid"])
    bomb = gzip.compress(b"[" + b" " * (200 * 2**20) + b"]", compresslevel=9)  # 200 MiB of JSON in ~200 KiB
    rss0 = sup.memory_info().rss
    for enc in ("gzip", "deflate", "br"):
        r = httpx.post(server.base + "/rerank", content=bomb,
                       headers={"Content-Encoding": enc, "Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", r.text
    growth = sup.memory_info().rss - rss0
    assert growth < 4 * 2**20, growth  # below the body cap: nothing was inflated
    assert httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS}).status_code == 200


def test_every_error_is_json(make_server):
    server = make_server()
    r = httpx.get(server.base + "/nope")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": "not_found", "message": r.json()["message"], "status": 404}
    r = httpx.delete(server.base + "/health")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = httpx.get(server.base + "/rerank")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_in_flight_admission_answers_429_before_reading_the_body(make_server):
    """With the in-flight bound reached, the next request is refused at once, from its headers alone. (In
    flight are requests whose bodies arrived: a body that has not arrived takes no slot, so here the two slots
    are held by two requests that are slow to score, each on a worker of its own; the third worker answers
    the canary.)"""
    server = make_server(start=False, workers=3, max_in_flight=2, request_timeout_s=30, body_timeout_s=20)
    server.inject_faults()
    server.env.update(RERANKER_TEST_SLOW_MARKER="slow-to-score", RERANKER_TEST_SLOW_S="8")
    server.start()
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    head = (f"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with cf.ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(httpx.post, server.base + "/rerank", timeout=60,
                            json={"query": QUERY, "documents": [f"slow-to-score {i}"]}) for i in range(2)]
        wait_until(lambda: "reranker_requests_in_flight 2" in httpx.get(server.health + "/metrics").text, 10,
                   what="two requests admitted")
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(head)  # the head alone: no body follows
            answer = s.recv(65536)
        assert time.monotonic() - t0 < 2
        assert answer.startswith(b"HTTP/1.1 429") and b"Retry-After" in answer and b"RERANKER_MAX_IN_FLIGHT" in answer
        # the canary has its own slot: health stays green while users are refused
        wait_until(lambda: httpx.get(server.health + "/health").status_code == 200, 10, what="health green")
        assert [f.result().status_code for f in slow] == [200, 200]
    wait_until(lambda: httpx.post(server.base + "/rerank", json={"query": QUERY, "documents": DOCS},
                                  timeout=10).status_code == 200, 10, what="served again")

