"""`captioner submit`: one request per image, from an s3:// prefix or from local files uploaded first.

Talks to a running system only: embedded settings are refused (an embedded broker started here
would vanish with this process, and the requests with it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers import contract
from workers.config import Settings
from workers.images import IMAGE_SUFFIXES
from workers.kafkaclient import producer_kwargs
from workers.s3 import bucket_allowed, is_s3_uri, join_uri, list_objects, make_s3_client, split_uri

log = logging.getLogger(__name__)

UPLOAD_PREFIX = "submitted"


class SubmitError(ValueError):
    """A submit that cannot start; the message says what to change."""


def submit(settings: Settings, inputs: list[str], *, topic: str | None = None, bucket: str | None = None) -> int:
    """Produce `{"id": name, "image": "s3://..."}` per image; returns how many were produced."""
    if settings.kafka.embedded or settings.s3.embedded:
        raise SubmitError(
            "submit needs a running system: set kafka.bootstrap_servers and s3.endpoint_url to real "
            "addresses (they are 'embedded'; an embedded server would stop when submit exits)"
        )
    if not inputs:
        raise SubmitError("nothing to submit: give an s3://bucket/prefix or image files")
    allowed = settings.s3.allowed_buckets
    s3 = make_s3_client(settings.s3)
    requests: list[dict[str, str]] = []
    for item in inputs:
        if is_s3_uri(item):
            requests.extend(_requests_from_prefix(s3, item, allowed))
        else:
            target = bucket or _default_bucket(allowed)
            requests.extend(_requests_from_files(s3, Path(item), target, allowed))
    return _produce(settings, topic or settings.kafka.input_topic, requests)


def _default_bucket(allowed: list[str]) -> str:
    named = [b for b in allowed if b != "*"]
    if not named:
        raise SubmitError("no bucket to upload to: pass --bucket or allow-list one in s3.allowed_buckets")
    return named[0]


def _check_allowed(bucket: str, allowed: list[str]) -> None:
    # The worker would dead-letter every request as forbidden_reference; say so now instead.
    if not bucket_allowed(bucket, allowed):
        raise SubmitError(f"bucket {bucket!r} is not in s3.allowed_buckets {allowed}")


def _requests_from_prefix(s3: Any, uri: str, allowed: list[str]) -> Iterator[dict[str, str]]:
    try:
        bucket, prefix = split_uri(uri)
    except ValueError as e:
        raise SubmitError(str(e)) from None
    _check_allowed(bucket, allowed)
    found = 0
    for obj in list_objects(s3, bucket, prefix):
        if Path(obj.key).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        found += 1
        yield {"id": obj.key.rsplit("/", 1)[-1], "image": join_uri(bucket, obj.key)}
    if not found:
        log.warning("no image objects under %s", uri)


def _requests_from_files(s3: Any, path: Path, bucket: str, allowed: list[str]) -> Iterator[dict[str, str]]:
    _check_allowed(bucket, allowed)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        raise SubmitError(f"no such file or directory: {path}")
    for file in files:
        data = file.read_bytes()
        # Content-addressed: the same bytes upload to the same key, so re-submitting is free of
        # duplicates in the bucket, and two different files with one name cannot collide.
        key = f"{UPLOAD_PREFIX}/{hashlib.sha256(data).hexdigest()[:16]}/{file.name}"
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        yield {"id": file.name, "image": join_uri(bucket, key)}


def _produce(settings: Settings, topic: str, requests: list[dict[str, str]]) -> int:
    from kafka import KafkaProducer

    producer = KafkaProducer(**producer_kwargs(settings.kafka, settings.limits))
    try:
        futures = [producer.send(topic, value=contract.encode(r), key=r["id"].encode("utf-8")) for r in requests]
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=0)  # raises the delivery error, if any
    finally:
        producer.close(timeout=10)
    log.info("submitted %d request(s) to %s", len(requests), topic)
    return len(requests)
