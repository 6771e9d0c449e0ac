"""Shared pieces for the streaming-worker tests: Ray, a deployed tiny replica app, settings, images."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from helpers.kafka_helpers import kafka_config
from workers.config import (
    LimitsConfig,
    MetricsConfig,
    ModelConfig,
    RayConfig,
    ReplicasConfig,
    Settings,
    WorkerConfig,
)

REPO = Path(__file__).resolve().parents[2]
# Short on purpose: Ray's unix sockets live below it, and AF_UNIX paths stop at 107 bytes.
RAY_TMP = Path(os.environ.get("CAPTIONER_TEST_RAY_TMP", f"/tmp/captioner-test-ray-{os.getuid()}"))
MODEL_CACHE = REPO / ".tmp" / "models"
BUCKET = "images"


def tiny_model_config() -> ModelConfig:
    # float32, not auto: the stream tests compare captions with torch/TF references.
    return ModelConfig(source="tiny-random", cache_dir=MODEL_CACHE, torch_threads=1, dtype="float32")


def start_test_ray(num_gpus: int = 2) -> None:
    """Ray for tests: loopback, a temp dir in the tree, fake GPUs for the pinning tests."""
    from workers.runner import start_ray

    RAY_TMP.mkdir(parents=True, exist_ok=True)
    start_ray(RayConfig(num_cpus=4, num_gpus=num_gpus, temp_dir=RAY_TMP))


@pytest.fixture(scope="session")
def ray_serve(s3_server: Any) -> Iterator[str]:
    """One Ray cluster + Serve for the whole run (a start costs ~6 s); yields the HTTP base URL."""
    import ray
    from ray import serve

    from workers.embedded import free_port

    # Workers inherit the driver's environment: give them (and our fetchers) the S3 keys.
    os.environ.update({k: v for k, v in s3_server.env().items() if k.startswith("AWS_")})
    start_test_ray()
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@contextlib.contextmanager
def tiny_replicas(name: str, replicas: ReplicasConfig | None = None) -> Iterator[Any]:
    """The tiny model's replicas as Serve app `name`, deleted on exit; yields the handle."""
    from ray import serve

    from workers.replicas import replica_app

    replicas = replicas or ReplicasConfig(num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.05)
    try:
        yield serve.run(replica_app(tiny_model_config(), None, replicas), name=name, route_prefix=None)
    finally:
        serve.delete(name)


def worker_settings(bootstrap: str, s3_server: Any, **sections: Any) -> Settings:
    values: dict[str, Any] = {
        "model": tiny_model_config(),
        "kafka": kafka_config(bootstrap, commit_interval_s=0.2, poll_timeout_ms=100),
        "s3": s3_server.s3_config(allowed_buckets=[BUCKET, "private"], max_attempts=2, backoff_s=0.01),
        "replicas": ReplicasConfig(num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.05),
        "worker": WorkerConfig(max_in_flight=32, drain_timeout_s=30, revoke_grace_s=2),
        "limits": LimitsConfig(max_object_bytes=2_000_000, max_image_pixels=4_000_000),
        "metrics": MetricsConfig(port=0),
    }
    values.update(sections)
    return Settings(**values)


def png_bytes(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> bytes:
    """A distinct small image per seed (distinct bytes, so the caption cache never answers)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(arr.squeeze() if channels == 1 else arr, mode)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def flat_png(size: tuple[int, int]) -> bytes:
    """A single-colour image: many pixels, few bytes (what a decompression bomb looks like)."""
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


def upload(s3_server: Any, key: str, data: bytes, bucket: str = BUCKET) -> str:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def request(image: str, **fields: Any) -> bytes:
    return json.dumps({"image": image, **fields}).encode()


def outcomes_by_offset(records: list[Any]) -> dict[tuple[int, int], dict[str, Any]]:
    """(partition, offset) of the request → its result or dead letter body."""
    out = {}
    for r in records:
        body = json.loads(r.value)
        out[(body["source"]["partition"], body["source"]["offset"])] = body
    return out


def collect_outcomes(kafka: Any, count: int, *, timeout: float = 60) -> tuple[list[Any], list[Any]]:
    """Read results and dead letters (from the earliest offset) until `count` arrived in all,
    connecting the way `kafka` says (TLS included)."""
    from workers.outcomes import outcome_reader

    with outcome_reader(kafka) as reader:
        records = reader.read_until(lambda got: len(got) >= count, timeout_s=timeout, what=f"{count} outcomes")
    return (
        [r for r in records if r.topic == kafka.output_topic],
        [r for r in records if r.topic == kafka.dead_letter_topic],
    )
