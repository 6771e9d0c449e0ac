"""Per-partition watermarks of acknowledged outcomes.

Outcomes complete in any order; commits do not. For each partition we keep the offsets handed
out, in the order they were handed out, and commit `N` (Kafka's "next offset to read") only when
every offset before `N` has its result or dead letter acknowledged by the broker. Pure
bookkeeping: no I/O. Thread-safe: the poll thread starts offsets and commits, the producer's
I/O thread marks them done.

An abandoned offset (its outcome will never come from this process) is no longer open work, so
a drain does not wait for it, but the watermark never passes it: the record is delivered again.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.structs import TopicPartition

log = logging.getLogger(__name__)


OPEN, DONE, ABANDONED = "open", "done", "abandoned"


_EPOCHS = itertools.count(1)


@dataclass
class _Partition:
    # offset -> state. Insertion order is offset order within a partition's fetch sequence.
    pending: dict[int, str] = field(default_factory=dict)
    next_offset: int | None = None  # the watermark: every offset below it is done
    committed: int | None = None
    highest: int = -1  # the highest offset started in this epoch
    # A fresh number whenever tracking of the partition starts over (assigned again, or its
    # offsets moved backwards): outcomes of an older epoch never mark a newer one's offsets.
    epoch: int = field(default_factory=lambda: next(_EPOCHS))


class OffsetTracker:
    def __init__(self, on_reset: Callable[[TopicPartition], None] | None = None) -> None:
        self._lock = threading.Condition()
        self._parts: dict[TopicPartition, _Partition] = {}
        self._on_reset = on_reset

    def started(self, tp: TopicPartition, offset: int) -> int:
        """Open an offset; returns the partition's epoch, which done/abandon/owns take back.

        Offsets of a partition arrive in increasing order. One at or below the highest seen
        means the log moved backwards under us (a reset to earliest, a truncation, a seek by
        someone else): tracking starts over at that offset, in a new epoch, so records still in
        flight from before can never move the new watermark, and nothing is committed past
        the open records of either.
        """
        with self._lock:
            part = self._parts.get(tp)
            if part is None:
                part = self._parts[tp] = _Partition()
            elif offset <= part.highest:
                log.warning(
                    "%s: offset %d is at or below %d already read; tracking starts over", tp, offset, part.highest
                )
                part = self._parts[tp] = _Partition(committed=part.committed)
                if self._on_reset is not None:
                    self._on_reset(tp)
            part.highest = offset
            part.pending[offset] = OPEN
            return part.epoch

    def _current(self, tp: TopicPartition, epoch: int | None) -> _Partition | None:
        part = self._parts.get(tp)
        if part is None or (epoch is not None and part.epoch != epoch):
            return None
        return part

    def done(self, tp: TopicPartition, offset: int, epoch: int | None = None) -> bool:
        """Mark an outcome acknowledged; False when the partition was revoked (or reset) meanwhile."""
        with self._lock:
            part = self._current(tp, epoch)
            if part is None or part.pending.get(offset) != OPEN:
                return False
            part.pending[offset] = DONE
            self._lock.notify_all()
            # Advance the watermark over the done prefix.
            while part.pending:
                first = next(iter(part.pending))
                if part.pending[first] != DONE:
                    break
                del part.pending[first]
                part.next_offset = first + 1
            return True

    def abandon(self, tp: TopicPartition, offset: int, epoch: int | None = None) -> bool:
        """No outcome will come for this offset: stop waiting for it, never commit past it."""
        with self._lock:
            part = self._current(tp, epoch)
            if part is None or part.pending.get(offset) != OPEN:
                return False
            part.pending[offset] = ABANDONED
            self._lock.notify_all()
            return True

    def owns(self, tp: TopicPartition, offset: int, epoch: int | None = None) -> bool:
        """Whether this offset is still ours to finish (False once its partition was revoked)."""
        with self._lock:
            part = self._current(tp, epoch)
            return part is not None and part.pending.get(offset) == OPEN

    def in_flight(self, tps: set[TopicPartition] | None = None) -> int:
        with self._lock:
            return self._open(tps)

    def wait_settled(self, tps: set[TopicPartition] | None, timeout: float) -> int:
        """Block until those partitions (all if None) have no open offsets; returns how many remain."""
        with self._lock:
            self._lock.wait_for(lambda: self._open(tps) == 0, timeout=timeout)
            return self._open(tps)

    def _open(self, tps: set[TopicPartition] | None) -> int:
        return sum(
            sum(1 for state in p.pending.values() if state == OPEN)
            for tp, p in self._parts.items()
            if tps is None or tp in tps
        )

    def to_commit(self) -> dict[TopicPartition, int]:
        """Partitions whose watermark moved past their last commit, with the offset to commit."""
        with self._lock:
            return {
                tp: p.next_offset
                for tp, p in self._parts.items()
                if p.next_offset is not None and p.next_offset != p.committed
            }

    def committed_offsets(self) -> dict[TopicPartition, int | None]:
        """The last offset committed per tracked partition (None where none was yet)."""
        with self._lock:
            return {tp: p.committed for tp, p in self._parts.items()}

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            for tp, offset in offsets.items():
                if tp in self._parts:
                    self._parts[tp].committed = offset

    def forget(self, tps: list[TopicPartition] | set[TopicPartition]) -> None:
        """Drop revoked partitions: late outcomes for them are produced but never committed here."""
        with self._lock:
            for tp in tps:
                self._parts.pop(tp, None)
