"""`captioner replay`: re-send dead letters' original requests to the input topic.

After the cause of a dead letter is fixed (a bucket added to the allow-list, a replica repaired),
replay reads the dead-letter topic and produces each matching letter's original request (value,
key, headers: deadletters.replay_of) to the input topic, acks=all. A letter that cannot be sent
whole (truncated echo, tombstone, null header) is reported, never sent in part.

Where it starts, per partition: `--from-offset`, else the first offset at or after `--since`,
else where this replay group last stopped (its committed offset), else the earliest offset.
It reads until it has caught up with the topic (an empty poll at or past the end offsets taken
at start), stopping earlier at `--to-offset` / `--until`; letters written after the run started
are left for the next run.

Remembering: the replay group (`--group`, default `<kafka.group_id>.replay`) commits the
offset after the last dead letter it handled, so the next run starts after it and sends none of
them again. Handled means replayed, reported as not replayable, or skipped by the filter: a
filtered run moves the group past the letters it skipped (re-scan them with --from-offset or
--since, or use another --group per filter). A run with an explicit start (`--from-offset`,
`--since`) is a deliberate re-scan and leaves the group's position alone; so does `--dry-run`.
It commits after each poll's sends are acknowledged, never past an unacknowledged one, so a run
stopped midway resends at most one poll's worth.

The consumer is assigned its partitions rather than joining the group (no rebalance wait, no
effect on anyone else). Importing this module loads neither torch nor Ray.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from rich.table import Table

from workers.config import KafkaConfig, LimitsConfig
from workers.kafkaclient import client_kwargs, producer_kwargs
from workers.logs import log_fields
from workers.ops.deadletters import DeadLetter, NotReplayable, ReplayFilter, replay_of

log = logging.getLogger(__name__)

# A dead letter is at most the 64 KiB echo, base64-inflated, plus the error and envelope.
_FETCH_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ReplayOptions:
    group: str
    filter: ReplayFilter = field(default_factory=ReplayFilter)
    from_offset: int | None = None
    to_offset: int | None = None  # inclusive
    since: datetime | None = None
    until: datetime | None = None  # inclusive
    partitions: frozenset[int] = field(default_factory=frozenset)  # empty: all
    limit: int | None = None  # at most this many sent (or, dry, would be)
    dry_run: bool = False
    idle_timeout_s: float = 5.0  # give up waiting for records the end offsets promised

    @property
    def explicit_start(self) -> bool:
        return self.from_offset is not None or self.since is not None


@dataclass(frozen=True)
class Unreplayed:
    coordinates: str
    request_id: str | None
    code: str | None
    reason: str


@dataclass
class ReplaySummary:
    dead_letter_topic: str
    input_topic: str
    group: str
    dry_run: bool
    read: int = 0
    skipped: int = 0  # did not match the filter
    replayed: Counter[str] = field(default_factory=Counter)  # by code (dry run: would be)
    unreplayable: list[Unreplayed] = field(default_factory=list)
    failed: list[Unreplayed] = field(default_factory=list)  # sends the broker did not acknowledge
    committed: dict[int, int] = field(default_factory=dict)  # partition -> the group's new offset

    @property
    def ok(self) -> bool:
        return not self.unreplayable and not self.failed


def _letter(record: ConsumerRecord) -> DeadLetter:
    return DeadLetter(
        record.topic,
        record.partition,
        record.offset,
        record.timestamp,
        record.key,
        list(record.headers or []),
        record.value,
    )


def _start_offsets(
    consumer: KafkaConsumer, parts: list[TopicPartition], options: ReplayOptions, end: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    beginning = consumer.beginning_offsets(parts)
    if options.from_offset is not None:
        return {tp: max(options.from_offset, beginning[tp]) for tp in parts}
    if options.since is not None:
        found = consumer.offsets_for_times({tp: int(options.since.timestamp() * 1000) for tp in parts})
        return {tp: found[tp].offset if found.get(tp) is not None else end[tp] for tp in parts}
    starts = {}
    for tp in parts:
        committed = consumer.committed(tp)
        starts[tp] = committed if committed is not None else beginning[tp]
    return starts


def replay(
    kafka: KafkaConfig,
    limits: LimitsConfig,
    options: ReplayOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ReplaySummary:
    """Replay the dead letters `options` select; `progress(done, total)` after each poll."""
    summary = ReplaySummary(kafka.dead_letter_topic, kafka.input_topic, options.group, options.dry_run)
    consumer = KafkaConsumer(
        **client_kwargs(kafka),
        group_id=options.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=_FETCH_BYTES,
        fetch_max_bytes=4 * _FETCH_BYTES,
    )
    producer = None if options.dry_run else KafkaProducer(**producer_kwargs(kafka, limits))
    try:
        known = consumer.partitions_for_topic(kafka.dead_letter_topic)
        if not known:
            raise LookupError(f"dead-letter topic {kafka.dead_letter_topic!r} does not exist")
        parts = [
            TopicPartition(kafka.dead_letter_topic, p)
            for p in sorted(known)
            if not options.partitions or p in options.partitions
        ]
        started_ms = int(time.time() * 1000)
        end = consumer.end_offsets(parts)
        starts = _start_offsets(consumer, parts, options, end)
        consumer.assign(parts)
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        # Dead letters written after the start are left for the next run: a replay whose cause
        # is not fixed yet would otherwise chase its own new dead letters for ever.
        until_ms = started_ms if options.until is None else min(started_ms, int(options.until.timestamp() * 1000))
        last = options.to_offset
        active = {tp for tp in parts if last is None or starts[tp] <= last}
        # An estimate: Tansu's end offsets run low behind batching producers (module docstring
        # of workers/ops/lag.py), so they bound nothing here; "caught up" needs an empty poll too.
        total = sum(max(0, end[tp] - starts[tp]) for tp in parts)
        next_offset: dict[TopicPartition, int] = {}
        remember = not options.dry_run and not options.explicit_start
        sent_or_would = 0
        last_record = clock()
        if progress:
            progress(0, total)
        while active:
            consumer.pause(*[tp for tp in parts if tp not in active])
            batch = consumer.poll(timeout_ms=500, max_records=500)
            pending: list[tuple[TopicPartition, int, DeadLetter, object]] = []
            for tp, records in batch.items():
                for record in records:
                    if tp not in active:
                        break
                    if (last is not None and record.offset > last) or record.timestamp > until_ms:
                        active.discard(tp)
                        break
                    if options.limit is not None and sent_or_would >= options.limit:
                        active.clear()
                        break
                    summary.read += 1
                    letter = _letter(record)
                    future = _handle(letter, options, producer, kafka.input_topic, summary)
                    if future is not None:
                        sent_or_would += 1
                    pending.append((tp, record.offset, letter, future))
            if pending:
                last_record = clock()
                _settle(pending, producer, summary, next_offset)
                if remember:
                    _remember(consumer, next_offset, summary)
                if progress:
                    progress(summary.read, total)
                if summary.failed:
                    break  # an unacknowledged send: stop, and commit only what precedes it
            else:
                for tp in list(active):
                    if consumer.position(tp) >= end[tp]:
                        active.discard(tp)  # caught up: nothing buffered, at or past the end
                if active and clock() - last_record > options.idle_timeout_s:
                    log.warning(
                        "no dead letters for %.0f s before the end offsets %s; stopping",
                        options.idle_timeout_s,
                        {tp.partition: end[tp] for tp in active},
                    )
                    break
    finally:
        if producer is not None:
            producer.close(timeout=10)
        consumer.close(autocommit=False)
    return summary


def _remember(consumer: KafkaConsumer, next_offset: dict[TopicPartition, int], summary: ReplaySummary) -> None:
    """Commit past what was handled, after every acknowledged poll's worth: a run killed midway
    resends at most that poll's letters."""
    try:
        consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in next_offset.items()})
    except KafkaError as e:
        # The sends stand; the next run starts from the previous commit and sends them again.
        log.warning("could not remember the replay position (%s); a later run may resend", type(e).__name__)
        return
    summary.committed = {tp.partition: o for tp, o in next_offset.items()}


_DRY = object()  # a dry run's stand-in for a send future


def _handle(
    letter: DeadLetter, options: ReplayOptions, producer: KafkaProducer | None, topic: str, summary: ReplaySummary
) -> object | None:
    """Send one letter's request (or note it); returns the send's future, None when not sent."""
    if not options.filter.matches(letter):
        summary.skipped += 1
        return None
    try:
        record = replay_of(letter)
    except NotReplayable as e:
        summary.unreplayable.append(Unreplayed(letter.coordinates, letter.request_id(), letter.code(), str(e)))
        log.info(
            "not replayable: %s",
            e,
            extra=log_fields(
                request_id=letter.request_id(), topic=letter.topic, partition=letter.partition, offset=letter.offset
            ),
        )
        return None
    if producer is None:
        return _DRY
    try:
        return producer.send(topic, value=record.value, key=record.key, headers=record.headers)
    except KafkaError as e:  # refused before sending (too large, producer closed): settled as failed
        return e


def _settle(
    pending: list[tuple[TopicPartition, int, DeadLetter, object]],
    producer: KafkaProducer | None,
    summary: ReplaySummary,
    next_offset: dict[TopicPartition, int],
) -> None:
    """Wait for this poll's sends; advance each partition's commit point up to its first failure."""
    if producer is not None:
        producer.flush(timeout=60)
    blocked: set[TopicPartition] = set()
    for tp, offset, letter, future in pending:
        if tp in blocked:
            continue
        if future is not None and future is not _DRY:
            try:
                if isinstance(future, KafkaError):
                    raise future
                metadata = future.get(timeout=0)  # type: ignore[attr-defined]
                if metadata.offset is None or metadata.offset < 0:
                    raise RuntimeError(f"acknowledged without an offset ({metadata.offset})")
            except (KafkaError, RuntimeError) as e:  # the broker's refusal, a timeout, no offset
                summary.failed.append(
                    Unreplayed(letter.coordinates, letter.request_id(), letter.code(), f"{type(e).__name__}: {e}")
                )
                blocked.add(tp)
                continue
        if future is not None:
            summary.replayed[letter.code() or "?"] += 1
        next_offset[tp] = offset + 1


# -- the report --------------------------------------------------------------------------------

_LISTED = 20  # not-replayable letters listed one by one; the rest are counted


def summary_tables(summary: ReplaySummary) -> list[Table | str]:
    """The summary (per code: replayed and not replayable), where the group now stands, and the
    letters that were not sent."""
    verb = "would replay" if summary.dry_run else "replayed"
    table = Table(
        title=f"replay {summary.dead_letter_topic} → {summary.input_topic}"
        f"{' (dry run: nothing sent)' if summary.dry_run else ''}"
    )
    table.add_column("code")
    table.add_column(verb, justify="right")
    table.add_column("not replayable", justify="right")
    table.add_column("send failed", justify="right")
    not_sent = Counter(u.code or "?" for u in summary.unreplayable)
    failed = Counter(u.code or "?" for u in summary.failed)
    for code in sorted(set(summary.replayed) | set(not_sent) | set(failed)):
        table.add_row(code, str(summary.replayed[code]), str(not_sent[code]), str(failed[code]))
    table.add_section()
    table.add_row(
        "total", str(sum(summary.replayed.values())), str(len(summary.unreplayable)), str(len(summary.failed))
    )
    position = (
        f"group {summary.group} now at {summary.committed} (partition: next offset)"
        if summary.committed
        else f"group {summary.group}: position unchanged"
    )
    tables: list[Table | str] = [
        table,
        f"{summary.read} dead letter(s) read, {summary.skipped} skipped by the filter; {position}",
    ]
    problems = summary.failed + summary.unreplayable
    if problems:
        detail = Table(title="not sent")
        for name in ("dead letter", "id", "code", "why"):
            detail.add_column(name, overflow="fold")
        for u in problems[:_LISTED]:
            detail.add_row(u.coordinates, u.request_id or "-", u.code or "-", u.reason)
        if len(problems) > _LISTED:
            detail.caption = f"… and {len(problems) - _LISTED} more"
        tables.append(detail)
    return tables
