"""The Serve application of configs/serve.yaml on a real Serve instance on loopback: HTTP ingress,
Kafka ingest and replicas sharing one model, loaded from an s3:// prefix."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kafka_helpers import produce
from worker_fixtures import (
    BUCKET,
    collect_outcomes,
    flat_png,
    png_bytes,
    request,
    upload,
    worker_settings,
)

from workers.config import LimitsConfig, ModelConfig
from workers.embedded import wait_until
from workers.kafkaclient import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "configs" / "serve.yaml"
APP_NAME = "deploy-test"
PREFIX = "/captioner"
BODY_LIMIT = 300_000
RESULT_KEYS = {"id", "image", "caption", "model", "params", "metadata", "cached", "source", "width", "height", "timings_ms"}


def serve_yaml_app() -> dict[str, Any]:
    return yaml.safe_load(SERVE_YAML.read_text())["applications"][0]


def test_serve_yaml_is_a_serve_config_for_our_builder_and_deployments():
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from deployment.app import INGEST_NAME, INGRESS_NAME, build_app
    from workers.replicas import DEPLOYMENT_NAME

    schema = ServeDeploySchema(**yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = schema.applications
    assert import_attr(app.import_path) is build_app
    assert {d.name for d in app.deployments} <= {DEPLOYMENT_NAME, INGEST_NAME, INGRESS_NAME}


class Deployed:
    def __init__(self, base: str, settings: Any, gate: threading.Event):
        self.url = base + PREFIX
        self.settings = settings
        self.gate = gate

    def ready(self) -> None:
        """Let the model load through, and wait until the app says it is ready."""
        self.gate.set()
        wait_until(lambda: requests.get(f"{self.url}/readyz", timeout=5).status_code == 200,
                   timeout_s=120, what="/readyz")


@pytest.fixture(scope="module")
def deployed(ray_serve: str, broker, s3_server, tmp_path_factory) -> Any:
    from ray import serve
    from ray._common.utils import import_attr

    from workers.chaos_proxy import ChaosProxy
    from workers.model.loading import build_tiny_random

    tmp = tmp_path_factory.mktemp("deploy")
    # The model as an operator ships it: save_pretrained files under an s3:// prefix, read
    # through a proxy that holds the download until the test lets it go (a slow cold start).
    model_dir = build_tiny_random(tmp / "tiny")
    client = s3_server.client()
    for f in model_dir.rglob("*"):
        if f.is_file():
            client.put_object(Bucket=BUCKET, Key=f"models/tiny/{f.relative_to(model_dir)}", Body=f.read_bytes())
    gate = threading.Event()
    proxy = ChaosProxy(s3_server.endpoint_url)
    proxy.before_forward = lambda method, path: gate.wait(120) if "/models/" in path else None
    proxy.start()

    settings = worker_settings(
        broker.bootstrap_servers, s3_server,
        model=ModelConfig(source=f"s3://{BUCKET}/models/tiny/", cache_dir=tmp / "cache", torch_threads=1),
        s3=s3_server.s3_config(endpoint_url=proxy.url, allowed_buckets=[BUCKET], max_attempts=2, backoff_s=0.01),
        limits=LimitsConfig(max_http_body_bytes=BODY_LIMIT, max_image_pixels=1_000_000),
    )
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.input_topic], partitions=2)
    ensure_topics(kafka, [kafka.output_topic, kafka.dead_letter_topic])
    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(settings.portable()))

    # configs/serve.yaml's application as an operator deploys it, with this machine's config file.
    app = serve_yaml_app()
    app["args"]["config_path"] = str(config_file)
    app["args"]["settings"]["metrics"] = {"port": 0}
    builder = import_attr(app["import_path"])
    serve.run(builder(app["args"]), name=APP_NAME, route_prefix=PREFIX)
    yield Deployed(ray_serve, settings, gate)
    gate.set()
    serve.delete(APP_NAME)
    proxy.stop()


def test_readyz_flips_once_the_model_is_loaded(deployed):
    assert requests.get(f"{deployed.url}/healthz", timeout=10).json() == {"status": "ok"}
    if not deployed.gate.is_set():
        response = requests.get(f"{deployed.url}/readyz", timeout=10)
        assert response.status_code == 503 and response.json() == {"ready": False}
    deployed.ready()
    body = requests.get(f"{deployed.url}/readyz", timeout=10).json()
    assert body["ready"] is True
    assert body["model"]["untrained"] is True and body["model"]["name"] == f"s3://{BUCKET}/models/tiny/"


def test_upload_multipart_and_s3_reference_are_captioned(deployed, s3_server):
    deployed.ready()
    raw = requests.post(f"{deployed.url}/v1/captions", data=png_bytes(501), headers={"content-type": "image/png"},
                        timeout=60)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert RESULT_KEYS <= set(body) and body["caption"] and (body["width"], body["height"]) == (48, 40)
    assert body["params"]["beam_size"] == 2 and body["id"].startswith("upload:")

    form = requests.post(
        f"{deployed.url}/v1/captions",
        files={"image": ("cat.png", png_bytes(502), "image/png")},
        data={"params": json.dumps({"beam_size": 1}), "id": "my-cat", "metadata": json.dumps({"k": "v"})},
        timeout=60,
    )
    assert form.status_code == 200, form.text
    body = form.json()
    assert (body["id"], body["image"], body["params"]["beam_size"], body["metadata"]) == (
        "my-cat", "upload:cat.png", 1, {"k": "v"})

    uri = upload(s3_server, "http/ref.png", png_bytes(503))
    ref = requests.post(f"{deployed.url}/v1/captions", json={"image": uri, "id": "ref"}, timeout=60)
    assert ref.status_code == 200, ref.text
    assert ref.json()["image"] == uri and ref.json()["id"] == "ref"


@pytest.mark.parametrize(
    "kind, status, code",
    [
        ("oversize body", 413, "object_too_large"),
        ("bad json", 400, "invalid_message"),
        ("bad params", 400, "invalid_message"),
        ("forbidden bucket", 403, "forbidden_reference"),
        ("not s3", 403, "forbidden_reference"),
        ("missing object", 404, "object_not_found"),
        ("non-image", 422, "invalid_image"),
        ("too many pixels", 413, "image_too_large"),
    ],
)
def test_bad_input_gets_the_right_4xx_and_code(deployed, kind, status, code):
    deployed.ready()
    url = f"{deployed.url}/v1/captions"
    post = {
        "oversize body": lambda: requests.post(url, data=b"\0" * (BODY_LIMIT + 1),
                                               headers={"content-type": "image/png"}, timeout=30),
        "bad json": lambda: requests.post(url, data=b"{nope", headers={"content-type": "application/json"}, timeout=30),
        "bad params": lambda: requests.post(url, json={"image": f"s3://{BUCKET}/x.png", "params": {"beam_size": 0}},
                                            timeout=30),
        "forbidden bucket": lambda: requests.post(url, json={"image": "s3://elsewhere/x.png"}, timeout=30),
        "not s3": lambda: requests.post(url, json={"image": "http://169.254.169.254/latest/"}, timeout=30),
        "missing object": lambda: requests.post(url, json={"image": f"s3://{BUCKET}/http/missing.png"}, timeout=30),
        "non-image": lambda: requests.post(url, data=b"plain text, not pixels", headers={"content-type": "image/png"},
                                           timeout=30),
        "too many pixels": lambda: requests.post(url, data=flat_png((1500, 1000)),
                                                 headers={"content-type": "image/png"}, timeout=30),
    }[kind]
    response = post()
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]


def test_openapi_document_is_served(deployed):
    spec = requests.get(f"{deployed.url}/openapi.json", timeout=10).json()
    assert "/v1/captions" in spec["paths"] and "/readyz" in spec["paths"]


def test_build_app_is_the_inference_tier_without_a_kafka_consumer(deployed):
    """configs/serve.yaml's app holds no consumer: an upgrade of it moves no partition."""
    from ray import serve

    from deployment.app import INGEST_NAME, INGRESS_NAME
    from workers.replicas import DEPLOYMENT_NAME

    deployments = set(serve.status().applications[APP_NAME].deployments)
    assert deployments == {INGRESS_NAME, DEPLOYMENT_NAME}
    assert INGEST_NAME not in {d["name"] for d in serve_yaml_app()["deployments"]}


def test_batch_endpoint_answers_prepared_images_in_order(deployed):
    import numpy as np

    from workers.params import GenerationParams
    from workers.replica_wire import (
        BATCH_PATH,
        CONTENT_TYPE,
        INFO_PATH,
        decode_answers,
        encode_batch,
    )

    deployed.ready()
    info = requests.get(f"{deployed.url}{INFO_PATH}", timeout=30).json()
    assert (info["height"], info["width"]) == (32, 32) and info["model"]["untrained"] is True
    rng = np.random.default_rng(7)
    items = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), GenerationParams(beam_size=b)) for b in (1, 2, 1)]
    response = requests.post(f"{deployed.url}{BATCH_PATH}", data=encode_batch(items),
                             headers={"content-type": CONTENT_TYPE}, timeout=60)
    assert response.status_code == 200, response.text
    answers = decode_answers(response.json(), 3)
    assert all(a.captions and a.error is None for a in answers)
    bad = requests.post(f"{deployed.url}{BATCH_PATH}", data=b"\0\0\0\xffnope", headers={"content-type": CONTENT_TYPE},
                        timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_message"


def test_the_ingest_consumes_kafka_through_the_batch_endpoint(deployed, broker, s3_server):
    """`captioner run`'s path: a Pipeline over HttpReplicas (no Ray handle) against the app."""
    from workers.pipeline import Pipeline
    from workers.replica_http import HttpReplicas

    deployed.ready()
    kafka = deployed.settings.kafka
    uris = [upload(s3_server, f"ingest/{i}.png", png_bytes(600 + i)) for i in range(4)]
    produce(kafka.bootstrap_servers, kafka.input_topic, [request(u, id=f"k{i}") for i, u in enumerate(uris)])
    replicas = HttpReplicas(deployed.url, timeout_s=60)
    pipeline = Pipeline(deployed.settings, replicas).start()
    try:
        results, dead = collect_outcomes(kafka, len(uris), timeout=120)
    finally:
        pipeline.stop()
        replicas.close()
    assert dead == []
    assert sorted(json.loads(r.value)["id"] for r in results) == [f"k{i}" for i in range(len(uris))]
    assert all(json.loads(r.value)["model"]["name"] == f"s3://{BUCKET}/models/tiny/" for r in results)
