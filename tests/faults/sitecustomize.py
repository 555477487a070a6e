"""Test-only fault injection, loaded into server processes through PYTHONPATH.

OpenVINO cannot be made to hang on demand, so this stands in for it. When the file named by
``RERANKER_TEST_HANG_FILE`` exists, the first scoring call to see it takes it (renames it to
``<name>.taken``) and blocks like native code does while that file exists: SIGALRM (MOSEC's forward
timeout) is blocked, so nothing in Python can interrupt it. Bounded at 10 minutes.
"""

import os

_flag = os.environ.get("RERANKER_TEST_HANG_FILE")
if _flag:
    import signal
    import time

    try:
        from reranker_ops.worker import engine as _engine

        _orig = _engine.Scorer._run

        def _run(self, encs):
            taken = _flag + ".taken"
            try:
                os.rename(_flag, taken)
            except OSError:
                return _orig(self, encs)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            deadline = time.monotonic() + 600
            while os.path.exists(taken) and time.monotonic() < deadline:
                time.sleep(0.05)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
            return _orig(self, encs)

        _engine.Scorer._run = _run
    except Exception:  # pragma: no cover - never break a process that does not score
        pass

# RERANKER_TEST_BOOT_HANG_FILE: while the file exists, a scoring worker blocks in its start-up (loading
# the model), the way a generation that never becomes ready looks from outside.
_boot = os.environ.get("RERANKER_TEST_BOOT_HANG_FILE")
if _boot:
    import time as _t

    try:
        from reranker_ops.worker import engine as _eng

        _orig_init = _eng.Scorer.__init__

        def _init(self, *a, **k):
            end = _t.monotonic() + 600
            while os.path.exists(_boot) and _t.monotonic() < end:
                _t.sleep(0.05)
            _orig_init(self, *a, **k)

        _eng.Scorer.__init__ = _init
    except Exception:  # pragma: no cover
        pass

# RERANKER_TEST_SUPERVISOR_CRASH_FILE: when the file exists, the supervisor's loop raises, as a bug would.
_crash = os.environ.get("RERANKER_TEST_SUPERVISOR_CRASH_FILE")
if _crash:
    try:
        from reranker_ops.supervise import status as _status

        _orig_derive = _status.Status.derive

        def _derive(self, *args):
            if os.path.exists(_crash):
                raise RuntimeError("injected supervisor bug")
            return _orig_derive(self, *args)

        _status.Status.derive = _derive
    except Exception:  # pragma: no cover
        pass

# RERANKER_TEST_UNVERIFIED_MOSEC=1: the installed MOSEC counts as a version the last-worker respawn was not
# verified on, so the supervisor runs MOSEC's own Runtime (a stage's last worker dying ends MOSEC).
if os.environ.get("RERANKER_TEST_UNVERIFIED_MOSEC"):
    try:
        from reranker_ops.worker import app as _app

        _app.KEEP_LAST_WORKER_VERIFIED = ()
    except Exception:  # pragma: no cover
        pass

# RERANKER_TEST_POISON_MARKER: a score worker that tokenizes a passage containing this text dies at once
# (SIGKILL of itself, as a crash in native code would end it): a request that kills its worker every time.
_poison = os.environ.get("RERANKER_TEST_POISON_MARKER")
if _poison:
    import signal as _sig

    try:
        from reranker_ops.worker import engine as _eng2

        def _deadly(orig):
            def wrapped(self, pairs, *a, **k):
                pairs = list(pairs)
                if any(_poison in p for _q, p in pairs):
                    os.kill(os.getpid(), _sig.SIGKILL)
                return orig(self, pairs, *a, **k)
            return wrapped

        _eng2.Tokenizer.encode_items = _deadly(_eng2.Tokenizer.encode_items)
        _eng2.Tokenizer.encode_windows = _deadly(_eng2.Tokenizer.encode_windows)
    except Exception:  # pragma: no cover
        pass

# RERANKER_TEST_SLOW_MARKER (+ RERANKER_TEST_SLOW_S): a score worker that tokenizes a passage containing this
# text takes that many seconds (a request that is slow to score, holding its place in flight).
_slow = os.environ.get("RERANKER_TEST_SLOW_MARKER")
if _slow:
    import time as _time

    try:
        from reranker_ops.worker import engine as _eng3

        _slow_s = float(os.environ.get("RERANKER_TEST_SLOW_S", "5"))

        def _slowed(orig):
            def wrapped(self, pairs, *a, **k):
                pairs = list(pairs)
                if any(_slow in p for _q, p in pairs):
                    _time.sleep(_slow_s)
                return orig(self, pairs, *a, **k)
            return wrapped

        _eng3.Tokenizer.encode_items = _slowed(_eng3.Tokenizer.encode_items)
        _eng3.Tokenizer.encode_windows = _slowed(_eng3.Tokenizer.encode_windows)
    except Exception:  # pragma: no cover
        pass

# RERANKER_TEST_FOREIGN_LISTENER_FILE: when the file exists, the port the supervisor picks for the next MOSEC
# generation is taken first by another process (a stranger that records what it receives in the file named
# by RERANKER_TEST_FOREIGN_RECORD and answers every request with made-up scores), as a local attacker who
# binds the port between the supervisor's choice and MOSEC's bind would.
_foreign = os.environ.get("RERANKER_TEST_FOREIGN_LISTENER_FILE")
if _foreign:
    try:
        import subprocess as _sp
        import sys as _sys

        from reranker_ops.supervise import generation as _sup2

        _orig_free_port = _sup2.free_port
        _STRANGER = r'''
import socket, sys, threading, time
port, record = int(sys.argv[1]), sys.argv[2]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(64); srv.settimeout(1)
answer = b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"scores": [0.99, 0.01, 0.5], "x": "!!"}'
def serve(c):
    c.settimeout(2)
    try:
        while True:
            data = c.recv(65536)
            if not data:
                return
            with open(record, "ab") as fh:
                fh.write(data)
            c.sendall(answer)
    except OSError:
        pass
end = time.monotonic() + 120
while time.monotonic() < end:
    try:
        c, _ = srv.accept()
    except socket.timeout:
        continue
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

        def _taken_port(host="127.0.0.1"):
            port = _orig_free_port(host)
            try:
                os.rename(_foreign, _foreign + ".taken")
            except OSError:
                return port
            _sp.Popen([_sys.executable, "-c", _STRANGER, str(port), os.environ["RERANKER_TEST_FOREIGN_RECORD"]],
                      stdin=_sp.DEVNULL, stdout=_sp.DEVNULL, stderr=_sp.DEVNULL, start_new_session=True)
            import socket as _s
            import time as _t
            end = _t.monotonic() + 10
            while _t.monotonic() < end:  # until the stranger listens
                try:
                    _s.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    _t.sleep(0.02)
            return port

        _sup2.free_port = _taken_port
    except Exception:  # pragma: no cover
        pass

# RERANKER_TEST_DIE_MID_BEAT_FILE: when the file exists, the score worker whose next heartbeat names an envelope
# (the first write of a forward pass) takes it and is killed half-way through that write: after the odd
# sequence and the record are stored, before the even sequence (a SIGKILL at any instruction can land there).
_mid_beat = os.environ.get("RERANKER_TEST_DIE_MID_BEAT_FILE")
if _mid_beat:
    import signal as _sig4

    try:
        from reranker_ops.protocol import heartbeat as _hbmod

        _orig_write = _hbmod.Heartbeat.write

        class _DieOnTheSecondStore:
            def __init__(self, real):
                self.real, self.stores = real, 0

            def pack_into(self, buf, offset, value):
                self.stores += 1
                if self.stores == 2:
                    os.kill(os.getpid(), _sig4.SIGKILL)
                return self.real.pack_into(buf, offset, value)

        def _write(self, **changes):
            if changes.get("envelope"):
                try:
                    os.rename(_mid_beat, _mid_beat + ".taken")
                except OSError:
                    pass
                else:
                    _hbmod.SEQ = _DieOnTheSecondStore(_hbmod.SEQ)
            return _orig_write(self, **changes)

        _hbmod.Heartbeat.write = _write
    except Exception:  # pragma: no cover
        pass
