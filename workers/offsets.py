"""Per-partition watermarks of acknowledged outcomes.

Outcomes complete in any order; commits do not. For each partition we keep the offsets handed
out, in the order they were handed out, and commit `N` (Kafka's "next offset to read") only when
every offset before `N` has its result or dead letter acknowledged by the broker. Pure
bookkeeping: no I/O. Thread-safe: the poll thread starts offsets and commits, the producer's
I/O thread marks them done.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kafka.structs import TopicPartition


@dataclass
class _Partition:
    # offset -> done?  Insertion order is offset order within a partition's fetch sequence.
    pending: dict[int, bool] = field(default_factory=dict)
    next_offset: int | None = None  # the watermark: every offset below it is done
    committed: int | None = None


class OffsetTracker:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._parts: dict[TopicPartition, _Partition] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        with self._lock:
            part = self._parts.setdefault(tp, _Partition())
            part.pending[offset] = False

    def done(self, tp: TopicPartition, offset: int) -> bool:
        """Mark an outcome acknowledged; False when the partition was revoked meanwhile."""
        with self._lock:
            part = self._parts.get(tp)
            if part is None or offset not in part.pending:
                return False
            part.pending[offset] = True
            self._lock.notify_all()
            # Advance the watermark over the done prefix.
            while part.pending:
                first = next(iter(part.pending))
                if not part.pending[first]:
                    break
                del part.pending[first]
                part.next_offset = first + 1
            return True

    def owns(self, tp: TopicPartition, offset: int) -> bool:
        """Whether this offset is still ours to finish (False once its partition was revoked)."""
        with self._lock:
            part = self._parts.get(tp)
            return part is not None and offset in part.pending

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
            sum(1 for d in p.pending.values() if not d)
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
