"""KafkaSource against a fake consumer: tickets, backpressure by rewind and pause, commits, revocation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka.structs import TopicPartition

from workers.config import KafkaConfig, LimitsConfig, WorkerConfig
from workers.delivery import Delivery, InFlightWindow
from workers.source import KafkaSource

TP0 = TopicPartition("images", 0)
TP1 = TopicPartition("images", 1)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes = b"s3://images/a.jpg"
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class FakeConsumer:
    """Just enough of KafkaConsumer: a log per partition, positions, pause/seek, commits."""

    def __init__(self, logs: dict[TopicPartition, int], **kwargs: Any):
        self.kwargs = kwargs
        self.logs = {tp: [Record(tp.topic, tp.partition, o) for o in range(n)] for tp, n in logs.items()}
        self._position = {tp: 0 for tp in logs}
        self._paused: set[TopicPartition] = set()
        self._assigned: set[TopicPartition] = set()
        self.listener: Any = None
        self.commits: list[dict[TopicPartition, int]] = []
        self.async_commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.closed = False
        self.lock = threading.Lock()
        self.pending_revoke: set[TopicPartition] = set()
        self.polls = 0

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        with self.lock:
            self.polls += 1
            if not self._assigned and not self.pending_revoke:
                self._assigned = set(self.logs)
                self.listener.on_partitions_assigned(set(self._assigned))
            if self.pending_revoke:
                revoked, self.pending_revoke = self.pending_revoke, set()
                self.listener.on_partitions_revoked(revoked)
                self._assigned -= revoked
            out: dict[TopicPartition, list[Record]] = {}
            budget = max_records
            for tp in sorted(self._assigned - self._paused):
                records = self.logs[tp][self._position[tp] : self._position[tp] + budget]
                if records:
                    out[tp] = records
                    self._position[tp] += len(records)
                    budget -= len(records)
        if not out:
            time.sleep(timeout_ms / 1000 / 10)  # a fake broker's idle wait, not test synchronisation
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self._position[tp] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self._paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused -= set(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def position(self, tp: TopicPartition) -> int:
        return self._position[tp]

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.logs[tp])

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append({tp: om.offset for tp, om in offsets.items()})

    def commit_async(self, offsets: dict[TopicPartition, Any], callback: Callable[..., None]) -> None:
        self.async_commits.append({tp: om.offset for tp, om in offsets.items()})
        callback(offsets, None)

    def close(self, autocommit: bool = False) -> None:
        self.closed = True

    def committed_offset(self, tp: TopicPartition) -> int | None:
        seen = [c[tp] for c in self.commits + self.async_commits if tp in c]
        return seen[-1] if seen else None


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.005)


class Harness:
    def __init__(self, logs: dict[TopicPartition, int], *, max_in_flight: int = 100, low: int | None = None):
        self.received: list[Delivery] = []
        self.lock = threading.Lock()
        worker = WorkerConfig(max_in_flight=max_in_flight, resume_below=low, drain_timeout_s=5, revoke_grace_s=0.5)
        kafka = KafkaConfig(bootstrap_servers="127.0.0.1:9", commit_interval_s=0.05, poll_timeout_ms=20)
        self.window = InFlightWindow(worker.max_in_flight, worker.low_watermark)
        self.consumer: FakeConsumer | None = None

        def factory(**kwargs: Any) -> FakeConsumer:
            self.consumer = FakeConsumer(logs, **kwargs)
            return self.consumer

        self.source = KafkaSource(kafka, LimitsConfig(), worker, self.window, self.handle, consumer_factory=factory)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.source.run, args=(self.stop,), daemon=True)

    def handle(self, delivery: Delivery) -> None:
        with self.lock:
            self.received.append(delivery)

    def __enter__(self) -> Harness:
        self.thread.start()
        assert self.source.started.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def settle(self, offsets: set[tuple[int, int]]) -> None:
        with self.lock:
            chosen = [d for d in self.received if (d.partition, d.offset) in offsets and d.state is None]
        for d in chosen:
            d.settle()


@pytest.fixture
def two_partitions() -> Iterator[Harness]:
    with Harness({TP0: 5, TP1: 3}) as h:
        yield h


def test_every_record_becomes_one_ticket_and_settled_ones_are_committed(two_partitions: Harness) -> None:
    h = two_partitions
    wait_for(lambda: len(h.received) == 8)
    assert sorted((d.partition, d.offset) for d in h.received) == [(0, o) for o in range(5)] + [
        (1, o) for o in range(3)
    ]
    assert h.consumer is not None
    assert h.consumer.kwargs["enable_auto_commit"] is False
    h.settle({(0, 0), (0, 1), (0, 3), (1, 0), (1, 1), (1, 2)})
    wait_for(lambda: h.consumer.committed_offset(TP0) == 2 and h.consumer.committed_offset(TP1) == 3)
    h.settle({(0, 2), (0, 4)})
    wait_for(lambda: h.consumer.committed_offset(TP0) == 5)
    assert h.window.count == 0
    from workers import metrics

    lag = metrics.CONSUMER_LAG.labels("images", "0")
    wait_for(lambda: lag._value.get() == 0)  # every record committed: the gauge KEDA's view agrees with


def test_full_window_rewinds_pauses_and_resumes_below_the_low_mark() -> None:
    with Harness({TP0: 10}, max_in_flight=4, low=1) as h:
        wait_for(lambda: len(h.received) == 4)
        assert h.consumer is not None
        wait_for(lambda: TP0 in h.consumer.paused())
        assert [d.offset for d in h.received] == [0, 1, 2, 3]
        assert h.window.peak == 4, "never more open records than the window allows"
        h.settle({(0, 0), (0, 1)})
        polls = h.consumer.polls
        wait_for(lambda: h.consumer.polls >= polls + 5)  # several loop turns with 2 open, above the low mark
        assert len(h.received) == 4 and TP0 in h.consumer.paused()
        h.settle({(0, 2)})
        wait_for(lambda: len(h.received) > 4)
        wait_for(lambda: len(h.received) == 7)
        assert [d.offset for d in h.received] == list(range(7)), "no record skipped or repeated across the pause"
        assert h.window.peak == 4


def test_revoked_partition_commits_what_finished_and_forgets_the_rest() -> None:
    with Harness({TP0: 3, TP1: 3}) as h:
        wait_for(lambda: len(h.received) == 6)
        h.settle({(1, 0)})
        assert h.consumer is not None
        with h.consumer.lock:
            h.consumer.pending_revoke = {TP1}
        wait_for(lambda: TP1 not in h.source.assignment)
        assert {TP1: 1} in h.consumer.async_commits, "the revoked partition's watermark is committed"
        late = next(d for d in h.received if (d.partition, d.offset) == (1, 1))
        assert not late.owned
        late.abandon()
        h.settle({(0, 0), (0, 1), (0, 2)})
        wait_for(lambda: h.consumer.committed_offset(TP0) == 3)
        assert h.consumer.committed_offset(TP1) == 1, "nothing past the revoke is committed for TP1"


def test_stop_drains_commits_and_closes(two_partitions: Harness) -> None:
    h = two_partitions
    wait_for(lambda: len(h.received) == 8)
    h.settle({(d.partition, d.offset) for d in h.received})
    h.__exit__()
    assert h.consumer is not None and h.consumer.closed
    assert h.consumer.committed_offset(TP0) == 5 and h.consumer.committed_offset(TP1) == 3


class RestartingBrokerConsumer(FakeConsumer):
    """poll() raises like kafka-python does while the broker restarts, `outage` times, then works."""

    def __init__(self, logs: dict[TopicPartition, int], error: Exception, outage: int, **kwargs: Any):
        super().__init__(logs, **kwargs)
        self.error = error
        self.outage = outage

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        if self.outage > 0:
            self.outage -= 1
            raise self.error
        return super().poll(timeout_ms, max_records)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the second loop's end
def test_a_retriable_poll_error_does_not_end_the_loop() -> None:
    from kafka.errors import KafkaConnectionError, UnsupportedVersionError

    h = Harness({TP0: 3})

    def restarting(**kwargs: Any) -> FakeConsumer:
        h.consumer = RestartingBrokerConsumer({TP0: 3}, KafkaConnectionError("111 ECONNREFUSED"), 3, **kwargs)
        return h.consumer

    h.source._consumer_factory = restarting
    with h:
        wait_for(lambda: len(h.received) == 3)  # the records after the outage still arrive
        assert h.thread.is_alive()
        h.settle({(0, 0), (0, 1), (0, 2)})
    # A non-retriable error still ends the loop (the pipeline then exits 1 for a restart).
    h = Harness({TP0: 3})
    h.source._consumer_factory = lambda **kw: RestartingBrokerConsumer({TP0: 3}, UnsupportedVersionError(), 1, **kw)
    h.thread.start()
    h.thread.join(10)
    assert not h.thread.is_alive()


class Coordinator:
    """kafka-python's group coordinator, as far as a drain looks at it: rebalancing for `polls` polls."""

    def __init__(self, consumer: FakeConsumer, polls: int):
        self.consumer = consumer
        self.until = polls

    def rebalance_in_progress(self) -> bool:
        return self.consumer.polls < self.until


def test_a_drain_finishes_a_pending_rebalance_before_leaving_the_group(two_partitions: Harness) -> None:
    h = two_partitions
    wait_for(lambda: len(h.received) == 8)
    h.settle({(d.partition, d.offset) for d in h.received})
    assert h.consumer is not None
    closed_at: list[int] = []
    consumer = h.consumer
    consumer._coordinator = Coordinator(consumer, consumer.polls + 20)  # type: ignore[attr-defined]
    consumer.close = lambda autocommit=False: closed_at.append(consumer.polls)  # type: ignore[method-assign]
    h.__exit__()
    assert closed_at and closed_at[0] >= consumer._coordinator.until, "left the group mid-rebalance"  # type: ignore[attr-defined]
