"""The Grafana dashboard and the alert rules (k8s/base/monitoring/): every query names only metrics
something in the deployment exports, PromQL that the real parser accepts, rules that fire on
synthetic series (`promtool test rules`), and both shipped by the overlays."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "k8s" / "base" / "monitoring"
DASHBOARD = MONITORING / "captioner-dashboard.json"
RULES = MONITORING / "prometheusrule.yaml"
RULE_TESTS = Path(__file__).parent / "data" / "alerts_test.yaml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not on PATH: `apt-get install prometheus` (Debian) provides it; CI installs it",
)
KUBECTL = shutil.which("kubectl")


# -- which names exist --------------------------------------------------------------------------


@cache
def our_metric_names() -> frozenset[str]:
    """The series names workers/metrics.py exposes, as Prometheus sees them."""
    from prometheus_client import REGISTRY

    import workers.metrics  # noqa: F401  (registers the metrics)

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("captioner_"):
            names.update(family.name + s for s in suffixes[family.type])
    return frozenset(names)


@cache
def external_names() -> dict[str, frozenset[str]]:
    sources = yaml.safe_load((MONITORING / "external-metrics.yaml").read_text())["sources"]
    return {source: frozenset(entry["names"]) for source, entry in sources.items()}


def allowed_names() -> frozenset[str]:
    return our_metric_names().union(*external_names().values())


# -- PromQL: the metric names an expression reads -----------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "Inf",
    "NaN",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels
    (matchers, grouping clauses) or durations."""
    stripped = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub('""', expr))))
    names = set()
    for m in _IDENT.finditer(stripped):
        rest = stripped[m.end() :].lstrip()
        if m.group() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(m.group())
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, stage) (rate(captioner_stage_seconds_bucket{stage=~"fetch|x", '
        'namespace=~"$namespace"}[$__rate_interval]))) / on() group_left sum(up) > 1e3 unless absent(foo_bar)'
    )
    assert metric_names(expr) == {"captioner_stage_seconds_bucket", "up", "foo_bar"}


# -- the dashboard --------------------------------------------------------------------------------


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*\w+\s*\)", var["definition"])
            assert m, f"variable {var['name']}: only label_values(metric, label) is checked here"
            found.append((f"variable {var['name']}", m.group(1)))
    return found


def test_dashboard_queries_name_only_exported_metrics() -> None:
    unknown = {
        (where, name)
        for where, expr in dashboard_queries()
        for name in metric_names(expr)
        if name not in allowed_names()
    }
    assert not unknown, f"not exported by captioner, Ray Serve, KEDA or DCGM: {sorted(unknown)}"


def test_a_misspelt_metric_would_be_caught() -> None:
    assert "captioner_consumd_total" not in allowed_names()
    assert metric_names("sum(rate(captioner_consumd_total[5m]))") - allowed_names() == {"captioner_consumd_total"}


def test_dashboard_covers_what_operators_look_at() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    required = {
        "captioner_consumed_total",
        "captioner_results_total",
        "captioner_consumer_lag",
        "captioner_in_flight",
        "captioner_source_paused",
        "captioner_batch_size_bucket",
        "captioner_stage_seconds_bucket",
        "captioner_dead_letters_total",
        "captioner_cache_hits_total",
        "captioner_cache_misses_total",
        "captioner_produce_errors_total",
        "captioner_inference_retries_total",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_deployment_queued_queries",
        "keda_scaler_metrics_value",
        "DCGM_FI_DEV_GPU_UTIL",
    }
    assert required <= used, sorted(required - used)
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard()["uid"] and all(
        p["datasource"]["uid"] == "${datasource}" for p in dashboard()["panels"] if p["type"] != "row"
    )


def test_ray_names_exist_in_the_installed_ray() -> None:
    """Ray exports `serve_x` as `ray_serve_x` (+ `_total` for counters, `_bucket`… for histograms)."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.origin
    ray_dir = Path(spec.origin).parent
    sources = "\n".join(
        p.read_text(errors="replace")
        for sub in ("serve", "_private", "dashboard/modules/metrics")
        for p in (ray_dir / sub).rglob("*.py")
    )
    for name in external_names()["ray_serve"] | external_names()["ray_node"]:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name.removeprefix("ray_"))
        assert f'"{base}"' in sources or name in sources, f"{name}: no metric {base!r} in ray {ray_dir}"


# -- the alert rules ------------------------------------------------------------------------------


@cache
def rule_spec() -> dict:
    return yaml.safe_load(RULES.read_text())["spec"]


def test_rules_name_only_exported_metrics() -> None:
    unknown = {
        (r["alert"], n)
        for g in rule_spec()["groups"]
        for r in g["rules"]
        for n in metric_names(r["expr"])
        if n not in allowed_names()
    }
    assert not unknown, sorted(unknown)


def test_rules_cover_the_failures_operators_page_on() -> None:
    alerts = {r["alert"] for g in rule_spec()["groups"] for r in g["rules"]}
    assert {
        "CaptionerLagGrowing",
        "CaptionerDeadLetterRateHigh",
        "CaptionerNoCommitProgress",
        "CaptionerPollLoopStopped",
        "CaptionerReplicasUnhealthy",
        "CaptionerReplicasMissing",
        "CaptionerProduceErrors",
    } <= alerts
    for g in rule_spec()["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"], r["alert"]


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _write_rules(tmp_path: Path, spec: dict) -> None:
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)


@needs_promtool
def test_promtool_checks_and_unit_tests_the_rules(tmp_path) -> None:
    _write_rules(tmp_path, rule_spec())
    checked = _promtool("check", "rules", "alerts.rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_the_rule_tests_catch_a_wrong_threshold(tmp_path) -> None:
    spec = yaml.safe_load(yaml.safe_dump(rule_spec()))
    for g in spec["groups"]:
        for r in g["rules"]:
            if r["alert"] == "CaptionerDeadLetterRateHigh":
                r["expr"] = r["expr"].replace("> 0.05", "> 0.5")
    _write_rules(tmp_path, spec)
    tested = _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert tested.returncode != 0 and "CaptionerDeadLetterRateHigh" in tested.stdout + tested.stderr


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*"}


@needs_promtool
def test_dashboard_queries_parse_as_promql(tmp_path) -> None:
    """Each query (Grafana's variables filled in) as a recording rule: promtool's parser is Prometheus's."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_queries()):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = _promtool("check", "rules", "dashboard.rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- shipped by the overlays -----------------------------------------------------------------------


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH (CI has it)")
@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlays_ship_the_dashboard_and_the_rules(overlay: str) -> None:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert json.loads(cm["data"]["captioner-dashboard.json"]) == dashboard()
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["spec"] == rule_spec()
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
