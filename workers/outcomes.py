"""Reading results and dead letters back: the one reader the demo, the tests and the chaos run share.

A `TopicReader` reads whole topics from their earliest offset without a consumer group: it
commits nothing and takes part in no rebalance, so it never disturbs the workers' group. It
assigns every partition once the broker's metadata knows all the topics (an outcome topic may
only appear with its first record), connects the way the settings say (TLS and SASL included),
and hands each record out once: a position reset (after a broker restart, the reset goes to the
earliest offset, never the end, FIELD-NOTES: Tansu's end offsets are wrong) re-reads records,
which are dropped and counted in `rereads`.

`Outcome` is one result or dead letter as the records say it: the request's source coordinates,
the Kafka key, and the code (`"result"` for a caption, else the dead letter's error code).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from workers.config import KafkaConfig
from workers.kafkaclient import client_kwargs

RESULT = "result"  # the code of an outcome that is a caption, not a dead letter
_FETCH_BYTES = 8 * 1024 * 1024  # above any outcome the limits allow (a dead letter quotes ≤ 64 KiB)

Coordinate = tuple[str, int, int]  # (topic, partition, offset) of the request an outcome answers


@dataclass(frozen=True)
class Outcome:
    coordinate: Coordinate | None  # None where the record names no source (never, for our records)
    key: bytes | None
    code: str
    body: dict[str, Any]

    @property
    def id(self) -> str | None:
        return self.body.get("id")


def parse_outcome(record: Any) -> Outcome:
    """A result or dead-letter record → Outcome (ValueError if the value is not such a record)."""
    body = json.loads(record.value)
    if not isinstance(body, dict):
        raise ValueError(f"{record.topic}@{record.offset}: not an outcome record")
    source = body.get("source")
    coordinate = (source["topic"], source["partition"], source["offset"]) if source else None
    code = body["error"]["code"] if "error" in body else RESULT
    return Outcome(coordinate, record.key, code, body)


class TopicReader:
    """Reads `topics` from the earliest offset, no group; each record once, in poll order."""

    def __init__(self, kafka: KafkaConfig, topics: Sequence[str], *, max_partition_fetch_bytes: int = _FETCH_BYTES):
        self.topics = list(topics)
        self.rereads = 0  # records read a second time (a position reset) and dropped
        self._consumer = KafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max_partition_fetch_bytes,
            **client_kwargs(kafka),
        )
        self._assigned = False
        self._read: set[tuple[str, int, int]] = set()

    def _assign(self) -> bool:
        partitions = {topic: self._consumer.partitions_for_topic(topic) for topic in self.topics}
        if not all(partitions.values()):
            return False  # one topic has no metadata yet
        self._consumer.assign([TopicPartition(t, p) for t, ps in partitions.items() for p in sorted(ps or ())])
        self._consumer.seek_to_beginning()
        self._assigned = True
        return True

    def poll(self, timeout_ms: int = 200) -> list[Any]:
        """Records not handed out before (an empty list while a topic is still unknown)."""
        if not self._assigned and not self._assign():
            time.sleep(min(timeout_ms, 50) / 1000)
            return []
        fresh = []
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                where = (record.topic, record.partition, record.offset)
                if where in self._read:
                    self.rereads += 1
                    continue
                self._read.add(where)
                fresh.append(record)
        return fresh

    def read_until(self, done: Callable[[list[Any]], bool], *, timeout_s: float, what: str = "records") -> list[Any]:
        """Poll until `done(everything read so far)`; TimeoutError saying what was read past the deadline."""
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while not done(records):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"after {timeout_s:.0f} s on {', '.join(self.topics)} waiting for {what}: "
                    f"{len(records)} record(s) read: {records[:5]}"
                )
            records.extend(self.poll())
        return records

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def outcome_reader(kafka: KafkaConfig, **kwargs: Any) -> TopicReader:
    """A reader of the results and dead-letter topics `kafka` names."""
    return TopicReader(kafka, [kafka.output_topic, kafka.dead_letter_topic], **kwargs)


def outcomes_by_id(
    kafka: KafkaConfig, ids: set[str], *, timeout_s: float, stop: threading.Event | None = None
) -> dict[str, dict[str, Any]]:
    """Read results and dead letters until every id has one, the deadline, or `stop` is set:
    id → record body.

    No error past the deadline: the caller reports the ids that have no outcome.
    """
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    with outcome_reader(kafka) as reader:
        while not set(found) >= ids and time.monotonic() < deadline and not (stop and stop.is_set()):
            for record in reader.poll():
                outcome = parse_outcome(record)
                if outcome.id in ids:
                    found[outcome.id] = outcome.body
    return found
