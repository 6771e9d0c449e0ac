"""Small Kafka helpers for tests: fresh consumers that wait on a condition with a deadline."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

# Short group timeouts: the first join waits about half the session timeout (FIELD-NOTES).
TEST_SESSION_TIMEOUT_MS = 6000
TEST_HEARTBEAT_INTERVAL_MS = 1000

Predicate = Callable[[list[ConsumerRecord]], bool]


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def consume_until(
    bootstrap: str,
    topic: str,
    predicate_or_count: Predicate | int,
    timeout: float = 20.0,
) -> list[ConsumerRecord]:
    """Read `topic` from the earliest offset (no group) until the predicate holds over everything
    read so far, or that many records arrived; TimeoutError (with what was read) past `timeout`."""
    from workers.config import KafkaConfig
    from workers.outcomes import TopicReader

    if isinstance(predicate_or_count, int):
        count = predicate_or_count
        done: Predicate = lambda records: len(records) >= count  # noqa: E731
    else:
        done = predicate_or_count
    with TopicReader(KafkaConfig(bootstrap_servers=bootstrap), [topic]) as reader:
        return reader.read_until(done, timeout_s=timeout)


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """partition → the group's committed offset (the next one it will read), None if none."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        return {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    finally:
        consumer.close()


def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes | None],
    keys: Sequence[bytes | None] | None = None,
    headers: Sequence[list[tuple[str, bytes]]] | None = None,
) -> list[Any]:
    """Produce and wait for every ack; returns the RecordMetadata in order."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    try:
        futures = [
            producer.send(
                topic,
                value=value,
                key=keys[i] if keys else None,
                headers=headers[i] if headers else None,
            )
            for i, value in enumerate(values)
        ]
        producer.flush(timeout=30)
        return [f.get(timeout=0) for f in futures]
    finally:
        producer.close(timeout=10)


def group_consumer_kwargs() -> dict[str, int]:
    """Session settings every test group member should use (first join ≈ half the session timeout)."""
    return {"session_timeout_ms": TEST_SESSION_TIMEOUT_MS, "heartbeat_interval_ms": TEST_HEARTBEAT_INTERVAL_MS}


def kafka_config(bootstrap: str, **overrides: Any) -> Any:
    """A KafkaConfig for tests: this broker, unique topics and group, short session timeouts."""
    from workers.config import KafkaConfig

    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": unique_topic("in"),
        "output_topic": unique_topic("out"),
        "dead_letter_topic": unique_topic("dlq"),
        "group_id": unique_topic("group"),
        **group_consumer_kwargs(),
    }
    values.update(overrides)
    return KafkaConfig(**values)
