"""The shipped config files load with the real settings loader: configs/default.yaml,
configs/prod.yaml, the dev overlay's config, and configs/serve.yaml (Serve's own schema, plus
its `args.settings` applied on top of each config the app may be given)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workers.config import DEFAULT_MODEL, ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"
PROD = ROOT / "configs" / "prod.yaml"
SERVE = ROOT / "configs" / "serve.yaml"
DEV_K8S = ROOT / "k8s" / "overlays" / "dev" / "config.yaml"
APP_CONFIGS = [DEFAULT, PROD, DEV_K8S]  # every file build_app may find at config_path

# What the pods get from the captioner-kafka Secret (k8s/); dummy values stand in for it.
SECRET_ENV = {"CAPTIONER_KAFKA__SASL_USERNAME": "user", "CAPTIONER_KAFKA__SASL_PASSWORD": "pw"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own CAPTIONER_* variables must not make these pass or fail."""
    import os

    for name in list(os.environ):
        if name.startswith("CAPTIONER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SECRET_ENV.items():
        monkeypatch.setenv(k, v)


def _serve() -> dict:
    return yaml.safe_load(SERVE.read_text())


def _app() -> dict:
    (app,) = _serve()["applications"]
    return app


def test_default_is_local_and_embedded() -> None:
    s = load_settings(DEFAULT)
    assert s.kafka.embedded and s.s3.embedded
    assert s.model.source == DEFAULT_MODEL
    assert s.replicas.num_gpus == 0
    assert s.kafka.security_protocol == "PLAINTEXT"
    assert s.ray.address is None


def test_prod_needs_the_kafka_secret_from_the_environment() -> None:
    # SASL_SSL without the password must not start: the file alone is not enough, by design.
    with pytest.raises(ConfigError, match="sasl"):
        load_settings(PROD)


def test_prod_loads_with_the_secret_env(secret_env: None) -> None:
    s = load_settings(PROD)
    assert not s.kafka.embedded and not s.s3.embedded
    assert s.kafka.security_protocol == "SASL_SSL"
    assert s.kafka.sasl_password is not None and s.kafka.sasl_password.get_secret_value() == "pw"
    assert s.replicas.num_gpus == 1
    assert s.replicas.autoscaling is not None and s.replicas.autoscaling.max_replicas >= 1
    # Serve's units are calls, and the ingest's calls carry up to max_batch_size images.
    assert s.replicas.autoscaling.target_ongoing_requests <= s.replicas.ongoing_requests
    assert s.replicas.endpoint and s.ray.address is None
    assert s.metrics.host == "0.0.0.0"  # scraped from outside the pod


def test_dev_overlay_config_loads(secret_env: None) -> None:
    s = load_settings(DEV_K8S)
    assert s.model.source == "tiny-random"
    assert s.replicas.num_gpus == 0


def _keys(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{prefix}{k}"
            yield from _keys(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for v in node:
            yield from _keys(v, prefix)


@pytest.mark.parametrize("path", [DEFAULT, PROD, SERVE, DEV_K8S], ids=lambda p: p.name)
def test_no_secret_in_config_files(path: Path) -> None:
    keys = list(_keys(yaml.safe_load(path.read_text())))
    leaked = [k for k in keys if any(w in k.lower() for w in ("password", "secret", "token", "access_key"))]
    assert not leaked, f"secrets belong in Kubernetes Secrets / env, not {path.name}: {leaked}"


def test_serve_yaml_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = (
        ServeDeploySchema.model_validate(_serve())
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(_serve())
    )
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == ("captioner", "/", "deployment.app:build_app")


def test_serve_yaml_app_args() -> None:
    app = _app()
    assert app["args"]["config_path"] == "/etc/captioner/config.yaml"
    assert set(app["args"]) <= {"config_path", "settings"}
    assert {d["name"] for d in app["deployments"]} <= {"CaptionReplica", "KafkaIngest", "CaptionIngress"}


@pytest.mark.parametrize("config", APP_CONFIGS, ids=lambda p: p.name)
def test_serve_args_settings_apply_to_every_config(config: Path, secret_env: None) -> None:
    settings_over = _app()["args"]["settings"]
    s = load_settings(config, **settings_over)
    # The overrides land, and the Serve proxy and the app agree on the HTTP port.
    assert s.http.host == settings_over["http"]["host"]
    assert s.http.port == _serve()["http_options"]["port"]
    assert s.metrics.host == "0.0.0.0"


def test_replica_sizing_lives_in_the_settings_only() -> None:
    # serve.yaml is shared by dev (CPU) and prod (GPU): per-environment sizing set here would
    # override replicas.* of the config file and put GPU demands on a CPU cluster.
    (replica,) = [d for d in _app()["deployments"] if d["name"] == "CaptionReplica"]
    owned_by_settings = {"num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests"}
    assert not owned_by_settings & set(replica), owned_by_settings & set(replica)
