"""What ``rerankctl status`` prints: the server, each model of a server of several, its processes."""

from __future__ import annotations

import time

from rich.table import Table

from .common import console


def _fmt_bytes(n) -> str:
    return "—" if n is None else f"{n / 2**20:.0f} MiB"


def print_status(st: dict) -> None:
    colour = {"running": "green", "degraded": "yellow", "starting": "yellow"}.get(st["state"], "red")
    table = Table(show_header=False, box=None)
    table.add_row("state", f"[{colour}]{st['state']}[/]" + (f" — {st['reason']}" if st.get("reason") else ""))
    for key in ("pid", "address", "health", "model", "precision", "version"):
        if st.get(key) is not None:
            table.add_row(key, str(st[key]))
    if st.get("uptime_s") is not None:
        table.add_row("uptime", f"{st['uptime_s']:.0f}s")
    probe = st.get("last_probe")
    if probe:
        lat = f"{probe['latency_s'] * 1000:.0f} ms" if probe.get("latency_s") is not None else "—"
        ago = time.time() - probe["at"]
        table.add_row("last probe", ("ok" if probe["ok"] else f"FAILED: {probe['error']}") + f" · {lat} · {ago:.0f}s ago")
    if st.get("restarts") is not None and "pid" in st:
        table.add_row("restarts", ", ".join(f"{k} {v}" for k, v in st["restarts"].items()))
    if st.get("total_pss_bytes"):
        table.add_row("memory", f"{_fmt_bytes(st['total_pss_bytes'])} PSS (whole tree)")
    console.print(table)
    if len(st.get("models") or []) > 1:
        models = Table(title="models")
        for col in ("model", "state", "precision", "workers", "PSS", "reason"):
            models.add_column(col)
        for m in st["models"]:
            c = (m.get("capacity") or {}).get("score") or {}
            colour = {"running": "green", "degraded": "yellow", "starting": "yellow"}.get(m["state"], "red")
            models.add_row(m["model"] + (" (default)" if m.get("default") else ""), f"[{colour}]{m['state']}[/]",
                           str(m.get("precision")), f"{c.get('live', 0)}/{c.get('expected', 0)}",
                           _fmt_bytes(m.get("pss_bytes")), m.get("reason") or "")
        console.print(models)
    if st.get("processes"):
        procs = Table(title="processes")
        for col in ("role", "pid", "status", "RSS", "PSS", "CPU %", "requests"):
            procs.add_column(col)
        for r in st["processes"]:
            procs.add_row(r["role"], str(r["pid"]), r["status"], _fmt_bytes(r["rss_bytes"]), _fmt_bytes(r["pss_bytes"]),
                          f"{r['cpu_percent']:.0f}", "—" if r["requests"] is None else str(r["requests"]))
        console.print(procs)
    for other in st.get("elsewhere", []):
        console.print(f"[yellow]note:[/] a server runs with run dir {other['run_dir']} (pid {other['pid']},"
                      f" port {other['port']}): rerankctl status --run-dir {other['run_dir']}", soft_wrap=True)
