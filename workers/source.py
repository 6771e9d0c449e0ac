"""The source stage: one consumer-group member's poll loop.

The loop never waits on inference: it issues a `Delivery` ticket per record (taking a window slot
and opening the offset, see workers/delivery.py) and hands it to the pipeline (which returns at once)
and goes back to polling, so a long batch cannot trip `max.poll.interval.ms`. Backpressure is a
window of open records: at `max_in_flight` every assigned partition is paused, and resumed once
the window drains below the low-water mark. A record that arrives while the window is full is
not dropped: the partition is rewound to it (`seek`) and it is fetched again after resume.

Commits come only from here (kafka-python consumers are not thread-safe), every
`commit_interval_s`, on revocation, and when the loop stops, using the OffsetTracker's
watermarks. On revocation the loop waits (bounded by `worker.revoke_grace_s`) for the revoked
partitions' open records, commits what finished, and forgets the rest: their outcomes may still
be published, and the new owner will publish them again (at-least-once; duplicates allowed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from workers import metrics
from workers.config import KafkaConfig, LimitsConfig, WorkerConfig
from workers.delivery import Delivery, InFlightWindow, issue
from workers.kafkaclient import consumer_kwargs, decode_header_keys_leniently
from workers.offsets import OffsetTracker
from workers.ops.lag import forget_assignment_lag, observe_assignment_lag

log = logging.getLogger(__name__)


DeliveryHandler = Callable[[Delivery], None]


class KafkaSource:
    def __init__(
        self,
        kafka: KafkaConfig,
        limits: LimitsConfig,
        worker: WorkerConfig,
        window: InFlightWindow,
        handle: DeliveryHandler,
        *,
        name: str = "source-0",
        consumer_factory: Callable[..., KafkaConsumer] = KafkaConsumer,
    ):
        self.kafka = kafka
        self.limits = limits
        self.worker = worker
        self.window = window
        self.handle = handle
        self.name = name
        self.tracker = OffsetTracker(on_reset=lambda tp: metrics.OFFSET_RESETS.labels(tp.topic).inc())
        self.started = threading.Event()
        self.assignment: set[TopicPartition] = set()
        self._paused = False
        self._consumer: KafkaConsumer | None = None
        self._consumer_factory = consumer_factory
        self.health: Any = None  # workers.health.Health, fed from this loop when the runner sets one

    # -- the loop -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        decode_header_keys_leniently()
        consumer = self._consumer_factory(**consumer_kwargs(self.kafka, self.limits))
        self._consumer = consumer
        consumer.subscribe([self.kafka.input_topic], listener=_Rebalance(self))
        self.started.set()
        last_commit = time.monotonic()
        try:
            while not stop.is_set():
                self._apply_backpressure(consumer)
                free = self.window.free()
                batch = self._poll(consumer, stop, timeout_ms=self.kafka.poll_timeout_ms, max_records=max(free, 1))
                if self.health is not None:
                    self.health.polled(self.tracker.in_flight())
                for tp, records in batch.items():
                    for record in records:
                        delivery = issue(record, self.tracker, self.window)
                        if delivery is None:
                            # Full: rewind so this record is read again after resume.
                            consumer.seek(tp, record.offset)
                            break
                        metrics.CONSUMED.labels(record.topic).inc()
                        self.handle(delivery)
                if time.monotonic() - last_commit >= self.kafka.commit_interval_s:
                    self._commit(consumer)
                    last_commit = time.monotonic()
                # What the poll-loop alert and KEDA's view of lag read (no broker request).
                metrics.LAST_POLL.labels(self.name).set_to_current_time()
                observe_assignment_lag(consumer, self.tracker.committed_offsets())
            self._drain(consumer)
        finally:
            self._commit(consumer)
            consumer.close(autocommit=False)
            self._consumer = None

    def _apply_backpressure(self, consumer: KafkaConsumer) -> None:
        if not self._paused and self.window.free() <= 0:
            consumer.pause(*consumer.assignment())
            self._paused = True
            metrics.PAUSED.set(1)
        elif self._paused and self.window.count <= self.window.low:
            consumer.resume(*consumer.paused())
            self._paused = False
            metrics.PAUSED.set(0)

    def _drain(self, consumer: KafkaConsumer) -> None:
        """Stop taking records; keep the membership alive until open records are acknowledged."""
        consumer.pause(*consumer.assignment())
        deadline = time.monotonic() + self.worker.drain_timeout_s
        while self.tracker.in_flight() > 0 and time.monotonic() < deadline:
            self._poll(consumer, None, timeout_ms=100, max_records=1)
            self._commit(consumer)
        left = self.tracker.in_flight()
        if left:
            log.warning("%s: drain timed out with %d open record(s); they will be redelivered", self.name, left)
        self._settle_before_leaving(consumer)

    def _settle_before_leaving(self, consumer: KafkaConsumer) -> None:
        """Finish a rebalance this member is part of before the LeaveGroup that close() sends.

        Found by `captioner chaos` (a SIGTERM drain while a replacement joins): the draining
        member sent LeaveGroup while its JoinGroup was pending, the broker (Tansu 0.6) then made
        it the new generation's leader anyway, and the group never completed another rebalance
        (the remaining member's SyncGroup failed with REBALANCE_IN_PROGRESS every ~8 s for
        minutes; it fetched nothing). Leaving from a settled membership avoids that path; bounded
        by the session timeout, after which the broker expires us anyway.
        """
        coordinator = getattr(consumer, "_coordinator", None)  # kafka-python has no public view of it
        deadline = time.monotonic() + self.kafka.session_timeout_ms / 1000
        while coordinator is not None and coordinator.rebalance_in_progress() and time.monotonic() < deadline:
            self._poll(consumer, None, timeout_ms=100, max_records=1)

    def _poll(self, consumer: KafkaConsumer, stop: threading.Event | None, **kwargs: int) -> dict:
        """consumer.poll(), riding out a broker that is briefly unreachable.

        kafka-python 3.0 raises retriable errors such as KafkaConnectionError out of poll() when
        it cannot reach the coordinator (found by `captioner chaos`: a poll during a broker
        restart ended the loop and the worker exited 1). The Java client retries those inside
        poll; here the loop backs off and polls again for as long as the outage lasts (the
        session timeout decides membership, not this loop). Other errors still end the loop.
        """
        try:
            return consumer.poll(**kwargs)
        except KafkaError as e:
            if not getattr(e, "retriable", False):
                raise
            log.warning("%s: poll failed (%s: %s); polling again", self.name, type(e).__name__, e)
            (stop or threading.Event()).wait(0.2)
            return {}

    def _commit(self, consumer: KafkaConsumer) -> None:
        offsets = self.tracker.to_commit()
        if not offsets:
            return
        try:
            consumer.commit(_as_commit(offsets))
        except KafkaError as e:
            metrics.COMMITS.labels("failed").inc()
            log.warning("%s: commit failed (%s); will retry", self.name, type(e).__name__)
            return
        self.tracker.committed(offsets)
        metrics.COMMITS.labels("ok").inc()
        if self.health is not None:
            self.health.committed(self.tracker.in_flight())

    # -- rebalance callbacks (kafka-python 3.x runs them on its IO thread: nothing blocking) ---

    def on_revoked(self, revoked: set[TopicPartition]) -> None:
        metrics.REBALANCES.labels("revoked").inc(len(revoked))
        consumer = self._consumer
        try:
            # Outcomes are acknowledged on other threads; give them a bounded chance to land.
            self.tracker.wait_settled(revoked, timeout=self.worker.revoke_grace_s)
            if consumer is not None:
                self._commit_revoked(consumer, set(revoked))
        except Exception:
            # An exception escaping a listener makes kafka-python's poll() raise, which would end
            # this loop; a failed revoke commit only means redelivery (at-least-once).
            log.exception("%s: on_revoked failed; the new owner will redeliver", self.name)
        finally:
            self.tracker.forget(revoked)
            forget_assignment_lag(revoked)
            self.assignment -= set(revoked)

    def _commit_revoked(self, consumer: KafkaConsumer, revoked: set[TopicPartition]) -> None:
        """Commit the revoked partitions' watermarks WITHOUT blocking.

        kafka-python 3.x runs rebalance listeners on its IO thread, where the blocking
        `consumer.commit()` raises RuntimeError("Cannot block on net.run() from the IO thread
        itself"); that surfaced as KafkaError("User rebalance callback throws an error") from
        poll() and killed the poll loop (found by `captioner chaos`: consumers died silently
        after a rebalance with finished-but-uncommitted records). `commit_async` only queues the
        request on that loop. If it does not land, the partition's new owner redelivers from
        the previous commit: duplicates, never loss.
        """
        offsets = {tp: o for tp, o in self.tracker.to_commit().items() if tp in revoked}
        if not offsets:
            return

        def on_commit(_offsets: object, response: object) -> None:
            if isinstance(response, BaseException):
                metrics.COMMITS.labels("failed").inc()
                log.warning(
                    "%s: commit on revoke failed (%s); records will be redelivered", self.name, type(response).__name__
                )
            else:
                metrics.COMMITS.labels("ok").inc()

        consumer.commit_async(_as_commit(offsets), callback=on_commit)

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        metrics.REBALANCES.labels("assigned").inc(len(assigned))
        self.assignment |= set(assigned)
        if self._paused and self._consumer is not None and assigned:
            self._consumer.pause(*assigned)
        log.info("%s: assigned %s", self.name, sorted((tp.topic, tp.partition) for tp in assigned))


def _as_commit(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, source: KafkaSource):
        self.source = source

    def on_partitions_revoked(self, revoked):  # type: ignore[no-untyped-def]
        self.source.on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned):  # type: ignore[no-untyped-def]
        self.source.on_assigned(set(assigned))
