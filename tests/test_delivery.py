"""The ticket per record and the in-flight window: the commit invariant with fakes, no broker."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from kafka.structs import TopicPartition

from workers.delivery import AlreadySettled, InFlightWindow, issue
from workers.offsets import OffsetTracker

TP = TopicPartition("images", 0)


@dataclass
class FakeRecord:
    offset: int
    topic: str = "images"
    partition: int = 0
    value: bytes | None = b'{"image": "s3://images/a.jpg"}'
    key: bytes | None = None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)


def tickets(offsets: range, tracker: OffsetTracker, window: InFlightWindow) -> list:
    out = [issue(FakeRecord(o), tracker, window) for o in offsets]
    assert all(t is not None for t in out)
    return out


def test_settled_out_of_order_commits_only_the_contiguous_prefix() -> None:
    tracker, window = OffsetTracker(), InFlightWindow(10, 5)
    t = tickets(range(100, 105), tracker, window)
    assert window.count == 5
    t[2].settle()
    t[4].settle()
    assert tracker.to_commit() == {}, "100 and 101 are still open"
    t[0].settle()
    t[1].settle()
    assert tracker.to_commit() == {TP: 103}, "103 is open: 103 is the next offset to read"
    t[3].settle()
    assert tracker.to_commit() == {TP: 105}
    assert window.count == 0


def test_a_ticket_settles_once() -> None:
    tracker, window = OffsetTracker(), InFlightWindow(10, 5)
    [ticket] = tickets(range(7, 8), tracker, window)
    ticket.settle()
    with pytest.raises(AlreadySettled):
        ticket.settle()
    with pytest.raises(AlreadySettled):
        ticket.abandon()
    assert window.count == 0, "the slot was released once, not three times"
    assert ticket.state == "settled"


def test_abandoned_offset_frees_its_slot_but_is_never_committed_past() -> None:
    tracker, window = OffsetTracker(), InFlightWindow(10, 5)
    t = tickets(range(0, 3), tracker, window)
    t[1].abandon()
    t[0].settle()
    t[2].settle()
    assert window.count == 0
    assert tracker.in_flight() == 0, "a drain does not wait for an abandoned record"
    assert tracker.to_commit() == {TP: 1}, "offset 1 will be redelivered: never commit past it"
    assert not t[1].owned


def test_revoked_partition_late_settle_moves_no_watermark() -> None:
    tracker, window = OffsetTracker(), InFlightWindow(10, 5)
    [ticket] = tickets(range(5, 6), tracker, window)
    assert ticket.owned
    tracker.forget({TP})
    assert not ticket.owned
    ticket.settle()  # its outcome was produced anyway: the new owner may produce a duplicate
    assert tracker.to_commit() == {}
    assert window.count == 0


def test_window_full_issues_no_ticket_and_opens_no_offset() -> None:
    tracker, window = OffsetTracker(), InFlightWindow(2, 1)
    tickets(range(0, 2), tracker, window)
    assert issue(FakeRecord(2), tracker, window) is None
    assert tracker.in_flight() == 2
    assert window.free() == 0 and window.peak == 2


def test_window_refuses_to_release_more_than_it_took() -> None:
    window = InFlightWindow(2, 1)
    with pytest.raises(RuntimeError):
        window.release()


def test_concurrent_settles_release_each_slot_once() -> None:
    tracker, window = OffsetTracker(), InFlightWindow(1000, 500)
    t = tickets(range(0, 400), tracker, window)
    errors: list[BaseException] = []

    def settle_all(offset_parity: int) -> None:
        for ticket in t[offset_parity::2]:
            try:
                ticket.settle()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

    threads = [threading.Thread(target=settle_all, args=(p,)) for p in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert window.count == 0
    assert tracker.to_commit() == {TP: 400}


def test_ticket_carries_the_record_and_its_coordinates() -> None:
    tracker, window = OffsetTracker(), InFlightWindow(2, 1)
    record = FakeRecord(9, partition=3, key=b"k", headers=[("h", None)])
    ticket = issue(record, tracker, window)
    assert ticket is not None
    assert ticket.source.as_dict() == {"topic": "images", "partition": 3, "offset": 9}
    assert (ticket.value, ticket.key, ticket.headers) == (record.value, b"k", [("h", None)])
