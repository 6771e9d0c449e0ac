"""S3 fetch stage: allow-list, size limit before download, retries; bytes out."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from workers.config import S3Config


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
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    )
