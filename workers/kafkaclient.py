"""kafka-python keyword arguments built from KafkaConfig, shared by consumer, producer and admin.

One place decides security settings and size limits, so the three clients cannot drift apart.
The SASL password is unwrapped from its SecretStr only here, into the kwargs; never log them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from workers.config import KafkaConfig, LimitsConfig
from workers.contract import MAX_ECHO_BYTES

log = logging.getLogger(__name__)

# Room for the record batch, headers and key around a value of the maximum size.
RECORD_OVERHEAD_BYTES = 64 * 1024
KAFKA_PYTHON_DEFAULT_MAX_REQUEST = 1024 * 1024
KAFKA_PYTHON_DEFAULT_FETCH_MAX = 50 * 1024 * 1024

# kafka-python (3.0.12) logs every request and response at DEBUG with its repr, and a SASL PLAIN
# authenticate request's repr is the credentials in clear:
# "SaslAuthenticateRequest(auth_bytes=b'user\x00user\x00password')". These are the loggers that
# print requests; their SASL payloads are redacted before any handler sees them.
_KAFKA_REQUEST_LOGGERS = ("kafka.net.connection", "kafka.protocol.parser")
_SASL_PAYLOAD_TYPES = frozenset(
    {"SaslAuthenticateRequest", "SaslAuthenticateResponse", "SaslBytesRequest", "SaslBytesResponse"}
)


class _RedactSaslPayloads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(type(a).__name__ in _SASL_PAYLOAD_TYPES for a in record.args):
            record.args = tuple(
                f"{type(a).__name__}(auth_bytes=<redacted>)" if type(a).__name__ in _SASL_PAYLOAD_TYPES else a
                for a in record.args
            )
        return True


_SASL_REDACTION = _RedactSaslPayloads()
for _name in _KAFKA_REQUEST_LOGGERS:
    logging.getLogger(_name).addFilter(_SASL_REDACTION)  # idempotent: addFilter skips duplicates


class RawHeaderKey(str):
    """A header key that was not UTF-8: its bytes kept as surrogate escapes, and encoded back to
    the same bytes (kafka-python re-encodes keys to size records)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, encoding, "surrogateescape")


class _LenientBytes(bytearray):
    """A slice of a record batch whose decode never raises (see decode_header_keys_leniently)."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        try:
            return bytearray.decode(self, encoding)
        except UnicodeDecodeError:
            return RawHeaderKey(bytearray.decode(self, encoding, "surrogateescape"))


class _LenientBuffer(bytearray):
    def __getitem__(self, index: Any) -> Any:
        item = bytearray.__getitem__(self, index)
        return _LenientBytes(item) if isinstance(index, slice) else item


def decode_header_keys_leniently() -> None:
    """Make kafka-python decode record header keys with `surrogateescape`, not strict UTF-8.

    kafka-python (3.0.12, pinned) decodes header keys inside `poll()`; a record written by a
    client that allows other bytes there (the protocol says String, Go and librdkafka clients
    do not check) raises UnicodeDecodeError out of every poll, on every redelivery: one record
    would stop the partition and crash-loop the group. Decoded leniently, such a key reaches the
    pipeline, which dead-letters the record as invalid_message (`contract.parse_request`) and
    drops the header from the outcomes (`contract.producible_headers`). Idempotent.
    """
    from kafka.record import default_records

    batch = default_records.DefaultRecordBatch
    original = batch._read_msg
    if getattr(original, "captioner_lenient", False):
        return

    def _read_msg(self: Any, *args: Any, **kwargs: Any) -> Any:
        if type(self._buffer) is not _LenientBuffer:
            self._buffer = _LenientBuffer(self._buffer)  # once per batch
        return original(self, *args, **kwargs)

    _read_msg.captioner_lenient = True  # type: ignore[attr-defined]
    batch._read_msg = _read_msg


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection and security kwargs valid for KafkaConsumer, KafkaProducer and KafkaAdminClient."""
    if cfg.embedded:
        raise ValueError("kafka.bootstrap_servers is 'embedded': start the embedded broker and resolve it first")
    kwargs: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in cfg.bootstrap_servers.split(",") if s.strip()],
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_check_hostname"] = cfg.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(cfg, name)
            if path is not None:
                kwargs[name] = str(path)
    if cfg.security_protocol.startswith("SASL"):
        # The config validator guarantees all three are set for SASL protocols.
        assert cfg.sasl_password is not None
        kwargs["sasl_mechanism"] = cfg.sasl_mechanism
        kwargs["sasl_plain_username"] = cfg.sasl_username
        kwargs["sasl_plain_password"] = cfg.sasl_password.get_secret_value()
    return kwargs


def redacted(kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs safe to log: secrets replaced."""
    return {k: ("<secret>" if "password" in k and v is not None else v) for k, v in kwargs.items()}


def consumer_kwargs(cfg: KafkaConfig, limits: LimitsConfig) -> dict[str, Any]:
    """A group member that commits by hand and starts at earliest (CONTRACT-NOTES: no skipped requests).

    Fetch sizes sit above limits.max_message_bytes: kafka-python's 1 MB per-partition default
    would otherwise hold back requests the contract says must be read (and too-big ones must
    still be read, to be dead-lettered).
    """
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor

    partition_fetch = limits.max_message_bytes + RECORD_OVERHEAD_BYTES
    return {
        **client_kwargs(cfg),
        "group_id": cfg.group_id,
        # Incremental rebalances: a member joining or leaving moves only the partitions that
        # change owner, so the others keep flowing (no stop-the-world revoke of everything).
        "partition_assignment_strategy": (CooperativeStickyAssignor,),
        # A transactional producer's aborted records are not requests.
        "isolation_level": "read_committed",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": max(partition_fetch, 1024 * 1024),
        "fetch_max_bytes": max(KAFKA_PYTHON_DEFAULT_FETCH_MAX, 2 * partition_fetch),
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        "max_poll_interval_ms": cfg.max_poll_interval_ms,
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
    }


def producer_kwargs(cfg: KafkaConfig, limits: LimitsConfig) -> dict[str, Any]:
    """acks=all + idempotence: an acknowledged outcome is on the broker, retries do not duplicate.

    max_request_size covers the biggest record we produce: a request of max_message_bytes
    (submit) or a dead letter echoing MAX_ECHO_BYTES base64-encoded, plus overhead.
    """
    biggest_record = max(limits.max_message_bytes, MAX_ECHO_BYTES * 4 // 3 + 4096) + RECORD_OVERHEAD_BYTES
    return {
        **client_kwargs(cfg),
        "acks": "all",
        "enable_idempotence": True,
        "max_request_size": max(KAFKA_PYTHON_DEFAULT_MAX_REQUEST, biggest_record),
        # Small linger: a burst of results shares a request without adding visible latency.
        "linger_ms": 5,
    }


def ensure_topics(
    cfg: KafkaConfig,
    topics: Iterable[str],
    *,
    partitions: int = 1,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist (idempotent) and wait until metadata lists them all.

    Returns the names this call created. An existing topic is left as it is, whatever its
    partition count (Tansu cannot add partitions anyway).
    """
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError, for_code

    wanted = list(dict.fromkeys(topics))
    admin = KafkaAdminClient(**client_kwargs(cfg), request_timeout_ms=int(timeout_s * 1000))
    created: list[str] = []
    try:
        listed = set(admin.list_topics())
        missing = [t for t in wanted if t not in listed]
        if missing:
            response = admin.create_topics(
                {t: {"num_partitions": partitions, "replication_factor": replication_factor} for t in missing},
                raise_errors=False,
            )
            for topic in response["topics"]:
                error = for_code(topic["error_code"])
                if topic["error_code"] == 0:
                    created.append(topic["name"])
                elif error is not TopicAlreadyExistsError:  # a concurrent creator won: fine
                    raise error(f"creating topic {topic['name']!r}: {topic.get('error_message')}")
        deadline = time.monotonic() + timeout_s
        while True:
            listed = set(admin.list_topics())
            absent = [t for t in wanted if t not in listed]
            if not absent:
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"topics {absent} not in broker metadata after {timeout_s:.0f} s")
            time.sleep(0.05)
    finally:
        admin.close()
    if created:
        log.info("created topic(s) %s with %d partition(s)", created, partitions)
    return created


class TopicNotReady(RuntimeError):
    """The input topic is missing or has too few partitions for the configured consumers."""


def check_input_topic(cfg: KafkaConfig, min_partitions: int, *, timeout_s: float = 30.0) -> int:
    """The input topic's partition count, or TopicNotReady saying what to provision.

    Production topics are not auto-created: a consumer group larger than the partition count
    leaves members idle, so the ingest refuses to start below `kafka.min_input_partitions`
    (the KEDA ScaledObject's maxReplicaCount) instead of silently under-using its pods.
    """
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        **client_kwargs(cfg), enable_auto_commit=False, request_timeout_ms=int(timeout_s * 1000) + 1000
    )
    try:
        deadline = time.monotonic() + timeout_s
        partitions = consumer.partitions_for_topic(cfg.input_topic)
        while partitions is None and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(cfg.input_topic)
    finally:
        consumer.close()
    if not partitions:
        raise TopicNotReady(
            f"input topic {cfg.input_topic!r} does not exist on {cfg.bootstrap_servers}; create it with at "
            f"least {min_partitions} partitions (kafka.min_input_partitions; topics are not auto-created "
            "when kafka.create_topics is false)"
        )
    if len(partitions) < min_partitions:
        raise TopicNotReady(
            f"input topic {cfg.input_topic!r} has {len(partitions)} partition(s); kafka.min_input_partitions "
            f"asks for at least {min_partitions} (one per ingest pod at KEDA's maxReplicaCount)"
        )
    return len(partitions)
