"""The stream around the workers: the feeder that produces the requests, the progress read from
the group's committed offsets, the end markers, and the collector that reads every outcome back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.chaos.corpus import Case
from workers.config import Settings
from workers.embedded import wait_until
from workers.outcomes import Outcome, outcome_reader, parse_outcome

log = logging.getLogger(__name__)

END_MARKER_KEY = b"__chaos_end__"


class Feeder(threading.Thread):
    """Produces the cases, at most `lead` ahead of the outcomes seen; records each one's coordinates.

    Each case goes with its own key and headers; kafka-python writes most (a non-UTF-8 header key
    through `RawHeaderKey`), librdkafka (confluent-kafka) the ones with a null header value,
    which kafka-python refuses to send.
    """

    def __init__(self, settings: Settings, cases: list[Case], progress: Callable[[], int], lead: int):
        super().__init__(name="chaos-feeder", daemon=True)
        self.settings = settings
        self.cases = cases
        self.progress = progress
        self.lead = lead
        self.coordinates: dict[tuple[str, int, int], int] = {}  # → index into cases
        # Acknowledged with offset -1 (Tansu does that now and then; some were written, some
        # never appeared): sent again; until a real offset comes back, matched by the unique id.
        self.unplaced: dict[str, int] = {}
        self.acks_without_offset = 0
        self.resends = 0
        self.error: BaseException | None = None
        self._nullable: _NullableHeaderProducer | None = None
        self.done = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        from kafka import KafkaProducer

        from workers.kafkaclient import producer_kwargs

        kafka = self.settings.kafka
        producer = KafkaProducer(**producer_kwargs(kafka, self.settings.limits))
        self._nullable = (
            _NullableHeaderProducer(kafka.bootstrap_servers) if any(c.null_headers for c in self.cases) else None
        )
        try:
            chunk = 25
            for start in range(0, len(self.cases), chunk):
                wait_until(
                    lambda: self._halt.is_set() or len(self.coordinates) - self.progress() < self.lead,
                    timeout_s=600, interval_s=0.05, what="outcomes to catch up with the feeder",
                )  # fmt: skip
                if self._halt.is_set():
                    return
                self._send(producer, list(range(start, min(start + chunk, len(self.cases)))))
        except BaseException as e:
            self.error = e
            log.exception("feeder failed")
        finally:
            producer.close(timeout=10)
            self.done.set()

    def _send(self, producer: Any, indices: list[int], attempts: int = 5) -> None:
        topic = self.settings.kafka.input_topic
        for _attempt in range(1, attempts + 1):
            nullable = [i for i in indices if self.cases[i].null_headers]
            futures = [
                (i, producer.send(topic, value=c.value, key=c.key, headers=list(c.headers)))
                for i in indices if not (c := self.cases[i]).null_headers
            ]  # fmt: skip
            producer.flush(timeout=120)
            if nullable:
                assert self._nullable is not None
                futures += self._nullable.send(topic, [(i, self.cases[i]) for i in nullable])
            failed = []
            for i, future in futures:
                try:
                    meta = future.get(timeout=0)
                    if meta.offset < 0:
                        # Not a confirmed write (some such records never showed up): send again.
                        # If the first copy was written after all, its outcome is matched by id.
                        log.warning("feeder: %s acknowledged without an offset (%d)", self.cases[i].id, meta.offset)
                        self.unplaced[self.cases[i].id] = i
                        self.acks_without_offset += 1
                        failed.append(i)
                    else:
                        self.coordinates[(meta.topic, meta.partition, meta.offset)] = i
                        self.unplaced.pop(self.cases[i].id, None)
                except Exception as e:
                    log.warning("feeder: send of %s failed (%s); resending", self.cases[i].id, type(e).__name__)
                    failed.append(i)
            if not failed:
                return
            self.resends += len(failed)
            indices = failed
        raise RuntimeError(f"feeder: {len(indices)} request(s) not acknowledged after {attempts} attempts")

    def stop(self) -> None:
        self._halt.set()


@dataclass(frozen=True)
class _Delivered:
    """A librdkafka delivery report in the shape of kafka-python's future + RecordMetadata."""

    topic: str
    partition: int
    offset: int
    error: Any = None

    def get(self, timeout: float = 0) -> _Delivered:
        if self.error is not None:
            raise RuntimeError(f"librdkafka delivery failed: {self.error}")
        return self


class _NullableHeaderProducer:
    """confluent-kafka's Producer for records with a null header value (kafka-python raises
    TypeError on them): a Go or librdkafka client writes such records without complaint.

    One librdkafka producer per send, dropped after its flush: a long-lived one keeps
    reconnecting (and logging to stderr) across broker restarts and after the run.
    """

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap

    def send(self, topic: str, cases: list[tuple[int, Case]]) -> list[tuple[int, _Delivered]]:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "acks": "all", "enable.idempotence": True},
                            logger=log)  # fmt: skip
        reports: dict[int, _Delivered] = {}

        def report(i: int) -> Callable[[Any, Any], None]:
            def on_delivery(err: Any, msg: Any) -> None:
                reports[i] = _Delivered(topic, msg.partition(), msg.offset() if err is None else -1, err)

            return on_delivery

        for i, case in cases:
            producer.produce(topic, value=case.value, key=case.key, headers=list(case.headers), on_delivery=report(i))
        producer.flush(120)
        return [(i, reports.get(i, _Delivered(topic, -1, -1, "no delivery report"))) for i, _ in cases]


class Collector(threading.Thread):
    """Reads the results and dead-letter topics from the start (no group) up to the end markers,
    scanning each record for secrets.

    Started only after the workers stopped and the markers were produced: a reader that tailed
    the results topic across a broker restart stopped receiving records in a 10,000-request run
    (the records were there: a fresh reader from offset 0 read them all), so the run's progress
    comes from committed offsets (`CommitProgress`) and the outcomes from this fresh read.
    """

    def __init__(self, settings: Settings, secrets_to_find: list[str]):
        super().__init__(name="chaos-collector", daemon=True)
        self.settings = settings
        self.secrets = [s.encode() for s in secrets_to_find]
        self.outcomes: list[Outcome] = []
        self.headers: dict[bytes, list[list[tuple[str, bytes]]]] = {}  # outcome key → each one's headers
        self.seen: set[tuple[str, int, int]] = set()
        self.markers: set[str] = set()
        self.records_scanned = 0
        self.rereads = 0  # outcome records read twice (a position reset); counted once
        self.leaks: list[str] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        # Both topics have one partition (created so): the end marker orders after everything.
        reader = outcome_reader(self.settings.kafka, max_partition_fetch_bytes=4 * 1024 * 1024)
        try:
            while not self._halt.is_set() and len(self.markers) < 2:
                for record in reader.poll():
                    self._take(record)
                self.rereads = reader.rereads
        except BaseException as e:
            self.error = e
            log.exception("collector failed")
        finally:
            reader.close()

    def _take(self, record: Any) -> None:
        if record.key == END_MARKER_KEY:
            with self._lock:
                self.markers.add(record.topic)
            return
        blobs = [record.value or b"", record.key or b""] + [v for _, v in record.headers or []]
        for secret in self.secrets:
            if any(secret in blob for blob in blobs):
                self.leaks.append(f"{record.topic}@{record.offset}")
        outcome = parse_outcome(record)
        with self._lock:
            self.records_scanned += 1
            self.outcomes.append(outcome)
            self.headers.setdefault(record.key or b"", []).append(list(record.headers or []))
            if outcome.coordinate is not None:
                self.seen.add(outcome.coordinate)

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


class CommitProgress:
    """Requests finished so far per input partition: the group's committed offsets.

    A commit means every earlier offset of the partition has an acknowledged outcome, and the
    broker keeps commits right across restarts (FIELD-NOTES; its end offsets it does not).
    Thread-safe (the feeder and the main thread both ask); asks the broker at most twice a second.
    """

    def __init__(self, settings: Settings, partitions: int):
        from kafka import KafkaConsumer, TopicPartition

        from workers.kafkaclient import client_kwargs

        kafka = settings.kafka
        self._consumer = KafkaConsumer(group_id=kafka.group_id, enable_auto_commit=False, **client_kwargs(kafka))
        self._tps = [TopicPartition(kafka.input_topic, p) for p in range(partitions)]
        self._lock = threading.Lock()
        self._last: dict[int, int] = {}
        self._asked = 0.0

    def committed(self) -> dict[int, int]:
        from kafka.errors import KafkaError

        with self._lock:
            if time.monotonic() - self._asked >= 0.5:
                try:
                    self._last = {tp.partition: self._consumer.committed(tp, timeout_ms=5000) or 0 for tp in self._tps}
                except KafkaError as e:  # the broker is restarting: keep the last answer
                    log.debug("committed offsets unavailable: %s", type(e).__name__)
                self._asked = time.monotonic()
            return dict(self._last)

    def done(self) -> int:
        return sum(self.committed().values())

    def covers(self, produced: dict[tuple[str, int, int], int]) -> bool:
        """Whether every produced offset is below its partition's commit."""
        committed = self.committed()
        ends: dict[int, int] = {}
        for _topic, partition, offset in list(produced):
            ends[partition] = max(ends.get(partition, -1), offset)
        return all(committed.get(p, 0) > end for p, end in ends.items())

    def close(self) -> None:
        with self._lock:
            self._consumer.close()


def produce_end_markers(settings: Settings) -> None:
    """One marker per outcome topic, produced after every worker stopped: reading up to it reads all."""
    from kafka import KafkaProducer

    from workers.kafkaclient import producer_kwargs

    producer = KafkaProducer(**producer_kwargs(settings.kafka, settings.limits))
    try:
        for topic in (settings.kafka.output_topic, settings.kafka.dead_letter_topic):
            producer.send(topic, key=END_MARKER_KEY, value=b"{}", partition=0).get(timeout=60)
    finally:
        producer.close(timeout=10)
