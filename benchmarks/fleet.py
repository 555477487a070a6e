"""A local rehearsal of a fleet: three `rerankctl serve` replicas behind nginx (deploy/nginx/rerankctl.conf's
settings), steady load through nginx, a rolling restart of all three, then SIGKILL of one replica.

    .venv/bin/python benchmarks/fleet.py [--seconds 120] [--concurrency 8]

Uses the tests' tiny model (the fleet's behaviour, not the model's speed, is measured). Prints requests and
failures per phase and throughput; targets (checked, exit 1 when missed): no failed request during the
rolling restart; after the SIGKILL, failures <= requests that were in flight on the killed replica (at most
the concurrency) and none once nginx has marked it down. All three replicas share this machine's cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    from chaos import Load, build_model
    from conftest import ServerHandle, free_port

    from nginxkit import Nginx, nginx_binary

    if nginx_binary() is None:
        raise SystemExit("nginx is not installed: apt-get install nginx")
    model = build_model(Path(tempfile.gettempdir()) / "rerankctl-chaos-model")
    tmp = Path(tempfile.mkdtemp(prefix="fleet-"))
    replicas = [ServerHandle(model, tmp / f"r{i}", workers=1, probe_interval_s=1, stop_timeout_s=10)
                for i in range(3)]
    for r in replicas:
        r.env["PATH"] = f"{REPO / '.venv' / 'bin'}:{r.env.get('PATH', '')}"
        r.start()
    ng = Nginx(tmp / "nginx", [r.port for r in replicas], free_port())  # deploy/nginx/rerankctl.conf as shipped
    base = ng.base
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    load = Load(base, args.concurrency, 30)
    marks: dict[str, float] = {}
    try:
        load.start()
        time.sleep(min(15.0, args.seconds / 8))
        marks["rolling_start"] = time.monotonic()
        script = REPO / "deploy" / "rolling-restart.sh"
        env = dict(os.environ, RERANKCTL=str(REPO / ".venv" / "bin" / "rerankctl"),
                   PATH=f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}")
        res = subprocess.run([str(script), *[f"{r.run_dir}:{r.health_port}" for r in replicas]], env=env,
                             capture_output=True, text=True, timeout=600)
        marks["rolling_end"] = time.monotonic()
        if res.returncode != 0:
            print(res.stdout, res.stderr)
        time.sleep(5)
        victim = replicas[1]
        pid = victim.pidfile()["pid"]
        marks["kill"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # the supervisor; MOSEC follows it (PDEATHSIG)
        from conftest import kill_marked

        kill_marked(victim.run_dir)  # and the whole replica is gone, as when a machine dies
        rest = args.seconds - (time.monotonic() - load.records[0][0] if load.records else 0)
        time.sleep(max(20.0, rest))
        marks["end"] = time.monotonic()
    finally:
        load.stop()
        ng.stop()
        for r in replicas:
            r.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    def phase(a: float, b: float) -> tuple[int, int, float]:
        rs = [r for r in load.records if a <= r[0] < b]
        failed = [r for r in rs if r[2] != 200]
        return len(rs), len(failed), len(rs) / max(1e-9, b - a)

    t_first = load.records[0][0]
    rows = [("steady (3 replicas)", t_first, marks["rolling_start"]),
            ("rolling restart of all 3", marks["rolling_start"], marks["rolling_end"]),
            ("after SIGKILL of one", marks["kill"], marks["end"])]
    print("\n| phase | requests | failed | requests/s |\n|---|---|---|---|")
    results = {}
    for name, a, b in rows:
        n, f, rps = phase(a, b)
        results[name] = (n, f, rps)
        print(f"| {name} | {n} | {f} | {rps:.1f} |")
    later = phase(marks["kill"] + 6, marks["end"])  # nginx marks a replica down within fail_timeout
    misses = []
    if results["rolling restart of all 3"][1]:
        misses.append(f"{results['rolling restart of all 3'][1]} failed during the rolling restart")
    if results["after SIGKILL of one"][1] > args.concurrency:
        misses.append(f"{results['after SIGKILL of one'][1]} failed after the SIGKILL (> {args.concurrency} in flight)")
    if later[1]:
        misses.append(f"{later[1]} failed after nginx marked the replica down")
    print("\nTARGETS: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
