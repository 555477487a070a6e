"""Start-up shortcuts: the collector paused around imports (public ``gc`` API), and the shortcuts that rely on
how a dependency is built inside, each taken only on the versions it was checked on and off elsewhere with
one log line (``startup.verified_on``)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from reranker_ops.startup import installed_version, verified_on


def run(code: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_the_command_imports_without_collector_passes_and_leaves_the_collector_on():
    """`main` imports the app with the cyclic collector off and freezes what it imported: the modules' objects
    are in the permanent generation (no later collection walks them); a command still runs with the
    collector on (a foreground `serve` runs for months), and a failing import does not leave it off."""
    code = ("import atexit, gc, sys\n"
            "collections = []\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start' and collections.append(info['generation']))\n"
            "from reranker_ops.cli import main\n"
            "def report():\n"
            "    walked = {id(o) for o in gc.get_objects()}\n"  # the permanent generation is not listed
            "    rich = sys.modules['rich.console'].__dict__\n"
            "    print('enabled', gc.isenabled(), 'frozen', gc.get_freeze_count() > 0,\n"
            "          'rich-walked', id(rich) in walked, 'during-import', n_import)\n"
            "atexit.register(report)\n"
            "sys.argv = ['rerankctl', 'serve', '--help']\n"
            "import reranker_ops.cli as cli, reranker_ops.startup as st\n"
            "real = st.frozen_imports\n"
            "import contextlib\n"
            "@contextlib.contextmanager\n"
            "def counted():\n"
            "    global n_import\n"
            "    before = len(collections)\n"
            "    with real():\n"
            "        yield\n"
            "    n_import = len(collections) - before\n"
            "st.frozen_imports = counted\n"
            "main()\n")
    words = run(code).stdout.split()[-8:]
    assert words == ["enabled", "True", "frozen", "True", "rich-walked", "False", "during-import", "0"], words

    from reranker_ops.startup import frozen_imports

    with pytest.raises(ImportError):
        with frozen_imports():
            import reranker_ops_no_such_module  # noqa: F401
    assert gc.isenabled()


def test_verified_on_takes_exact_versions_and_series_and_says_when_a_shortcut_is_off(capsys):
    assert verified_on("mosec", ("0.9.8",), "x", version="0.9.8")
    assert verified_on("openvino", ("2026.4",), "x", version="2026.4.1")
    assert not verified_on("openvino", ("2026.4",), "x", version="2026.40.0")  # a series, not a prefix
    assert not verified_on("mosec", ("0.9.8",), "the stand-in", version="0.9.9")
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "mosec 0.9.9 is not a version the stand-in was verified on (0.9.8): it is off" in err
    assert installed_version("mosec") not in ("", "unknown")
    assert installed_version("no_such_distribution_here") == "unknown"


@pytest.mark.parametrize("version, expect_stand_in", [("", True), ("0.9.99", False)])
def test_the_mosec_openapi_stand_in_only_on_verified_versions(version, expect_stand_in):
    """On the installed (verified) MOSEC its server gets the stand-in and imports cleanly; on any other version
    MOSEC's own mosec.openapi loads and the log says why."""
    out = run("import sys\n"
              "from reranker_ops.worker.app import _import_mosec\n"
              f"Runtime, Server = _import_mosec({version!r})\n"
              "import importlib\n"
              "openapi = importlib.import_module('mosec.openapi')\n"  # what MOSEC's server imports when it runs
              "print(getattr(openapi, '__file__', None) is None)")  # MOSEC's own is a file
    assert out.stdout.split() == [str(expect_stand_in)]
    assert ("is not a version the stand-in for mosec.openapi was verified on" in out.stderr) == (not expect_stand_in)


@pytest.mark.parametrize("version, blocked", [("", True), ("2025.1.0", False)])
def test_openvino_loads_without_its_converter_only_on_verified_versions(version, blocked):
    out = run("import sys\n"
              "from reranker_ops.worker.score import _openvino_without_its_converter\n"
              f"placed = _openvino_without_its_converter({version!r})\n"
              "import openvino\n"
              "core = openvino.Core()\n"  # the runtime works either way
              "print(placed, sys.modules.get('openvino.tools.ovc') is not None)")
    assert out.stdout.split() == [str(blocked), str(not blocked)]
