"""The serving image (deploy/Containerfile): built with podman, run non-root on a read-only root file system
with a mounted model; it serves, drains and exits 0 on SIGTERM, and reaps orphans as PID 1. The Kubernetes
manifests validate offline against a current release's schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sdbox
from conftest import DOCS, QUERY, REPO, Clients, free_port, wait_until

IMAGE = "localhost/rerankctl-test:latest"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    why = sdbox.why_not()
    if why:
        pytest.skip(why)
    base = sdbox.ensure_base_image()
    wheels = sdbox.build_wheels()
    ctx = tmp_path_factory.mktemp("image-context")
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ctx / rel)
    shutil.copytree(wheels, ctx / ".wheels")
    res = subprocess.run(sdbox.podman_args() + [
        "build", "-f", "deploy/Containerfile", "--target", "serve", "--build-arg", f"BASE={base}",
        "--build-arg", "PIP_ARGS=--no-index --find-links /src/.wheels", "--build-arg", "PACKAGE=rerankctl",
        "--network", "none", "-t", IMAGE, "."],
        cwd=ctx, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return IMAGE


def run_container(image: str, model: Path, port: int, hport: int, run_volume: Path | None = None) -> str:
    """The image, detached; ``run_volume``: a host folder as /run/rerankctl (kept across restarts, as a
    Kubernetes emptyDir outlives a container's restart), else a tmpfs."""
    name = f"rrk-img-{uuid.uuid4().hex[:8]}"
    run = ["-v", f"{run_volume}:/run/rerankctl"] if run_volume else ["--tmpfs", "/run/rerankctl:mode=1777"]
    subprocess.run(sdbox.podman_args() + [
        "run", "-d", "--name", name, "--network", "host", "--read-only", *run,
        "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
        "-v", f"{model.parent}:/models:ro", "-e", f"RERANKER_MODEL=/models/{model.name}",
        "-e", f"RERANKER_PORT={port}", "-e", f"RERANKER_HEALTH_PORT={hport}", "-e", "RERANKER_HOST=127.0.0.1",
        "-e", "RERANKER_PROBE_INTERVAL_S=1", image], check=True, capture_output=True, timeout=120)
    return name


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(sdbox.podman_args() + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_image_serves_drains_and_exits_0_on_sigterm(image, tiny_fp32, tmp_path):
    model = tmp_path / "models" / "tiny-model"
    shutil.copytree(tiny_fp32.parent, model, symlinks=True, ignore=shutil.ignore_patterns("onnx-*", "*int8*", "*fp16*"))
    for p in model.rglob("*"):
        p.chmod(p.stat().st_mode | 0o044 | (0o011 if p.is_dir() else 0))
    port, hport = free_port(), free_port()
    name = run_container(image, model, port, hport)
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{hport}/health") == 200, 120, 0.3, what="healthy in the container")
        r = httpx.post(f"http://127.0.0.1:{port}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
        assert r.status_code == 200 and len(r.json()["scores"]) == 3
        top = podman("top", name, "user", "pid", "args").stdout
        assert "root" not in top.split("\n", 1)[1], top  # nothing runs as root
        # PID 1 reaps: MOSEC's main process killed, its orphans end up with PID 1, which must collect them
        mosec = podman("exec", name, "sh", "-c", "ps -eo pid,args | grep 'worker.app' | grep -v grep").stdout.split()[0]
        podman("exec", name, "kill", "-9", mosec)
        wait_until(lambda: _get(f"http://127.0.0.1:{hport}/health") == 200, 120, 0.3, what="healed in the container")
        wait_until(lambda: "Z" not in podman("exec", name, "ps", "-eo", "stat=").stdout, 20, 0.3, what="no zombie")
        # SIGTERM (what `podman stop` and the kubelet send): drain, stop MOSEC, exit 0 within the grace period
        t0 = time.monotonic()
        res = podman("stop", "-t", "40", name, timeout=120)
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", podman("logs", name).stderr[-3000:]
        assert took < 30, took
        logs = podman("logs", name)
        assert "state stopping -> stopped" in logs.stdout + logs.stderr
    finally:
        podman("rm", "-f", "-t", "1", name)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_kill_9_of_pid_1_leaves_nothing_that_blocks_the_restart(image, tiny_fp32, tmp_path):
    """The run dir on a volume that outlives the container (an emptyDir, a host folder): MOSEC's main process
    killed (healed: a new generation), then PID 1 killed with SIGKILL, which ends every process of the
    container (an OOM kill, the runtime's kill), then the same container started again: healthy, twice."""
    model = tmp_path / "models" / "tiny-model"
    shutil.copytree(tiny_fp32.parent, model, symlinks=True, ignore=shutil.ignore_patterns("onnx-*", "*int8*", "*fp16*"))
    for p in model.rglob("*"):
        p.chmod(p.stat().st_mode | 0o044 | (0o011 if p.is_dir() else 0))
    volume = tmp_path / "run-volume"
    volume.mkdir()
    volume.chmod(0o1777)
    port, hport = free_port(), free_port()
    name = run_container(image, model, port, hport, run_volume=volume)
    try:
        for attempt in range(2):
            wait_until(lambda: _get(f"http://127.0.0.1:{hport}/health") == 200, 120, 0.3, what="healthy")
            mosec = podman("exec", name, "sh", "-c",
                           "ps -eo pid,args | grep 'worker.app' | grep -v grep").stdout.split()[0]
            podman("exec", name, "kill", "-9", mosec)
            wait_until(lambda: _generation(volume) >= 2, 60, 0.3, what="a new MOSEC generation")
            wait_until(lambda: _get(f"http://127.0.0.1:{hport}/health") == 200, 120, 0.3, what="healed")
            assert podman("kill", "-s", "KILL", name).returncode == 0
            wait_until(lambda: podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "false",
                       60, 0.3, what="the container dead")
            left = sorted(p.name for p in (volume / "run" / "mosec").iterdir())
            assert left, "the dead server left nothing: the test would prove nothing"
            print(f"attempt {attempt + 1}: PID 1 killed, leaving {left} on the volume")
            res = podman("start", name)
            assert res.returncode == 0, res.stderr
        wait_until(lambda: _get(f"http://127.0.0.1:{hport}/health") == 200, 120, 0.3, what="healthy after restarts")
        r = httpx.post(f"http://127.0.0.1:{port}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=30)
        assert r.status_code == 200 and len(r.json()["scores"]) == 3
    finally:
        podman("rm", "-f", "-t", "1", name)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_image_holds_no_secret_model_venv_or_git(tmp_path):
    """Built from a working tree as an operator has one: a .env with keys, a model, a venv, git's history. None
    of them is in any layer of the image, and neither are the sources (they go into a build stage only)."""
    import tarfile

    why = sdbox.why_not()
    if why:
        pytest.skip(why)
    base = sdbox.ensure_base_image()
    wheels = sdbox.build_wheels()
    ctx = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, ctx / rel)
    shutil.copytree(wheels, ctx / ".wheels")
    marker = f"leaked-{uuid.uuid4().hex}"
    planted = {
        ".env": f"RERANKER_API_KEY={marker}\nHF_TOKEN=hf_{marker}\n",
        ".env.production": f"RERANKER_API_KEY={marker}\n",
        "deploy/k8s/api-key.env": f"RERANKER_API_KEY={marker}\n",
        "models/secret-model/model.safetensors": marker * 100,
        ".venv/lib/python3.11/site-packages/private.py": f"TOKEN = '{marker}'\n",
        ".git/config": f"[remote]\n\turl = https://user:{marker}@example.com/repo\n",
    }
    for rel, text in planted.items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(text)
    tag = f"localhost/rerankctl-hygiene:{uuid.uuid4().hex[:8]}"
    res = subprocess.run(sdbox.podman_args() + [
        "build", "-f", "deploy/Containerfile", "--target", "serve", "--build-arg", f"BASE={base}",
        "--build-arg", "PIP_ARGS=--no-index --find-links /src/.wheels", "--build-arg", "PACKAGE=rerankctl",
        "--network", "none", "-t", tag, "."], cwd=ctx, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    archive = tmp_path / "image.tar"
    try:
        assert podman("save", "--format", "docker-archive", "-o", str(archive), tag, timeout=600).returncode == 0
        found, sources = [], []
        needle = marker.encode()
        with tarfile.open(archive) as outer:
            layers = [m for m in outer.getmembers() if m.name.endswith(".tar") or m.name.endswith("/layer.tar")]
            assert layers, "no layer in the saved image"
            for layer in layers:
                with tarfile.open(fileobj=outer.extractfile(layer)) as inner:
                    for m in inner.getmembers():
                        if m.name.lstrip("./").startswith("src/"):
                            sources.append(m.name)
                        if m.isfile():
                            data = inner.extractfile(m).read()
                            if needle in data:
                                found.append(m.name)
        assert found == [], found
        assert sources == [], sources[:10]
    finally:
        podman("rmi", "-f", tag)


def _generation(volume: Path) -> int:
    """The MOSEC generation the server in the container serves from, as its state file on the volume says."""
    import json

    try:
        return int(json.loads((volume / "run" / "state.json").read_text())["mosec"]["generation"] or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def render_k8s(tmp_path: Path, key: str | None = "a-real-key-0123456789") -> subprocess.CompletedProcess:
    """``kubectl kustomize`` of a copy of deploy/k8s, with ``api-key.env`` holding ``key`` (none: no file)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (which renders kustomize offline) is not installed")
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "deploy" / "k8s", k8s, ignore=shutil.ignore_patterns("api-key.env"))
    if key is not None:
        (k8s / "api-key.env").write_text(f"RERANKER_API_KEY={key}\n")
    return subprocess.run(["kubectl", "kustomize", str(k8s)], capture_output=True, text=True, timeout=120)


def test_the_kubernetes_api_key_is_a_required_input(tmp_path):
    """No key ships with the manifests: without api-key.env they do not render, and the Secret carries what the
    operator put there (a placeholder copied as it is would be refused by the server itself)."""
    import yaml

    res = render_k8s(tmp_path / "none", key=None)
    assert res.returncode != 0 and "api-key.env" in res.stderr, res.stderr[-500:]
    res = render_k8s(tmp_path / "some")
    assert res.returncode == 0, res.stderr
    docs = list(yaml.safe_load_all(res.stdout))
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    import base64

    assert base64.b64decode(secret["data"]["RERANKER_API_KEY"]).decode() == "a-real-key-0123456789"
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    refs = [e["secretRef"]["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
            if "secretRef" in e]
    assert refs == [secret["metadata"]["name"]]  # the hashed name, rewritten into the Deployment
    assert "change-me" not in (REPO / "deploy" / "k8s").joinpath("api-key.env.example").read_text()


@pytest.mark.parametrize("version", ["1.31.0", "1.34.0"])
def test_the_kubernetes_manifests_validate(version, tmp_path):
    """What ``kubectl apply -k`` applies, rendered, validated offline against a release's schema (strict), and
    the settings the operations rely on."""
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    import yaml

    k8s = REPO / "deploy" / "k8s"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    files = [k8s / f for f in kustomization["resources"]]
    assert {f.name for f in k8s.glob("*.yaml")} - {"kustomization.yaml"} == {f.name for f in files}
    res = render_k8s(tmp_path)
    assert res.returncode == 0, res.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(res.stdout)
    tool = Path(sys.executable).parent / "kubernetes-validate"
    res = subprocess.run([str(tool) if tool.exists() else "kubernetes-validate", "--strict", "-k", version,
                          str(rendered)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered.read_text())}
    assert {"Deployment", "Service", "Secret", "NetworkPolicy", "HorizontalPodAutoscaler"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    config = docs["ConfigMap"]["data"] if docs.get("ConfigMap", {}).get("metadata", {}).get("name") == "rerankctl-env" \
        else yaml.safe_load((k8s / "configmap.yaml").read_text())["data"]
    assert pod["terminationGracePeriodSeconds"] > pause + float(config["RERANKER_STOP_TIMEOUT_S"])
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "reranker_in_flight_per_worker"
    rules = yaml.safe_load(yaml.safe_load((k8s / "prometheus-adapter-rules.yaml").read_text())["data"]["config.yaml"])
    assert "reranker_in_flight_per_worker" in rules["rules"][0]["seriesQuery"]
    # the NetworkPolicy: the API from the namespace's pods, the health port from monitoring only
    policy = docs["NetworkPolicy"]["spec"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert by_port["http"] == [{"podSelector": {}}]
    assert by_port["health"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "rerankctl"}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_rendered_manifests_run_under_podman_kube_play(image, tiny_fp32, tmp_path):
    """deploy/k8s rendered by ``kubectl kustomize`` and played by podman: the pod comes up, its probe paths
    answer, it serves a rerank (with the Secret's key) through its port; then PID 1 is killed with SIGKILL from
    the host (what an OOM kill does), the pod's restart policy starts the container again with its run-dir
    volume (the emptyDir) kept, and it is ready and serving again.

    Changed for podman, and only that: the image is the one built here (never pulled); the model's PVC (there is
    no provisioner here) is a host folder with the tiny model, which the ConfigMap names; the ports get host
    ports on loopback; the Secret is handed to podman as a podman secret; and the kinds podman does not play (Namespace, Service, NetworkPolicy, HPA, PDB, the
    adapter's rules) are left out."""
    import json
    import os
    import signal

    import yaml

    model = tmp_path / "models" / "tiny-model"
    shutil.copytree(tiny_fp32.parent, model, symlinks=True, ignore=shutil.ignore_patterns("onnx-*", "*int8*", "*fp16*"))
    for p in [model.parent, *model.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o044 | (0o011 if p.is_dir() else 0))
    key = "a-real-key-0123456789"
    res = render_k8s(tmp_path, key=key)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout)
            if d["kind"] in ("ConfigMap", "Secret", "Deployment") and d["metadata"]["name"] != "rerankctl-adapter-rules"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [env] = [d for d in docs if d["kind"] == "ConfigMap"]
    # two score workers: the kill below takes a pod that serves with more than one
    env["data"].update(RERANKER_MODEL="/models/tiny-model", RERANKER_PROBE_INTERVAL_S="1", RERANKER_WORKERS="2")
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    container.update(image=image, imagePullPolicy="Never")
    port, hport = free_port(), free_port()
    for p in container["ports"]:
        p.update(hostPort={"http": port, "health": hport}[p["name"]], hostIP="127.0.0.1")
    [models] = [v for v in spec["volumes"] if v["name"] == "models"]
    models.clear()
    models.update(name="models", hostPath={"path": str(model.parent), "type": "Directory"})
    deployment["spec"]["replicas"] = 1
    # podman 4 reads a secretRef from a podman secret holding the Secret's data as JSON (name -> base64), not
    # from a Secret in the YAML: made from the rendered Secret's own data
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    docs.remove(secret)
    secret_file = tmp_path / "secret.json"
    secret_file.write_text(json.dumps(secret["data"]))
    secret_name = secret["metadata"]["name"]
    podman("secret", "rm", secret_name)
    made = podman("secret", "create", secret_name, str(secret_file))
    assert made.returncode == 0, made.stderr
    play = tmp_path / "play.yaml"
    play.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    # this machine refuses podman's default open-files limit (as run_container's --ulimit says): the same
    # limits for the pod's containers, through containers.conf
    conf = tmp_path / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n')
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    try:
        out = subprocess.run(sdbox.podman_args() + ["kube", "play", str(play)], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        # podman names the pod <deployment>-pod[-n] and its container <pod>-<container>
        names = podman("ps", "--format", "{{.Names}}").stdout.split()
        [name] = [n for n in names if n.startswith(f"{deployment['metadata']['name']}-pod")
                  and n.endswith(f"-{container['name']}")]
        wait_until(lambda: _get(f"http://127.0.0.1:{hport}/ready") == 200, 180, 0.3, what="the pod ready")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert _get(f"http://127.0.0.1:{hport}{path}") == 200, probe
        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"http://127.0.0.1:{port}/rerank", json={"query": QUERY, "documents": DOCS}, headers=auth,
                       timeout=30)
        assert r.status_code == 200 and len(r.json()["scores"]) == 3, r.text
        assert httpx.post(f"http://127.0.0.1:{port}/rerank", json={"query": QUERY, "documents": DOCS},
                          timeout=30).status_code == 401  # the Secret's key is required
        user = podman("exec", name, "id", "-u").stdout.strip()
        assert user == "10001", user  # the pod's securityContext, not the image's default
        assert httpx.get(f"http://127.0.0.1:{hport}/health", timeout=10).json()["capacity"]["score"]["live"] == 2
        # PID 1 killed from the host, as the OOM killer does, while clients send: the restart policy brings the
        # container back, and the clients are served again
        with Clients(f"http://127.0.0.1:{port}", deadline_s=30, n=3, headers=auth) as clients:
            wait_until(lambda: sum(1 for *_, o in list(clients.records) if o == 200) >= 10, 60, 0.1,
                       what="load on the pod")
            pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_until(lambda: podman("inspect", "--format", "{{.RestartCount}}", name).stdout.strip()
                       not in ("", "0"), 60, 0.3, what="the container restarted by the pod's policy")
            wait_until(lambda: _get(f"http://127.0.0.1:{hport}/ready") == 200, 180, 0.3, what="ready again")
            ready_at = time.monotonic()
            wait_until(lambda: sum(1 for t0, _, o in list(clients.records) if t0 > ready_at and o == 200) >= 10,
                       60, 0.1, what="the clients served again")
        # what failed, failed while the pod was down (its requests in flight, then nothing listening)
        late = [(t0 - ready_at, o) for t0, _, o in clients.records if o != 200 and t0 > ready_at]
        assert not late, late
        assert any(o != 200 for t0, _, o in clients.records if t0 >= killed_at - 1), "the kill was not felt"
        # the run dir's volume outlived the container: the log holds both starts (each leaves "starting": for
        # running, or for degraded while the second of two workers still loads)
        log = podman("exec", name, "cat", "/run/rerankctl/run/rerankctl.log").stdout
        assert log.count("state starting -> ") >= 2, log[-3000:]
        state = json.loads(podman("exec", name, "cat", "/run/rerankctl/run/state.json").stdout)
        assert state["state"] == "running"
    finally:
        subprocess.run(sdbox.podman_args() + ["kube", "down", str(play)], capture_output=True, timeout=120, env=env)
        podman("secret", "rm", secret_name)
