"""A disposable machine with systemd as PID 1: a podman container (runc, cgroupfs) from a Debian base made
here with debootstrap. Used by the systemd and container tests; never starts an init on the host.

The base image is built once per machine and kept (tag ``localhost/rrk-sd-base:1``); the package is
installed the way the README tells an operator: a venv under /opt from wheels built here (so the box
needs no network).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_TAG = "localhost/rrk-sd-base:1"
PODMAN = shutil.which("podman")
CACHE = Path(os.environ.get("RERANKCTL_TEST_CACHE", "/var/tmp/rerankctl-test-cache"))
PACKAGES = "python3,python3-venv,ca-certificates,systemd,systemd-sysv,procps,curl"


def podman_args() -> list[str]:
    return [PODMAN or "podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]


def why_not() -> str | None:
    """None if podman can run containers here, else why not (the tests that need it are skipped)."""
    if PODMAN is None:
        return "podman is not installed (.ci/run installs it)"
    if shutil.which("debootstrap") is None and not image_exists(BASE_TAG):
        return "debootstrap is not installed (.ci/run installs it)"
    res = subprocess.run(podman_args() + ["info"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return f"podman cannot run here: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
    return None


def image_exists(tag: str) -> bool:
    return subprocess.run(podman_args() + ["image", "exists", tag], capture_output=True).returncode == 0


def debian_mirror() -> str | None:
    """The mirror this machine's apt uses (debootstrap then fetches from where apt can); None: debootstrap's
    own default."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
            if line.startswith("deb ") and "security" not in line:
                return line.split()[1]
    return None


@contextlib.contextmanager
def _machine_lock(name: str):
    """Held while one process of the suite (it runs in two: pyproject's addopts) makes what the other would
    make too, or would delete under it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_base_image() -> str:
    with _machine_lock("base-image"):
        if not image_exists(BASE_TAG):
            _build_base_image()
    return BASE_TAG


def _build_base_image() -> None:
    with tempfile.TemporaryDirectory(prefix="rrk-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        mirror = debian_mirror()
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(rootfs),
                        *([mirror] if mirror else [])], check=True, capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(podman_args() + ["import", "-", BASE_TAG], stdin=tar.stdout, check=True,
                       capture_output=True, timeout=600)
        tar.wait(timeout=60)


_built: dict[str, Path] = {}


def build_wheels() -> Path:
    """Wheels of the package and its serving dependencies (no torch), built with this interpreter's pip
    (once per test session)."""
    if "wheels" in _built:
        return _built["wheels"]
    out = CACHE / "wheels"  # the dependencies' wheels are kept from one session to the next
    CACHE.mkdir(parents=True, exist_ok=True)
    mine = Path(tempfile.mkdtemp(prefix="wheels-of-", dir=CACHE))  # beside them: hard links need one file system
    with _machine_lock("wheels"):
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("rerankctl-*.whl"):
            old.unlink()
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(out), str(REPO)],
                       check=True, capture_output=True, timeout=1200)
        # this session's own links to them: the next build (the suite's other process) replaces the package's
        # wheel in the shared folder while this one may still be copying it into an image
        shutil.copytree(out, mine, copy_function=os.link, dirs_exist_ok=True)
    atexit.register(shutil.rmtree, mine, True)
    _built["wheels"] = mine
    return mine


class Box:
    """One running container with systemd as PID 1 and rerankctl installed under /opt/rerankctl/venv."""

    def __init__(self, image: str, *, extra: list[str] = ()) -> None:
        self.name = f"rrk-{uuid.uuid4().hex[:8]}"
        subprocess.run(podman_args() + [
            "run", "-d", "--name", self.name, "--systemd=always", "--network", "host",
            "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096", *extra, image, "/sbin/init",
        ], check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"systemd in {self.name} did not come up: {state!r}")

    def sh(self, command: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        res = subprocess.run(podman_args() + ["exec", self.name, "bash", "-c", command], capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{command!r} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def copy_in(self, src: Path, dest: str) -> None:
        subprocess.run(podman_args() + ["cp", str(src), f"{self.name}:{dest}"], check=True, capture_output=True,
                       timeout=300)

    def install(self, wheels: Path) -> None:
        self.copy_in(wheels, "/wheels")
        self.sh("python3 -m venv /opt/rerankctl/venv && "
                "/opt/rerankctl/venv/bin/pip install -q --no-index --find-links /wheels rerankctl", timeout=600)

    def remove(self) -> None:
        subprocess.run(podman_args() + ["rm", "-f", "-t", "2", self.name], capture_output=True, timeout=120)
