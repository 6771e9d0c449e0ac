"""Consumer-group lag: per partition, the end offset minus the group's committed offset.

One definition for three readers: `captioner lag` (a snapshot of any group, read from outside
it), the worker's `captioner_consumer_lag{topic,partition}` gauge (its own assignment), and
KEDA's Kafka scaler (which counts the same way). A partition the group never committed is read
from the earliest offset (the worker's `auto_offset_reset`), so its lag counts from there.

Reading a group's offsets never joins it: the consumer here has the group's id (to fetch its
committed offsets) but neither subscribes nor commits, so the group does not rebalance.

Broker caveat (Tansu 0.6, shared/FIELD-NOTES.md): its end offset is the base offset of the
newest record batch plus one, which is right only when that batch holds one record. Behind a
producer that batches, the end offset (and so the lag) is too low; every figure here is as good
as the broker's high watermark.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from kafka import KafkaConsumer
from kafka.structs import TopicPartition
from rich.table import Table

from workers import metrics
from workers.config import KafkaConfig
from workers.kafkaclient import client_kwargs


@dataclass(frozen=True)
class OffsetSnapshot:
    """One reading of a partition: the group's committed offset (None: never committed), and the
    partition's earliest and end offsets."""

    committed: int | None
    beginning: int
    end: int

    @property
    def lag(self) -> int:
        read_from = self.committed if self.committed is not None else self.beginning
        return max(0, self.end - read_from)


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int
    # Change of lag per second between the two readings: > 0 the group falls behind.
    rate: float | None
    # The broker's end offset below what the group committed: impossible on Kafka, seen on Tansu
    # behind a batching producer. The lag shown (0) is then a floor, not a measurement.
    end_below_committed: bool = False


def lag_rows(
    first: Mapping[TopicPartition, OffsetSnapshot],
    second: Mapping[TopicPartition, OffsetSnapshot] | None = None,
    elapsed_s: float = 0.0,
) -> list[PartitionLag]:
    """Rows from one reading, or two readings `elapsed_s` apart (the rate comes from both)."""
    last = second if second is not None else first
    rows = []
    for tp in sorted(last, key=lambda t: (t.topic, t.partition)):
        snap = last[tp]
        rate = None
        if second is not None and tp in first and elapsed_s > 0:
            rate = (snap.lag - first[tp].lag) / elapsed_s
        wrong_end = snap.committed is not None and snap.end < snap.committed
        rows.append(PartitionLag(tp.topic, tp.partition, snap.committed, snap.end, snap.lag, rate, wrong_end))
    return rows


def read_offsets(consumer: KafkaConsumer, partitions: list[TopicPartition]) -> dict[TopicPartition, OffsetSnapshot]:
    """One reading of the group's committed offsets and the partitions' earliest and end offsets."""
    end = consumer.end_offsets(partitions)
    beginning = consumer.beginning_offsets(partitions)
    return {tp: OffsetSnapshot(consumer.committed(tp), beginning[tp], end[tp]) for tp in partitions}


def group_lag(
    kafka: KafkaConfig,
    group: str,
    topics: Iterable[str],
    *,
    sample_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[PartitionLag]:
    """The group's lag on every partition of `topics`, with its rate over `sample_s` (0: no rate).

    LookupError names a topic the broker does not know."""
    consumer = KafkaConsumer(**client_kwargs(kafka), group_id=group, enable_auto_commit=False)
    try:
        partitions: list[TopicPartition] = []
        for topic in topics:
            known = consumer.partitions_for_topic(topic)
            if not known:
                raise LookupError(f"topic {topic!r} does not exist on {kafka.bootstrap_servers}")
            partitions += [TopicPartition(topic, p) for p in sorted(known)]
        started = time.monotonic()
        first = read_offsets(consumer, partitions)
        if sample_s <= 0:
            return lag_rows(first)
        sleep(sample_s)
        second = read_offsets(consumer, partitions)
        return lag_rows(first, second, time.monotonic() - started)
    finally:
        consumer.close(autocommit=False)


def lag_table(group: str, rows: list[PartitionLag]) -> Table:
    table = Table(title=f"consumer group {group}")
    for name in ("topic", "partition", "committed", "end", "lag", "lag/s"):
        table.add_column(name, justify="left" if name == "topic" else "right")
    for r in rows:
        rate = "" if r.rate is None else f"{r.rate:+.1f}"
        table.add_row(
            r.topic,
            str(r.partition),
            "-" if r.committed is None else str(r.committed),
            f"{r.end}{' !' if r.end_below_committed else ''}",
            str(r.lag),
            rate,
        )
    if any(r.end_below_committed for r in rows):
        table.caption = "! end < committed: the broker's end offset is wrong (Tansu, batching producer)"
    if rows:
        total_rate = None if any(r.rate is None for r in rows) else sum(r.rate or 0.0 for r in rows)
        table.add_section()
        table.add_row(
            "total", "", "", "", str(sum(r.lag for r in rows)), "" if total_rate is None else f"{total_rate:+.1f}"
        )
    return table


def lag_json(group: str, rows: list[PartitionLag]) -> str:
    return json.dumps({"group": group, "partitions": [asdict(r) for r in rows]})


# -- the worker's own gauge -------------------------------------------------------------------


def observe_assignment_lag(
    consumer: KafkaConsumer, committed: Mapping[TopicPartition, int | None]
) -> dict[TopicPartition, int]:
    """Set `captioner_consumer_lag` for the consumer's assigned partitions; returns what it set.

    No broker request: the end offset is the high watermark the last fetch response carried
    (`consumer.highwater`), so this is cheap enough for every turn of the poll loop. `committed`
    is the group's committed offset per partition as the caller knows it (the source's last
    successful commit); a partition missing there counts from the consumer's position. A
    partition no fetch has answered yet is skipped (its lag is unknown, not 0).
    """
    observed: dict[TopicPartition, int] = {}
    for tp in consumer.assignment():
        end = consumer.highwater(tp)
        if end is None:
            continue
        read_from = committed.get(tp)
        if read_from is None:
            read_from = consumer.position(tp)
        if read_from is None:
            continue
        observed[tp] = max(0, end - read_from)
        metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(observed[tp])
    return observed


def forget_assignment_lag(partitions: Iterable[TopicPartition]) -> None:
    """Drop revoked partitions' series: their lag is now the new owner's to report."""
    for tp in partitions:
        try:
            metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        except KeyError:
            pass
