"""The operations kit on real engines: the alerts checked and unit-tested by Debian's promtool, the same alerts
in the PrometheusRule, a real Prometheus scraping a real server with every metric the alerts and the dashboard
name present in what it scraped (a renamed metric fails here), the dashboard's queries run by that Prometheus,
and the Deployment's probe paths answered by a real server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest
import yaml
from conftest import REPO, free_port, wait_until

pytestmark = pytest.mark.timeout(240)

PROM = REPO / "deploy" / "prometheus"
MONITORING = REPO / "deploy" / "k8s" / "monitoring"
RULES = PROM / "rerankctl.rules.yml"
DASHBOARD = MONITORING / "rerankctl-dashboard.json"
# PromQL's own words, and Grafana's variables: never metric names
NOT_METRICS = {"sum", "by", "rate", "increase", "histogram_quantile", "absent", "max", "unless", "ignoring", "on",
               "and", "or", "le", "max_over_time"}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian's prometheus package has it; .ci/run installs it)")
    return path


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label names and values, and functions, removed)."""
    bare = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)  # grouping labels
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
            if w not in NOT_METRICS and not w.startswith("$") and not re.fullmatch(r"e\d*", w)} - {"e"}


def test_the_alerts_pass_promtools_checks_and_unit_tests():
    promtool = need("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # a unit test per alert: it fires on the series that should fire it, stays quiet on the others
    unit = subprocess.run([promtool, "test", "rules", "rerankctl.rules.test.yml"], cwd=PROM, capture_output=True,
                          text=True, timeout=120)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    tests = yaml.safe_load((PROM / "rerankctl.rules.test.yml").read_text())["tests"]
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    assert fired == alerts, alerts - fired  # every alert has a test in which it fires
    readme = (REPO / "README.md").read_text()
    runbooks = readme[readme.index("### Alerts and what to do"):]
    for r in (r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]):
        assert r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["summary"]
        assert f"**{r['alert']}**" in runbooks, f"no runbook for {r['alert']}"


def test_promtool_fails_a_rule_that_does_not_parse(tmp_path):
    """The check above can fail: a rule with a broken expression is refused."""
    promtool = need("promtool")
    bad = tmp_path / "bad.yml"
    bad.write_text(RULES.read_text().replace("reranker_up == 0", "reranker_up ==", 1))
    assert subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, timeout=60).returncode != 0


def test_the_prometheusrule_carries_the_same_alerts_and_the_kit_renders():
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["spec"] == yaml.safe_load(RULES.read_text())
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["health"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service = yaml.safe_load((REPO / "deploy" / "k8s" / "service.yaml").read_text())
    assert "health" in {p["name"] for p in service["spec"]["ports"]}  # the port the monitor names exists
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (which renders kustomize offline) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert {d["kind"] for d in docs} == {"PrometheusRule", "ServiceMonitor", "ConfigMap"}
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["rerankctl-dashboard.json"]) == json.loads(DASHBOARD.read_text())
    assert all(d["metadata"]["namespace"] == "rerankctl" for d in docs)


def test_metric_names_are_read_from_promql():
    assert metric_names('sum by (instance, le) (rate(reranker_request_duration_seconds_bucket{job="x"}[5m])) > 2') \
        == {"reranker_request_duration_seconds_bucket"}
    assert metric_names('reranker_state{state="running"} == 0 unless ignoring (state) reranker_state == 1') \
        == {"reranker_state"}
    assert metric_names("absent(up{job=\"rerankctl\"})") == {"up"}


@pytest.fixture()
def prometheus(tmp_path):
    """A real Prometheus (Debian's), started with deploy/prometheus's config pointed at a target and scraping
    every second: ``start(target) -> base URL``."""
    binary = need("prometheus")
    procs = []

    def start(target: str) -> str:
        conf = yaml.safe_load((PROM / "prometheus.yml").read_text())
        conf["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        conf["rule_files"] = [str(RULES)]
        conf["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(conf))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("w")
        procs.append(subprocess.Popen([binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                       f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log))
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _get(base + "/-/ready") == 200, timeout=60, what="Prometheus ready")
        return base

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def query(base: str, expr: str) -> list:
    r = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


def test_a_real_prometheus_scrapes_every_metric_the_alerts_and_the_dashboard_read(make_server, prometheus):
    server = make_server()
    base = prometheus(f"127.0.0.1:{server.health_port}")
    for i in range(5):  # traffic, so that histograms and counters by route have series
        assert httpx.post(server.base + "/rerank", json={"query": f"q{i}", "documents": ["a", "b"]},
                          timeout=30).status_code == 200
    httpx.post(server.base + "/rerank", content=b"{", timeout=30)  # and a 4xx
    wait_until(lambda: len(query(base, 'reranker_requests_total{job="rerankctl", code="400"}')) > 0, timeout=60,
               what="a scrape after the requests")
    names = set(httpx.get(base + "/api/v1/label/__name__/values", timeout=10).json()["data"])
    wanted = set().union(*(metric_names(e) for e in rule_exprs() + dashboard_exprs()))
    assert "reranker_process_memory_bytes" in wanted and "up" in wanted
    assert wanted <= names, f"named by the alerts or the dashboard but not exported: {sorted(wanted - names)}"
    roles = {r["metric"]["role"] for r in query(base, "reranker_process_memory_bytes")}
    assert {"supervisor", "mosec", "score"} <= roles
    assert all(float(r["value"][1]) > 1e6 for r in query(base, "reranker_process_memory_bytes"))
    # every rule evaluates without error, and none fires on a healthy server
    wait_until(lambda: all(r.get("lastEvaluation", "").startswith("20") for g in
                           httpx.get(base + "/api/v1/rules", timeout=10).json()["data"]["groups"] for r in g["rules"]),
               timeout=30, what="every rule evaluated")
    groups = httpx.get(base + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    firing = [a for a in httpx.get(base + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
              if a["state"] == "firing"]
    assert firing == []
    # each dashboard query runs, with Grafana's variables as Grafana fills them in
    for expr in dashboard_exprs():
        filled = (expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$job", ".*")
                  .replace("$instance", ".*"))
        query(base, filled)
    # and reads the traffic (rate needs two scrapes of the counter after it moved)
    wait_until(lambda: query(base, 'sum(rate(reranker_pairs_scored_total{job="rerankctl"}[1m])) > 0'), timeout=30,
               what="pairs/s as the dashboard reads them")


def test_the_deployments_probe_paths_answer_on_a_real_server(make_server):
    """The paths and port the rendered Deployment's probes use are served (a path that does not answer would
    keep every pod unready)."""
    spec = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    [container] = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    server = make_server()
    urls = {"http": server.base, "health": server.health}
    assert ports == {"http": 8080, "health": 8081}  # what the image's settings listen on
    probes = [container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:
        r = httpx.get(urls[probe["port"]] + probe["path"], timeout=10)
        assert r.status_code == 200, (probe, r.text)
    assert httpx.get(server.health + "/no-such-probe", timeout=10).status_code == 404  # a wrong path would show
