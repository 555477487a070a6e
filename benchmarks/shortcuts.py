"""What each start-up shortcut buys, measured: every pair alternated in fresh interpreters, medians.

    python benchmarks/shortcuts.py [--rounds 9] [--old-tree PATH]

- MOSEC's import in its main process, with and without the stand-in for ``mosec.openapi`` (worker/app.py);
- OpenVINO's import in a score worker, with and without its converter blocked (worker/score.py);
- the settings' import and one load (pydantic-settings), and ``rerankctl --help`` as a whole; with
  ``--old-tree`` (a checkout of the stdlib settings, e.g. a git worktree of 396cd4e) the same beside it;
- ``rerankctl serve --help`` with the collector paused around imports and without (startup.frozen_imports).

Each figure is the median of ``--rounds`` runs; the two sides of a pair run alternately, so a noisy neighbour
hurts both alike. Prints a Markdown table (for benchmarks/HISTORY.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TIMED = "import time, sys; t = time.perf_counter(); {setup}; {body}; " \
        "print(time.perf_counter() - t, len(sys.modules))"

CASES = {
    "mosec import, stand-in for mosec.openapi": (
        "from reranker_ops.worker.app import _import_mosec", "_import_mosec()",
        "from reranker_ops.worker.app import _import_mosec", "_import_mosec('0.0.0-unverified')"),
    # both sides import the worker's module first (340 modules of its own): only the shortcut differs
    "openvino import, converter blocked": (
        "from reranker_ops.worker.score import _openvino_without_its_converter",
        "_openvino_without_its_converter(); import openvino",
        "from reranker_ops.worker.score import _openvino_without_its_converter", "import openvino"),
}


def run(code: str, env: dict) -> tuple[float, int]:
    # in the tree being measured: ``-c`` and ``-m`` put the working directory first on sys.path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=env["PYTHONPATH"])
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    seconds, modules = out.stdout.split()[-2:]
    return float(seconds), int(modules)


def wall(argv: list[str], env: dict) -> float:
    import time

    t = time.perf_counter()
    subprocess.run(argv, capture_output=True, env=env, timeout=120, check=True, cwd=env["PYTHONPATH"])
    return time.perf_counter() - t


def pair(a, b, rounds: int) -> tuple[list, list]:
    xs, ys = [], []
    for i in range(rounds):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        r1, r2 = first(), second()
        (xs, ys)[0 if first is a else 1].append(r1)
        (ys, xs)[0 if first is a else 1].append(r2)
    return xs, ys


def med(values: list, i: int = 0) -> float:
    return statistics.median(v[i] if isinstance(v, tuple) else v for v in values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--old-tree", type=Path, default=None, help="a checkout with the stdlib settings")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    rows = []
    for name, (setup_on, on, setup_off, off) in CASES.items():
        xs, ys = pair(lambda: run(TIMED.format(setup=setup_on, body=on), env),
                      lambda: run(TIMED.format(setup=setup_off, body=off), env), args.rounds)
        rows.append((name, f"{med(xs) * 1000:.0f} ms, {med(xs, 1):.0f} modules",
                     f"{med(ys) * 1000:.0f} ms, {med(ys, 1):.0f} modules"))
    settings = "from reranker_ops.settings import load_settings", "load_settings()"
    help_argv = [sys.executable, "-m", "reranker_ops", "--help"]
    if args.old_tree is not None:
        old_env = dict(env, PYTHONPATH=str(args.old_tree))
        # the old tree's stdlib settings are reranker_ops.config; asking it for reranker_ops.settings would load
        # this tree's module through the editable install's finder and measure pydantic-settings twice
        old_module = "settings" if (args.old_tree / "reranker_ops" / "settings.py").exists() else "config"
        old_settings = f"from reranker_ops.{old_module} import load_settings", "load_settings()"
        xs, ys = pair(lambda: run(TIMED.format(setup=settings[0], body=settings[1]), env),
                      lambda: run(TIMED.format(setup=old_settings[0], body=old_settings[1]), old_env), args.rounds)
        rows.append(("settings import + load: pydantic-settings (with) vs the old tree's stdlib (without)",
                     f"{med(xs) * 1000:.0f} ms", f"{med(ys) * 1000:.0f} ms"))
        xs, ys = pair(lambda: wall(help_argv, env), lambda: wall(help_argv, old_env), args.rounds)
        rows.append(("`rerankctl --help`, whole process: this tree (with) vs the old tree (without)",
                     f"{med(xs) * 1000:.0f} ms", f"{med(ys) * 1000:.0f} ms"))
    else:
        xs = [run(TIMED.format(setup=settings[0], body=settings[1]), env) for _ in range(args.rounds)]
        rows.append(("settings import + load (pydantic-settings)", f"{med(xs) * 1000:.0f} ms", ""))
    frozen = ("import reranker_ops.startup as st, contextlib; st.frozen_imports = contextlib.nullcontext; "
              "st.freeze_before_exit = lambda: None; import sys; sys.argv = ['rerankctl', 'serve', '--help']; "
              "from reranker_ops.cli import main; main()")
    on_argv = [sys.executable, "-m", "reranker_ops", "serve", "--help"]
    xs, ys = pair(lambda: wall(on_argv, env), lambda: wall([sys.executable, "-c", frozen], env), args.rounds)
    rows.append(("`rerankctl serve --help`: collector paused + frozen (with) vs as Python does (without)",
                 f"{med(xs) * 1000:.0f} ms",
                 f"{med(ys) * 1000:.0f} ms"))
    print("| what | with the shortcut | without |\n|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")


if __name__ == "__main__":
    main()
