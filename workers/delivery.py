"""A ticket per consumed record: the one owner of its window slot and its offset.

`KafkaSource` issues a `Delivery` when it takes a record off its poll loop: the record holds a
slot of the process's `InFlightWindow` and its offset is open in the source's `OffsetTracker`.
From then on the ticket alone gives them back, exactly once, in one of two ways:

- `settle()`: the record's outcome (result or dead letter) is acknowledged by the broker; the
  offset is done, so the partition's watermark may advance past it, and the slot is free;
- `abandon()`: the record will get no outcome from this process (its partition was revoked and
  the new owner redoes it, or the broker refused the outcome and the worker is stopping); the
  slot is free and the offset is never committed here, so the record is delivered again.

A second settle or abandon raises `AlreadySettled`: "one outcome per record" fails loudly in
tests instead of releasing a slot twice. Thread-safe: tickets are settled on the producer's I/O
thread and abandoned on work threads while the poll thread issues new ones.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from kafka.structs import TopicPartition

from workers import metrics
from workers.contract import Source
from workers.offsets import OffsetTracker


class InFlightWindow:
    """Counts records between poll and settled ticket; shared by a process's sources.

    At `limit` the sources pause their partitions; they resume once the count is back at `low`.
    """

    def __init__(self, limit: int, low: int):
        self.limit = limit
        self.low = low
        self.peak = 0
        self._count = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            self.peak = max(self.peak, self._count)
            metrics.IN_FLIGHT.set(self._count)
            return True

    def release(self) -> None:
        with self._lock:
            if self._count <= 0:
                raise RuntimeError("InFlightWindow released more slots than were taken")
            self._count -= 1
            metrics.IN_FLIGHT.set(self._count)

    @property
    def count(self) -> int:
        return self._count

    def free(self) -> int:
        return self.limit - self._count


class AlreadySettled(RuntimeError):
    """A ticket was settled or abandoned a second time: a record would get two outcomes."""


@dataclass(eq=False)
class Delivery:
    """One consumed record in flight: its coordinates, what it carried, and its ticket state."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes | None]]
    _tracker: OffsetTracker = field(repr=False)
    _window: InFlightWindow = field(repr=False)
    _epoch: int | None = field(default=None, repr=False)
    taken_at: float = field(default_factory=time.perf_counter)
    _state: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def source(self) -> Source:
        return Source(self.topic, self.partition, self.offset)

    @property
    def owned(self) -> bool:
        """Whether this record is still ours to finish (False once its partition was revoked)."""
        return self._tracker.owns(self.tp, self.offset, self._epoch)

    @property
    def state(self) -> str | None:
        """None while open, then "settled" or "abandoned"."""
        return self._state

    def settle(self) -> None:
        """The outcome is on the broker: the offset is done and the slot free."""
        self._close("settled")
        self._tracker.done(self.tp, self.offset, self._epoch)
        self._window.release()

    def abandon(self) -> None:
        """No outcome from us: free the slot, never commit this offset (it is delivered again)."""
        self._close("abandoned")
        self._tracker.abandon(self.tp, self.offset, self._epoch)
        self._window.release()

    def _close(self, state: str) -> None:
        with self._lock:
            if self._state is not None:
                raise AlreadySettled(f"{self.source} was already {self._state}; cannot mark it {state}")
            self._state = state


def issue(record: object, tracker: OffsetTracker, window: InFlightWindow) -> Delivery | None:
    """A ticket for a polled record (a kafka-python ConsumerRecord), or None when the window is full."""
    if not window.try_acquire():
        return None
    topic, partition, offset = record.topic, record.partition, record.offset  # type: ignore[attr-defined]
    epoch = tracker.started(TopicPartition(topic, partition), offset)
    return Delivery(
        topic=topic,
        partition=partition,
        offset=offset,
        value=record.value,  # type: ignore[attr-defined]
        key=record.key,  # type: ignore[attr-defined]
        headers=list(record.headers or []),  # type: ignore[attr-defined]
        _tracker=tracker,
        _window=window,
        _epoch=epoch,
    )
