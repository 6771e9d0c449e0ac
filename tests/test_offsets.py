"""The commit watermark: out-of-order completion, in-order commits."""

import threading

from kafka.structs import TopicPartition

from workers.offsets import OffsetTracker

TP = TopicPartition("images", 0)
OTHER = TopicPartition("images", 1)


def test_commit_waits_for_every_earlier_offset():
    t = OffsetTracker()
    for o in range(10, 15):
        t.started(TP, o)
    assert t.to_commit() == {}
    t.done(TP, 12)
    t.done(TP, 14)
    assert t.to_commit() == {}, "10 and 11 are still open"
    t.done(TP, 10)
    assert t.to_commit() == {TP: 11}
    t.done(TP, 11)
    assert t.to_commit() == {TP: 13}, "13 is open, so 13 is the next offset to read"
    t.done(TP, 13)
    assert t.to_commit() == {TP: 15}
    assert t.in_flight() == 0


def test_committed_watermark_is_not_offered_again_and_partitions_are_independent():
    t = OffsetTracker()
    t.started(TP, 0)
    t.started(OTHER, 7)
    t.done(OTHER, 7)
    assert t.to_commit() == {OTHER: 8}
    t.committed({OTHER: 8})
    assert t.to_commit() == {}
    t.done(TP, 0)
    assert t.to_commit() == {TP: 1}


def test_gaps_in_offsets_do_not_block_the_watermark():
    # Compacted topics and transaction markers leave holes in the offsets a consumer sees.
    t = OffsetTracker()
    for o in (3, 5, 9):
        t.started(TP, o)
    for o in (9, 5, 3):
        t.done(TP, o)
    assert t.to_commit() == {TP: 10}


def test_revoked_partition_is_forgotten_and_late_outcomes_ignored():
    t = OffsetTracker()
    t.started(TP, 0)
    t.started(TP, 1)
    assert t.owns(TP, 1)
    t.forget({TP})
    assert not t.owns(TP, 1)
    assert t.done(TP, 1) is False
    assert t.to_commit() == {}
    assert t.in_flight() == 0


def test_wait_settled_returns_when_other_threads_finish():
    t = OffsetTracker()
    for o in range(5):
        t.started(TP, o)
    t.started(OTHER, 0)

    def finish():
        for o in range(5):
            t.done(TP, o)

    threading.Thread(target=finish).start()
    assert t.wait_settled({TP}, timeout=10) == 0
    assert t.in_flight({OTHER}) == 1
    assert t.wait_settled({OTHER}, timeout=0.01) == 1


def test_offsets_moving_backwards_start_tracking_over_and_never_commit_past_open_work():
    resets: list[TopicPartition] = []
    t = OffsetTracker(on_reset=resets.append)
    old_epoch = t.started(TP, 500)
    t.started(TP, 501)
    t.done(TP, 500, old_epoch)
    assert t.to_commit() == {TP: 501}
    t.committed({TP: 501})
    # The log was truncated (or the group reset to earliest): reading starts again at 0.
    new_epoch = t.started(TP, 0)
    assert resets == [TP] and new_epoch != old_epoch
    assert t.to_commit() == {}, "offset 0 is open: nothing may be committed, least of all 501"
    assert not t.done(TP, 501, old_epoch), "an outcome from before the reset moves nothing"
    assert t.to_commit() == {}
    t.done(TP, 0, new_epoch)
    assert t.to_commit() == {TP: 1}
