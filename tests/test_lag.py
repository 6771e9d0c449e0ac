"""`captioner lag` and the worker's lag gauge against a group with known offsets, on the real broker.

Records are produced one at a time, each flushed: Tansu's end offset is the newest batch's base
offset + 1 (workers/ops/lag.py), right only for one-record batches. The first assertion of each
test checks that precondition, so a wrong end offset fails loudly instead of a wrong lag."""

from __future__ import annotations

import json

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from helpers.kafka_helpers import kafka_config, unique_topic
from workers.kafkaclient import ensure_topics
from workers.ops.lag import (
    OffsetSnapshot,
    forget_assignment_lag,
    group_lag,
    lag_rows,
    observe_assignment_lag,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(autouse=True)
def _no_cli_logging_left_behind():
    """The CLI installs a root log handler; later tests should not inherit it."""
    from workers.logs import unconfigure_logging

    yield
    unconfigure_logging()


def produce_one_by_one(bootstrap: str, topic: str, partition: int, count: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i in range(count):
            producer.send(topic, value=b"r%d" % i, partition=partition).get(timeout=10)
    finally:
        producer.close()


def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
    finally:
        consumer.close(autocommit=False)


@pytest.fixture
def known_group(broker):
    """A 2-partition topic with 3 and 5 records; the group committed 1 on partition 0, nothing on 1."""
    cfg = kafka_config(broker.bootstrap_servers)
    ensure_topics(cfg, [cfg.input_topic], partitions=2)
    produce_one_by_one(broker.bootstrap_servers, cfg.input_topic, 0, 3)
    produce_one_by_one(broker.bootstrap_servers, cfg.input_topic, 1, 5)
    p0, p1 = TopicPartition(cfg.input_topic, 0), TopicPartition(cfg.input_topic, 1)
    probe = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    assert probe.end_offsets([p0, p1]) == {p0: 3, p1: 5}, "the broker's end offsets are wrong: lag cannot be right"
    probe.close()
    commit(broker.bootstrap_servers, cfg.group_id, {p0: 1})
    return cfg


def test_group_lag_counts_from_the_committed_offset_else_the_earliest(broker, known_group) -> None:
    rows = group_lag(known_group, known_group.group_id, [known_group.input_topic], sample_s=0)
    assert [(r.partition, r.committed, r.end, r.lag, r.rate) for r in rows] == [
        (0, 1, 3, 2, None),
        (1, None, 5, 5, None),
    ]


def test_rate_is_the_change_of_lag_over_the_sample(broker, known_group) -> None:
    def more_records_meanwhile(_seconds: float) -> None:
        produce_one_by_one(broker.bootstrap_servers, known_group.input_topic, 1, 4)

    rows = group_lag(
        known_group, known_group.group_id, [known_group.input_topic], sample_s=0.5, sleep=more_records_meanwhile
    )
    assert [(r.partition, r.lag) for r in rows] == [(0, 2), (1, 9)]
    assert rows[0].rate == 0
    assert rows[1].rate is not None and rows[1].rate > 0


def test_lag_command_json_and_table(broker, known_group) -> None:
    from workers.cli import app

    env = {"CAPTIONER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "COLUMNS": "200"}
    args = ["lag", "--group", known_group.group_id, "--topic", known_group.input_topic, "--sample", "0"]
    result = CliRunner().invoke(app, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output)
    assert parsed["group"] == known_group.group_id
    assert [(p["partition"], p["lag"]) for p in parsed["partitions"]] == [(0, 2), (1, 5)]
    table = CliRunner().invoke(app, args, env=env)
    assert table.exit_code == 0 and "total" in table.output and "7" in table.output
    missing = CliRunner().invoke(app, ["lag", "--topic", unique_topic("nope"), "--sample", "0"], env=env)
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_the_gauge_agrees_with_the_command(broker, known_group) -> None:
    topic = known_group.input_topic
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers,
        group_id=known_group.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        consumer.assign([p0, p1])
        read = 0
        for _ in range(50):  # until both partitions answered a fetch (each carries the high watermark)
            read += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
            if read >= 7:
                break
        observed = observe_assignment_lag(consumer, {p0: 1})
    finally:
        consumer.close(autocommit=False)
    command = {r.partition: r.lag for r in group_lag(known_group, known_group.group_id, [topic], sample_s=0)}
    assert command == {0: 2, 1: 5}
    # Partition 1 has no commit: the gauge counts from the position (everything read), the
    # command from the earliest offset: they agree once the source has committed what it read.
    assert observed == {p0: 2, p1: 0}
    assert REGISTRY.get_sample_value("captioner_consumer_lag", {"topic": topic, "partition": "0"}) == 2
    forget_assignment_lag([p0])  # revoked: the new owner reports it
    assert REGISTRY.get_sample_value("captioner_consumer_lag", {"topic": topic, "partition": "0"}) is None


def test_lag_rows_never_negative_and_rate_from_two_readings() -> None:
    tp = TopicPartition("t", 0)
    first = {tp: OffsetSnapshot(committed=10, beginning=0, end=12)}
    second = {tp: OffsetSnapshot(committed=15, beginning=0, end=13)}
    (row,) = lag_rows(first, second, elapsed_s=2.0)
    assert (row.lag, row.rate, row.end_below_committed) == (0, -1.0, True)
