"""The Serve application of configs/serve.yaml on a real Serve instance on loopback: HTTP ingress,
Kafka ingest and replicas sharing one model, loaded from an s3:// prefix; and a second, guarded
ingress on the same replicas (no s3:// references, tight admission limits) for auth, limits and a
few hundred malformed requests."""

from __future__ import annotations

import json
import select
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from helpers.http_fuzz_cases import Case, fuzz_cases
from helpers.kafka_helpers import produce
from helpers.worker_fixtures import (
    BUCKET,
    collect_outcomes,
    flat_png,
    png_bytes,
    request,
    upload,
    worker_settings,
)
from workers.config import HttpConfig, LimitsConfig, MetricsConfig, ModelConfig
from workers.contract import ErrorCode
from workers.embedded import wait_until
from workers.kafkaclient import ensure_topics
from workers.replica_wire import INFO_PATH

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "configs" / "serve.yaml"
APP_NAME = "deploy-test"
PREFIX = "/captioner"
BODY_LIMIT = 300_000
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RESULT_KEYS = {
    "id",
    "image",
    "caption",
    "model",
    "params",
    "metadata",
    "cached",
    "source",
    "width",
    "height",
    "timings_ms",
}


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
    def __init__(self, base: str, settings: Any, gate: threading.Event, tokens_file: Path):
        self.base = base
        self.url = base + PREFIX
        self.settings = settings
        self.gate = gate
        self.tokens_file = tokens_file
        self.http = requests.Session()  # what an authorised client sends
        self.http.headers.update(AUTH)

    def ready(self) -> None:
        """Let the model load through, and wait until the app says it is ready."""
        self.gate.set()
        wait_until(
            lambda: requests.get(f"{self.url}/readyz", timeout=5).status_code == 200, timeout_s=120, what="/readyz"
        )


@pytest.fixture(scope="module")
def deployed(ray_serve: str, broker, s3_server, tmp_path_factory) -> Any:
    from ray import serve
    from ray._common.utils import import_attr

    from harness.chaos.proxy import ChaosProxy
    from workers.model.loading import build_tiny_random

    tmp = tmp_path_factory.mktemp("deploy")
    tokens_file = tmp / "tokens"
    tokens_file.write_text(f"# one per line\n{TOKEN}\n")
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
        broker.bootstrap_servers,
        s3_server,
        model=ModelConfig(source=f"s3://{BUCKET}/models/tiny/", cache_dir=tmp / "cache", torch_threads=1),
        s3=s3_server.s3_config(endpoint_url=proxy.url, allowed_buckets=[BUCKET], max_attempts=2, backoff_s=0.01),
        limits=LimitsConfig(max_http_body_bytes=BODY_LIMIT, max_image_pixels=1_000_000),
        # serve.yaml binds beyond loopback, so auth is required: the token from a mounted file.
        http=HttpConfig(auth="required", auth_tokens_file=tokens_file, allow_s3_references=True),
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
    yield Deployed(ray_serve, settings, gate, tokens_file)
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
    raw = deployed.http.post(
        f"{deployed.url}/v1/captions", data=png_bytes(501), headers={"content-type": "image/png"}, timeout=60
    )
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert RESULT_KEYS <= set(body) and body["caption"] and (body["width"], body["height"]) == (48, 40)
    assert body["params"]["beam_size"] == 2 and body["id"].startswith("upload:")

    form = deployed.http.post(
        f"{deployed.url}/v1/captions",
        files={"image": ("cat.png", png_bytes(502), "image/png")},
        data={"params": json.dumps({"beam_size": 1}), "id": "my-cat", "metadata": json.dumps({"k": "v"})},
        timeout=60,
    )
    assert form.status_code == 200, form.text
    body = form.json()
    assert (body["id"], body["image"], body["params"]["beam_size"], body["metadata"]) == (
        "my-cat",
        "upload:cat.png",
        1,
        {"k": "v"},
    )

    uri = upload(s3_server, "http/ref.png", png_bytes(503))
    ref = deployed.http.post(f"{deployed.url}/v1/captions", json={"image": uri, "id": "ref"}, timeout=60)
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
        ("lone surrogate id", 400, "invalid_message"),  # was a 500: the answer could not be encoded
        ("infinite temperature", 400, "invalid_message"),  # passes `gt=0`; JSON cannot carry it
    ],
)
def test_bad_input_gets_the_right_4xx_and_code(deployed, kind, status, code):
    deployed.ready()
    url = f"{deployed.url}/v1/captions"
    post = {
        "oversize body": lambda: deployed.http.post(
            url, data=b"\0" * (BODY_LIMIT + 1), headers={"content-type": "image/png"}, timeout=30
        ),
        "bad json": lambda: deployed.http.post(
            url, data=b"{nope", headers={"content-type": "application/json"}, timeout=30
        ),
        "bad params": lambda: deployed.http.post(
            url, json={"image": f"s3://{BUCKET}/x.png", "params": {"beam_size": 0}}, timeout=30
        ),
        "forbidden bucket": lambda: deployed.http.post(url, json={"image": "s3://elsewhere/x.png"}, timeout=30),
        "not s3": lambda: deployed.http.post(url, json={"image": "http://169.254.169.254/latest/"}, timeout=30),
        "missing object": lambda: deployed.http.post(
            url, json={"image": f"s3://{BUCKET}/http/missing.png"}, timeout=30
        ),
        "non-image": lambda: deployed.http.post(
            url, data=b"plain text, not pixels", headers={"content-type": "image/png"}, timeout=30
        ),
        "too many pixels": lambda: deployed.http.post(
            url, data=flat_png((1500, 1000)), headers={"content-type": "image/png"}, timeout=30
        ),
        "lone surrogate id": lambda: deployed.http.post(
            url,
            data=f'{{"id": "\\ud800", "image": "s3://{BUCKET}/http/ref.png"}}'.encode(),
            headers={"content-type": "application/json"},
            timeout=30,
        ),
        "infinite temperature": lambda: deployed.http.post(
            url,
            data=png_bytes(506),
            params={"params": '{"temperature": Infinity, "do_sample": true}'},
            headers={"content-type": "image/png"},
            timeout=30,
        ),
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
    assert requests.get(f"{deployed.url}{INFO_PATH}", timeout=30).status_code == 401, "the token is required"
    info = requests.get(f"{deployed.url}{INFO_PATH}", headers=AUTH, timeout=30).json()
    assert (info["height"], info["width"]) == (32, 32) and info["model"]["untrained"] is True
    rng = np.random.default_rng(7)
    items = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), GenerationParams(beam_size=b)) for b in (1, 2, 1)]
    response = requests.post(
        f"{deployed.url}{BATCH_PATH}",
        data=encode_batch(items),
        headers={"content-type": CONTENT_TYPE, **AUTH},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answers = decode_answers(response.json(), 3)
    assert all(a.captions and a.error is None for a in answers)
    bad = requests.post(
        f"{deployed.url}{BATCH_PATH}",
        data=b"\0\0\0\xffnope",
        headers={"content-type": CONTENT_TYPE, **AUTH},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_message"


def test_the_ingest_consumes_kafka_through_the_batch_endpoint(deployed, broker, s3_server):
    """`captioner run`'s path: a Pipeline over HttpReplicas (no Ray handle) against the app."""
    from workers.pipeline import Pipeline
    from workers.replica_http import HttpReplicas

    deployed.ready()
    kafka = deployed.settings.kafka
    uris = [upload(s3_server, f"ingest/{i}.png", png_bytes(600 + i)) for i in range(4)]
    produce(kafka.bootstrap_servers, kafka.input_topic, [request(u, id=f"k{i}") for i, u in enumerate(uris)])
    replicas = HttpReplicas(deployed.url, timeout_s=60, token=TOKEN)
    pipeline = Pipeline(deployed.settings, replicas).start()
    try:
        results, dead = collect_outcomes(kafka, len(uris), timeout=120)
    finally:
        pipeline.stop()
        replicas.close()
    assert dead == []
    assert sorted(json.loads(r.value)["id"] for r in results) == [f"k{i}" for i in range(len(uris))]
    assert all(json.loads(r.value)["model"]["name"] == f"s3://{BUCKET}/models/tiny/" for r in results)


# -- a guarded ingress on the same replicas: auth, admission limits, hostile input ----------------

GUARD_PREFIX = "/guarded"
GUARD_BODY_BUDGET = 150_000  # http.max_body_bytes_in_flight: one 100 kB upload fits, two do not
ALLOWED_CODES = {str(c) for c in ErrorCode} | {"unauthorized"}


@pytest.fixture(scope="module")
def guarded(deployed) -> str:
    """CaptionIngress alone, bound to the first app's replicas, with s3:// references off and
    room for two requests at once; yields its captions URL."""
    from ray import serve

    from deployment.app import ingress_deployment
    from workers.replicas import DEPLOYMENT_NAME

    deployed.ready()
    settings = deployed.settings.model_copy(
        update={
            "http": HttpConfig(
                auth="required",
                auth_tokens_file=deployed.tokens_file,
                allow_s3_references=False,
                max_concurrent_requests=2,
                max_body_bytes_in_flight=GUARD_BODY_BUDGET,
            ),
            "metrics": MetricsConfig(port=0),
        }
    )
    replicas = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    serve.run(
        ingress_deployment(settings).bind(settings.portable(), replicas), name="deploy-guard", route_prefix=GUARD_PREFIX
    )
    yield deployed.base + GUARD_PREFIX + "/v1/captions"
    serve.delete("deploy-guard")


def _slow_upload(url: str, declared: int) -> socket.socket:
    """A request whose body is declared but only begun: it holds its slot and body bytes."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {declared}\r\n\r\n".encode()
        + b"\0" * 10
    )
    return conn


def _finish(conn: socket.socket, declared: int) -> int:
    conn.sendall(b"\0" * (declared - 10))
    status = int(conn.recv(4096).split(b" ", 2)[1])
    conn.close()
    return status


def _probe(url: str, size: int = 1000) -> requests.Response:
    return requests.post(url, data=b"\0" * size, headers={**AUTH, "content-type": "image/png"}, timeout=30)


def test_guarded_refuses_s3_references_and_missing_tokens(guarded, deployed):
    ref = requests.post(guarded, json={"image": f"s3://{BUCKET}/http/ref.png"}, headers=AUTH, timeout=30)
    assert ref.status_code == 403 and ref.json()["error"]["code"] == "forbidden_reference", ref.text
    upload = requests.post(guarded, data=png_bytes(504), headers={"content-type": "image/png"}, timeout=30)
    assert upload.status_code == 401 and upload.headers["www-authenticate"] == "Bearer"
    assert upload.json()["error"]["code"] == "unauthorized"
    ok = requests.post(guarded, data=png_bytes(504), headers={**AUTH, "content-type": "image/png"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["caption"], ok.text
    # The first app: no token, no caption; /healthz and /readyz stay open (above).
    assert requests.post(f"{deployed.url}/v1/captions", data=png_bytes(505), timeout=30).status_code == 401


def _refused_for(url: str, size: int, limit: str, held: list[socket.socket]) -> None:
    """Wait until a probe of `size` bytes gets 429 naming `limit`; a timeout says what the probes
    got and whether a held upload was answered early (it would no longer hold its slot)."""
    seen: list[str] = []

    def refused() -> bool:
        answer = _probe(url, size)
        reason = answer.text
        seen.append(f"{answer.status_code} {reason}"[:160])
        return answer.status_code == 429 and limit in reason

    try:
        wait_until(refused, timeout_s=60, what=f"429 for {limit}")
    except TimeoutError as e:
        answered = [i for i, conn in enumerate(held) if select.select([conn], [], [], 0)[0]]
        raise AssertionError(f"{e}; last probes: {seen[-3:]}; held uploads answered early: {answered}") from e


def test_requests_over_the_concurrency_limit_get_429_at_once(guarded):
    # The first upload declares most of the body budget, so that a probe can see it admitted (the
    # budget refuses a second large body) before the second is sent: each hold is known to be in.
    held = [_slow_upload(guarded, 100_000)]
    try:
        _refused_for(guarded, 60_000, "max_body_bytes_in_flight", held)
        held.append(_slow_upload(guarded, 1000))  # max_concurrent_requests = 2
        _refused_for(guarded, 1000, "max_concurrent_requests", held)
        refused = _probe(guarded)
        assert refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"] == "1"
    finally:
        statuses = [_finish(conn, declared) for conn, declared in zip(held, (100_000, 1000), strict=False)]
    assert statuses == [422, 422]  # the held uploads themselves were answered (zeros: invalid_image)
    assert _probe(guarded).status_code == 422  # slots given back


def test_bodies_over_the_in_flight_byte_budget_get_429(guarded):
    held = _slow_upload(guarded, 100_000)
    try:
        _refused_for(guarded, 100_000, "max_body_bytes_in_flight", [held])
        assert _probe(guarded, 10_000).status_code == 422  # a small one still fits beside it
    finally:
        assert _finish(held, 100_000) == 422
    assert _probe(guarded, 100_000).status_code == 422  # bytes given back


def _send(url: str, case: Case) -> tuple[int, bytes, str]:
    if case.raw is not None:
        host, port = url.split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(case.raw)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        content_type = next(
            (
                line.split(b":", 1)[1].strip().decode("latin-1")
                for line in head.split(b"\r\n")[1:]
                if line.lower().startswith(b"content-type:")
            ),
            "",
        )
        return int(head.split(b" ", 2)[1]), body, content_type
    headers = dict(case.headers)
    if case.authorised:
        headers.update(AUTH)
    response = requests.post(
        url + (f"?{case.query}" if case.query else ""), data=case.body, headers=headers, timeout=60
    )
    return response.status_code, response.content, response.headers.get("content-type", "")


def test_hundreds_of_malformed_requests_each_get_a_4xx_with_a_code(guarded):
    path = "/" + guarded.split("//")[1].split("/", 1)[1]
    cases = fuzz_cases(seed=10, token=TOKEN, bucket=BUCKET, path=path)
    assert len(cases) >= 250
    failures, protocol = [], []
    for case in cases:
        status, body, content_type = _send(guarded, case)
        if case.protocol and "json" not in content_type:
            # Refused by the HTTP server before the application (uvicorn's plain-text 400).
            protocol.append(case.name)
            if status != 400:
                failures.append(f"{case.name}: {status} {body[:200]!r}")
            continue
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if not (400 <= status < 500 and code in ALLOWED_CODES):
            failures.append(f"{case.name}: {status} {body[:200]!r}")
        elif case.expect_status is not None and (status, code) != (case.expect_status, case.expect_code):
            failures.append(f"{case.name}: expected {case.expect_status} {case.expect_code}, got {status} {code}")
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures)
    assert len(protocol) <= sum(c.protocol for c in cases) and len(cases) - len(protocol) >= 250
