"""`captioner submit` against the real broker and S3 server."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from helpers.kafka_helpers import consume_until, unique_topic
from workers.config import Settings, load_settings
from workers.embedded import Broker, S3Server
from workers.submit import SubmitError, submit

SAMPLES = Path(__file__).resolve().parents[1] / "workers" / "samples"


@pytest.fixture
def settings(broker: Broker, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return load_settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "input_topic": unique_topic("submit")},
        s3={"endpoint_url": s3_server.endpoint_url, "allowed_buckets": ["images"]},
    )


def requests_on(settings: Settings, count: int) -> list[dict[str, str]]:
    records = consume_until(settings.kafka.bootstrap_servers, settings.kafka.input_topic, count, timeout=10)
    assert all(r.key == json.loads(r.value)["id"].encode() for r in records)
    return sorted((json.loads(r.value) for r in records), key=lambda r: r["image"])


def test_submit_local_files_uploads_then_produces(settings: Settings, s3_server: S3Server) -> None:
    files = [SAMPLES / "chelsea.jpg", SAMPLES / "coffee.jpg"]
    assert submit(settings, [str(f) for f in files]) == 2

    requests = requests_on(settings, 2)
    assert [r["id"] for r in requests] == ["chelsea.jpg", "coffee.jpg"]
    client = s3_server.client()
    for request, file in zip(requests, files, strict=True):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        assert request["image"] == f"s3://images/submitted/{digest}/{file.name}"
        key = request["image"].removeprefix("s3://images/")
        assert client.get_object(Bucket="images", Key=key)["Body"].read() == file.read_bytes()


def test_submit_prefix_lists_one_request_per_image(settings: Settings, s3_server: S3Server) -> None:
    prefix = f"batch-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    for key in ("a.jpg", "b.PNG", "nested/c.jpeg", "notes.txt", "folder/"):
        client.put_object(Bucket="images", Key=f"{prefix}/{key}", Body=b"data")
    client.put_object(Bucket="images", Key=f"{prefix}-other/z.jpg", Body=b"data")

    assert submit(settings, [f"s3://images/{prefix}/"]) == 3
    assert requests_on(settings, 3) == [
        {"id": "a.jpg", "image": f"s3://images/{prefix}/a.jpg"},
        {"id": "b.PNG", "image": f"s3://images/{prefix}/b.PNG"},
        {"id": "c.jpeg", "image": f"s3://images/{prefix}/nested/c.jpeg"},
    ]


def test_submit_refuses_embedded_settings() -> None:
    with pytest.raises(SubmitError, match="running system"):
        submit(load_settings(), [str(SAMPLES / "chelsea.jpg")])


def test_submit_refuses_buckets_outside_the_allow_list(settings: Settings) -> None:
    with pytest.raises(SubmitError, match="allowed_buckets"):
        submit(settings, ["s3://secret-bucket/"])
    with pytest.raises(SubmitError, match="allowed_buckets"):
        submit(settings, [str(SAMPLES / "chelsea.jpg")], bucket="secret-bucket")
