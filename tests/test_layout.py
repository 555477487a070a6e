"""The layout holds: the folder says which process runs the code, no import circle, modules a newcomer can
read, and each process loads only what it needs (README, "How it is built")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reranker_ops"
MAX_LINES = 520  # "no module over ~500 lines"
SUPERVISOR_MAX_LINES = 300


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every reranker_ops module ``name`` imports, at the top or inside a function (a lazy import is still an
    edge of the graph: it runs sooner or later)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known.keys()
            found |= subs or ({target} & known.keys())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known.keys()
    found.discard(name)
    return found


def non_stdlib_imports(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        bad += [n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n != "__future__"]
    return bad


def test_no_import_circle():
    known = modules()
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    seen: dict[str, int] = {}  # 1: on the path being walked, 2: done
    circles = []

    def walk(m: str, path: list[str]) -> None:
        seen[m] = 1
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                circles.append(path[path.index(n):] + [n])
            elif n not in seen:
                walk(n, path + [n])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            walk(m, [m])
    assert not circles, circles


def test_the_folder_says_which_process_runs_the_code():
    """protocol: the standard library only (both sides import it; ``reranker_ops`` itself is its version); worker (MOSEC's processes): protocol and its
    own, never the supervisor's side, the settings or the CLI; front: never the supervisor's or the worker's
    modules (it talks to MOSEC over HTTP only)."""
    known = modules()
    for name, path in known.items():
        deps = imports_of(name, path, known)
        if name.startswith("reranker_ops.protocol"):
            assert not non_stdlib_imports(path), (name, non_stdlib_imports(path))
            assert all(d == "reranker_ops" or d.startswith("reranker_ops.protocol") for d in deps), (name, deps)
        if name.startswith("reranker_ops.worker"):
            allowed = ("reranker_ops.protocol", "reranker_ops.worker", "reranker_ops.startup")
            assert all(d == "reranker_ops" or d.startswith(allowed) for d in deps), (name, deps)
        if name.startswith("reranker_ops.front"):
            banned = ("reranker_ops.supervise", "reranker_ops.worker", "reranker_ops.cli", "reranker_ops.control")
            assert not [d for d in deps if d.startswith(banned)], (name, deps)


def test_modules_stay_readable():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long
    supervisor = PACKAGE / "supervise" / "supervisor.py"
    assert len(supervisor.read_text(encoding="utf-8").splitlines()) <= SUPERVISOR_MAX_LINES


@pytest.mark.parametrize("module, banned", [
    # a MOSEC worker: openvino, tokenizers, numpy and MOSEC, nothing heavier, nothing of the supervisor's side
    ("reranker_ops.worker.score", ("torch", "transformers", "optimum", "pydantic", "pydantic_settings",
                                   "aiohttp", "typer", "rich", "prometheus_client", "h11", "httptools",
                                   "reranker_ops.settings")),
    # the command line's start: the supervisor's HTTP side loads only once MOSEC is on its way
    ("reranker_ops.cli.root", ("aiohttp", "openvino", "mosec", "prometheus_client", "torch")),
])
def test_each_process_loads_only_what_it_needs(module, banned):
    code = (f"import sys, {module}\n"
            f"print(' '.join(m for m in {banned!r} if m in sys.modules and sys.modules[m] is not None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [], f"{module} loaded {out.stdout.split()}"
