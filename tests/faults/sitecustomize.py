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
        from reranker_ops.serving import engine as _engine

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
        from reranker_ops.serving import engine as _eng

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
        from reranker_ops.process import supervisor as _sup

        _orig_derive = _sup.Supervisor._derive_state

        def _derive(self, gen):
            if os.path.exists(_crash):
                raise RuntimeError("injected supervisor bug")
            return _orig_derive(self, gen)

        _sup.Supervisor._derive_state = _derive
    except Exception:  # pragma: no cover
        pass
