"""Debian's nginx running deploy/nginx/rerankctl.conf as shipped, in front of replicas on loopback ports: for the
fleet test and benchmarks/fleet.py. Only the addresses change (the upstream's servers, the listen port) and the
paths an unprivileged nginx needs; every proxy setting is the file's own."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "deploy" / "nginx" / "rerankctl.conf"


def nginx_binary() -> Optional[str]:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if Path(found).exists() else None


def render(tmp: Path, api_ports: list[int], listen_port: int) -> str:
    """A whole nginx.conf: the shipped file with these replicas and this port, inside an http {} block."""
    shipped = SHIPPED.read_text()
    servers = re.findall(r"^\s*server 127\.0\.0\.1:\d+ (.*);$", shipped, re.M)
    if not servers or len(set(servers)) != 1:
        raise ValueError("deploy/nginx/rerankctl.conf: expected its upstream's server lines to share one setting")
    lines = "\n".join(f"    server 127.0.0.1:{p} {servers[0]};" for p in api_ports)
    body = re.sub(r"(upstream rerankctl \{\n)(?:\s*server 127\.0\.0\.1:\d+ .*;\n)+", lambda m: m.group(1) + lines + "\n",
                  shipped)
    body = re.sub(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen_port};", body)
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""  # root's workers would be nobody
    return (f"{user}\nworker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\n"
            f"events {{ worker_connections 1024; }}\nhttp {{\n    access_log off;\n"
            f"    client_body_temp_path {tmp}/body;\n    proxy_temp_path {tmp}/proxy;\n"
            f"    fastcgi_temp_path {tmp}/fastcgi;\n    uwsgi_temp_path {tmp}/uwsgi;\n    scgi_temp_path {tmp}/scgi;\n"
            f"{body}\n}}\n")


class Nginx:
    def __init__(self, tmp: Path, api_ports: list[int], listen_port: int) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        tmp.mkdir(parents=True, exist_ok=True)
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(render(tmp, api_ports, listen_port))
        self.error_log = tmp / "error.log"
        self.base = f"http://127.0.0.1:{listen_port}"
        check = subprocess.run([binary, "-t", "-c", str(self.conf)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused the rendered configuration: {check.stderr}")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
