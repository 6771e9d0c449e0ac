"""`captioner replay` on the real broker: dead letters in, the same requests out, once."""

from __future__ import annotations

import base64
import json
import os
import sys

import pytest
from typer.testing import CliRunner

from helpers.kafka_helpers import consume_until, kafka_config, produce, unique_topic
from workers import contract
from workers.config import LimitsConfig
from workers.contract import ErrorCode, Source
from workers.kafkaclient import ensure_topics
from workers.ops.deadletters import REPLAY_HEADER, ReplayFilter
from workers.ops.replay import ReplayOptions, replay

pytestmark = pytest.mark.kafka


@pytest.fixture(autouse=True)
def _no_cli_logging_left_behind():
    """The CLI installs a root log handler; later tests should not inherit it."""
    from workers.logs import unconfigure_logging

    yield
    unconfigure_logging()


LIMITS = LimitsConfig()


def dead_letter(value: bytes | None, code: ErrorCode, request_id: str | None, offset: int) -> bytes:
    record = contract.dead_letter_record(
        code=code, message="test", value=value, source=Source("images", 0, offset), attempts=1, request_id=request_id
    )
    return contract.encode(record)


# (original value, key, headers, code, id) as the worker dead-lettered them.
ORIGINALS = [
    (
        b'{"id":"cat-1","image":"s3://late-bucket/cat.jpg"}',
        b"cat-1",
        [("tenant", b"a"), ("trace", b"\x00\xff")],
        ErrorCode.FORBIDDEN_REFERENCE,
        "cat-1",
    ),
    (b"\xff\xfe not utf-8 \x00", b"k-bin", [], ErrorCode.INVALID_MESSAGE, None),
    (
        b"s3://images/dog.jpg",
        b"s3://images/dog.jpg",
        [("tenant", b"b")],
        ErrorCode.OBJECT_NOT_FOUND,
        "s3://images/dog.jpg",
    ),
]
TRUNCATED = (
    b'{"id":"big","image":"s3://images/x.jpg","metadata":{"pad":"' + b"x" * 70_000 + b'"}}',
    b"big",
    [],
    ErrorCode.INVALID_MESSAGE,
    "big",
)


def setup_topics(bootstrap: str):
    cfg = kafka_config(bootstrap)
    ensure_topics(cfg, [cfg.input_topic, cfg.dead_letter_topic])
    letters = ORIGINALS[:2] + [TRUNCATED] + ORIGINALS[2:]
    produce(
        bootstrap,
        cfg.dead_letter_topic,
        [dead_letter(v, code, rid, i) for i, (v, _, _, code, rid) in enumerate(letters)],
        keys=[k for _, k, _, _, _ in letters],
        headers=[h for _, _, h, _, _ in letters],
    )
    return cfg


def input_records_then_sentinel(bootstrap: str, topic: str) -> list:
    """Everything on the input topic, read up to a sentinel produced now (no waiting on silence)."""
    produce(bootstrap, topic, [b"sentinel"])
    records = consume_until(bootstrap, topic, lambda rs: any(r.value == b"sentinel" for r in rs))
    return [r for r in records if r.value != b"sentinel"]


def test_replay_sends_each_original_request_once_and_reports_the_truncated_echo(broker) -> None:
    cfg = setup_topics(broker.bootstrap_servers)
    group = unique_topic("replay")

    summary = replay(cfg, LIMITS, ReplayOptions(group=group))

    assert summary.read == 4
    assert sum(summary.replayed.values()) == 3
    assert [(u.coordinates, u.request_id) for u in summary.unreplayable] == [(f"{cfg.dead_letter_topic}/0/2", "big")]
    assert "truncated" in summary.unreplayable[0].reason
    out = input_records_then_sentinel(broker.bootstrap_servers, cfg.input_topic)
    assert [r.value for r in out] == [v for v, *_ in ORIGINALS]  # never a part of the truncated one
    dlq_offsets = [0, 1, 3]
    for record, (_value, key, headers, _, _), dlq_offset in zip(out, ORIGINALS, dlq_offsets, strict=True):
        assert record.key == key
        assert [h for h in record.headers if h[0] != REPLAY_HEADER] == headers
        assert dict(record.headers)[REPLAY_HEADER] == f"{cfg.dead_letter_topic}/0/{dlq_offset}".encode()
    assert summary.committed == {0: 4}

    again = replay(cfg, LIMITS, ReplayOptions(group=group))
    assert (again.read, sum(again.replayed.values()), again.unreplayable) == (0, 0, [])
    assert [r.value for r in input_records_then_sentinel(broker.bootstrap_servers, cfg.input_topic)] == [
        v for v, *_ in ORIGINALS
    ]


def test_dry_run_sends_and_remembers_nothing(broker) -> None:
    cfg = setup_topics(broker.bootstrap_servers)
    group = unique_topic("replay")
    dry = replay(cfg, LIMITS, ReplayOptions(group=group, dry_run=True))
    assert sum(dry.replayed.values()) == 3 and len(dry.unreplayable) == 1 and dry.committed == {}
    assert input_records_then_sentinel(broker.bootstrap_servers, cfg.input_topic) == []
    # The group did not move: a real run afterwards still sends all three.
    assert sum(replay(cfg, LIMITS, ReplayOptions(group=group)).replayed.values()) == 3


def test_filters_and_an_explicit_rescan(broker) -> None:
    cfg = setup_topics(broker.bootstrap_servers)
    group = unique_topic("replay")
    only = ReplayFilter.of(codes=["object_not_found", "forbidden_reference"], ids=["cat-1"])
    summary = replay(cfg, LIMITS, ReplayOptions(group=group, filter=only))
    assert dict(summary.replayed) == {"forbidden_reference": 1} and summary.skipped == 3
    by_key = replay(cfg, LIMITS, ReplayOptions(group=unique_topic("replay"), filter=ReplayFilter.of(keys=["k-bin"])))
    assert dict(by_key.replayed) == {"invalid_message": 1}
    # A re-scan from an offset sends again and leaves the group where it was.
    rescan = replay(cfg, LIMITS, ReplayOptions(group=group, from_offset=3, to_offset=3))
    assert (rescan.read, dict(rescan.replayed), rescan.committed) == (1, {"object_not_found": 1}, {})
    out = input_records_then_sentinel(broker.bootstrap_servers, cfg.input_topic)
    assert [r.value for r in out] == [ORIGINALS[0][0], ORIGINALS[1][0], ORIGINALS[2][0]]


def test_cli_prints_the_summary_and_exits_1_for_the_truncated_echo(broker) -> None:
    from workers.cli import app

    cfg = setup_topics(broker.bootstrap_servers)
    env = {
        "CAPTIONER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "CAPTIONER_KAFKA__INPUT_TOPIC": cfg.input_topic,
        "CAPTIONER_KAFKA__DEAD_LETTER_TOPIC": cfg.dead_letter_topic,
        "CAPTIONER_KAFKA__GROUP_ID": unique_topic("group"),
        "COLUMNS": "200",
    }
    result = CliRunner().invoke(app, ["replay"], env=env)
    assert result.exit_code == 1, result.output
    assert "forbidden_reference" in result.output and "truncated" in result.output
    assert f"{cfg.dead_letter_topic}/0/2" in result.output
    again = CliRunner().invoke(app, ["replay"], env=env)
    assert again.exit_code == 0, again.output
    assert "0 dead letter(s) read" in again.output


def test_replay_imports_neither_torch_nor_ray() -> None:
    import subprocess

    code = (
        "import sys, workers.ops.replay, workers.ops.lag; "
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.strip() == "[]"


def test_dead_letter_format_round_trips_binary_values() -> None:
    from workers.ops.deadletters import DeadLetter, replay_of

    value = b"\xff\x00binary"
    body = json.loads(dead_letter(value, ErrorCode.INVALID_MESSAGE, None, 0))
    assert body["request_encoding"] == "base64" and base64.b64decode(body["request"]) == value
    letter = DeadLetter("dlq", 0, 7, 0, None, [(REPLAY_HEADER, b"old/0/1")], json.dumps(body).encode())
    assert replay_of(letter).value == value
    assert replay_of(letter).headers == [(REPLAY_HEADER, b"dlq/0/7")]  # the older one replaced


def test_limit_sends_that_many_and_the_next_run_goes_on_from_there(broker) -> None:
    cfg = setup_topics(broker.bootstrap_servers)
    group = unique_topic("replay")
    first = replay(cfg, LIMITS, ReplayOptions(group=group, limit=1))
    assert (sum(first.replayed.values()), first.committed) == (1, {0: 1})
    rest = replay(cfg, LIMITS, ReplayOptions(group=group))
    assert (rest.read, sum(rest.replayed.values()), len(rest.unreplayable)) == (3, 2, 1)
    out = input_records_then_sentinel(broker.bootstrap_servers, cfg.input_topic)
    assert [r.value for r in out] == [v for v, *_ in ORIGINALS]
