"""Local servers for the demo and the tests: a Tansu Kafka-protocol broker and a SeaweedFS S3 server.

`process` starts and stops child servers (loopback ports, readiness waits, no orphans),
`broker` is Tansu, `s3_server` is SeaweedFS; `resolve_embedded` starts what the settings mark
`embedded` and hands back the resolved settings. Measured behaviour: shared/FIELD-NOTES.md.
"""

from __future__ import annotations

import contextlib
import os

from workers.config import Settings
from workers.embedded.broker import Broker, tansu_binary
from workers.embedded.process import (
    LOOPBACK,
    WEED_GRPC_OFFSET,
    ServerProcess,
    free_port,
    free_ports,
    live_servers,
    wait_until,
)
from workers.embedded.s3_server import S3Server, weed_binary

__all__ = [
    "LOOPBACK",
    "WEED_GRPC_OFFSET",
    "Broker",
    "Embedded",
    "S3Server",
    "ServerProcess",
    "free_port",
    "free_ports",
    "live_servers",
    "resolve_embedded",
    "tansu_binary",
    "wait_until",
    "weed_binary",
]


class Embedded(contextlib.ExitStack):
    """What resolve_embedded started; `settings` has the real addresses. Closing stops it all."""

    settings: Settings
    broker: Broker | None = None
    s3: S3Server | None = None

    def __enter__(self) -> Embedded:
        return self


def resolve_embedded(settings: Settings) -> Embedded:
    """Start what `settings` marks 'embedded' and return a handle with the resolved settings.

        with resolve_embedded(settings) as embedded:
            run(embedded.settings)

    The S3 server's keys go into this process's environment (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY) so the standard credential chain finds them; the previous values
    come back on exit. Allow-listed buckets are created.
    """
    handle = Embedded()
    try:
        kafka, s3 = settings.kafka, settings.s3
        if s3.embedded:
            buckets = [b for b in s3.allowed_buckets if b != "*"]
            server = handle.enter_context(S3Server(region=s3.region, buckets=buckets))
            handle.s3 = server
            for name, value in (("AWS_ACCESS_KEY_ID", server.access_key), ("AWS_SECRET_ACCESS_KEY", server.secret_key)):
                handle.callback(_restore_env, name, os.environ.get(name))
                os.environ[name] = value
            s3 = s3.model_copy(update={"endpoint_url": server.endpoint_url})
        if kafka.embedded:
            broker = handle.enter_context(Broker())
            handle.broker = broker
            kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        handle.settings = settings.model_copy(update={"kafka": kafka, "s3": s3})
    except BaseException:
        handle.close()
        raise
    return handle


def _restore_env(name: str, previous: str | None) -> None:
    if previous is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = previous
