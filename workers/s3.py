"""S3 references and the S3 client: the one home for the scheme, splitting, listing and the allow-list.

Every `s3://` string in the project goes through here: image references in requests, `caption`
and `submit` prefixes, model sources. The rules (see README, "References"):
- the scheme is case-insensitive (`S3://` is `s3://`); bucket names are not;
- an image reference needs a bucket and a key that does not escape its prefix (`..`);
- only allow-listed buckets may be read (`'*'` allows any, not recommended).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from workers.config import S3Config
from workers.contract import ErrorCode, Rejected, short_repr

S3_SCHEME = "s3://"


def is_s3_uri(text: object) -> bool:
    return isinstance(text, str) and text[: len(S3_SCHEME)].lower() == S3_SCHEME


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/rest` → (bucket, rest); ValueError when it is not an s3:// URI with a bucket."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {short_repr(uri)}")
    bucket, _, rest = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {short_repr(uri)}")
    return bucket, rest


def join_uri(bucket: str, key: str) -> str:
    return f"{S3_SCHEME}{bucket}/{key}"


def bucket_allowed(bucket: str, allowed_buckets: list[str]) -> bool:
    return "*" in allowed_buckets or bucket in allowed_buckets


@dataclass(frozen=True)
class ImageRef:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return join_uri(self.bucket, self.key)


def parse_image_ref(uri: str, allowed_buckets: list[str]) -> ImageRef:
    """`s3://bucket/key` → ImageRef, or Rejected(forbidden_reference)."""
    if not is_s3_uri(uri):
        raise Rejected(ErrorCode.FORBIDDEN_REFERENCE, f"only s3:// references are allowed, got {short_repr(uri)}")
    try:
        bucket, key = split_uri(uri)
    except ValueError as e:
        raise Rejected(ErrorCode.FORBIDDEN_REFERENCE, str(e)) from None
    if not key or key.endswith("/"):
        raise Rejected(ErrorCode.FORBIDDEN_REFERENCE, f"no object key in {short_repr(uri)}")
    if ".." in key.split("/") or posixpath.normpath("/" + key) != "/" + key.rstrip("/"):
        raise Rejected(ErrorCode.FORBIDDEN_REFERENCE, f"key must not escape its prefix: {short_repr(uri)}")
    if not bucket_allowed(bucket, allowed_buckets):
        raise Rejected(ErrorCode.FORBIDDEN_REFERENCE, f"bucket {bucket!r} is not allow-listed")
    return ImageRef(bucket, key)


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str


def list_objects(client: Any, bucket: str, prefix: str) -> Iterator[ListedObject]:
    """Every object under `prefix`, in the server's (key) order, without "folder" marker objects."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield ListedObject(obj["Key"], int(obj.get("Size", 0)), str(obj.get("ETag", "")))


def make_s3_client(cfg: S3Config) -> Any:
    """A boto3 S3 client: signature v4, the standard credential chain, our timeouts.

    `cfg.endpoint_url` must already be resolved (not 'embedded'): the runner replaces it with
    the embedded server's URL before any stage starts.
    """
    if cfg.embedded:
        raise ValueError("s3.endpoint_url is 'embedded': start the embedded server and resolve it first")
    return boto3.session.Session().client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        config=BotoConfig(
            signature_version="s3v4",
            s3={"addressing_style": cfg.addressing_style},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            max_pool_connections=cfg.max_pool_connections,
            # Our own retry loop classifies errors; botocore's would hide 5xx counts from it.
            # (total_max_attempts counts the first try; botocore's max_attempts counts retries only.)
            retries={"total_max_attempts": 1, "mode": "standard"},
        ),
    )
