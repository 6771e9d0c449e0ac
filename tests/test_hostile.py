"""Hostile records and slow faults through the whole worker: one outcome per record, whatever it
holds; the worker keeps running; committed offsets reach the end of every partition.

Real Tansu broker, real SeaweedFS, real Ray Serve replicas (tiny random model).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from confluent_kafka import Producer
from kafka import KafkaProducer

from helpers.kafka_helpers import committed_offsets
from helpers.worker_fixtures import (
    BUCKET,
    collect_outcomes,
    outcomes_by_offset,
    png_bytes,
    request,
    tiny_replicas,
    upload,
    worker_settings,
)
from workers.config import KafkaConfig, LimitsConfig
from workers.embedded import wait_until
from workers.kafkaclient import RawHeaderKey, ensure_topics
from workers.pipeline import Pipeline, is_record_error
from workers.sink import Sink

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.ray]


@pytest.fixture(scope="module")
def replicas(ray_serve: None) -> Any:
    with tiny_replicas("hostile-tests") as handle:
        yield handle


def produce_raw(kafka: KafkaConfig, records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Produce one record at a time with the client each needs; returns (partition, offset)."""
    out: list[tuple[int, int]] = []
    plain = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    # librdkafka writes what kafka-python refuses to: header values that are null.
    nullable = Producer({"bootstrap.servers": kafka.bootstrap_servers, "acks": "all"})
    delivered: list[Any] = []
    try:
        for r in records:
            if r.get("client") == "librdkafka":
                nullable.produce(
                    kafka.input_topic,
                    value=r["value"],
                    key=r.get("key"),
                    headers=r.get("headers"),
                    on_delivery=lambda err, msg: delivered.append((err, msg)),
                )
                nullable.flush(30)
                err, msg = delivered[-1]
                assert err is None, err
                out.append((msg.partition(), msg.offset()))
            else:
                meta = plain.send(kafka.input_topic, value=r["value"], key=r.get("key"), headers=r.get("headers") or [])
                got = meta.get(timeout=30)
                out.append((got.partition, got.offset))
    finally:
        plain.close(timeout=10)
    return out


def run_worker(settings: Any, replicas: Any, count: int, *, sink: Sink | None = None) -> tuple[list, list, Pipeline]:
    pipeline = Pipeline(settings, replicas)
    if sink is not None:
        pipeline.sink.close()
        pipeline.sink = sink
    pipeline.start()
    try:
        results, dead = collect_outcomes(settings.kafka, count, timeout=120)
        assert not pipeline.failed.is_set(), "the worker stopped"
    finally:
        pipeline.stop()
    return results, dead, pipeline


def test_poison_records_each_get_one_outcome_and_the_worker_keeps_running(broker, s3_server, replicas):
    limits = LimitsConfig(max_message_bytes=65_536, max_object_bytes=2_000_000, max_image_pixels=4_000_000)
    settings = worker_settings(broker.bootstrap_servers, s3_server, limits=limits)
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic])
    good = upload(s3_server, "hostile/good.png", png_bytes(11))
    cases: list[tuple[dict[str, Any], str]] = [
        # JSON escapes that decode to lone surrogates: not text, not encodable in a result.
        ({"value": b'{"image": "%s", "id": "\\ud800"}' % good.encode()}, "invalid_message"),
        ({"value": b'{"image": "%s", "metadata": {"note": "a\\udfffb"}}' % good.encode()}, "invalid_message"),
        # Non-finite numbers: Python's json reads them, standard JSON has none.
        ({"value": b'{"image": "%s", "params": {"temperature": NaN}}' % good.encode()}, "invalid_message"),
        ({"value": b'{"image": "%s", "metadata": {"n": -Infinity}}' % good.encode()}, "invalid_message"),
        # A header key that is not UTF-8: kafka-python's poll() used to raise on it, forever.
        ({"value": request(good), "headers": [(RawHeaderKey("trace\udcff"), b"x"), ("ok", b"1")]}, "invalid_message"),
        # A header whose value is null: kept out of the outcome (documented), the request answered.
        (
            {
                "value": request(good, id="null-header"),
                "headers": [("null", None), ("kept", b"yes")],
                "client": "librdkafka",
            },
            "result",
        ),
        # Key and headers count toward the size limit, not only the value.
        ({"value": request(good), "key": b"k" * 100_000}, "invalid_message"),
        ({"value": request(good, id="after")}, "result"),
    ]
    sent = produce_raw(kafka, [c for c, _ in cases])

    results, dead, pipeline = run_worker(settings, replicas, len(cases))

    outcomes = outcomes_by_offset(results + dead)
    assert len(results) + len(dead) == len(cases) == len(outcomes), "exactly one outcome per record"
    for (case, expected), coordinates in zip(cases, sent, strict=True):
        body = outcomes[coordinates]
        code = body["error"]["code"] if "error" in body else "result"
        assert code == expected, (case.get("value", b"")[:80], body)
    null_header = next(r for r in results if json.loads(r.value)["id"] == "null-header")
    assert list(null_header.headers) == [("kept", b"yes")], "a null-valued header is dropped, the rest copied"
    for r in results + dead:
        json.loads(r.value, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    partitions = committed_offsets(kafka.bootstrap_servers, kafka.group_id, kafka.input_topic)
    assert partitions == {p: max(o for q, o in sent if q == p) + 1 for p in {p for p, _ in sent}}


def test_an_outcome_the_output_topic_refuses_becomes_a_compact_dead_letter(broker, s3_server, replicas):
    settings = worker_settings(broker.bootstrap_servers, s3_server)
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic])
    good = upload(s3_server, "hostile/refused.png", png_bytes(12))
    # A result that echoes 20 KB of metadata is over this sink's record limit; so is the first
    # fallback, which echoes the request (base64): the second fallback is what fits.
    sink = Sink(kafka, LimitsConfig(), max_request_size=8192)
    values = [request(good, id="big", metadata={"blob": "x" * 20_000}), request(good, id="small")]
    sent = produce_raw(kafka, [{"value": v} for v in values])

    results, dead, _ = run_worker(settings, replicas, len(values), sink=sink)

    assert [json.loads(r.value)["id"] for r in results] == ["small"]
    [letter] = [json.loads(r.value) for r in dead]
    assert letter["error"]["code"] == "invalid_message"
    assert "MessageSizeTooLargeError" in letter["error"]["message"]
    assert letter["source"]["offset"] == sent[0][1] and "id" not in letter
    assert letter["request"] is None, "the smallest fallback echoes nothing"
    wait_until(
        lambda: (
            committed_offsets(kafka.bootstrap_servers, kafka.group_id, kafka.input_topic)[sent[0][0]]
            == max(o for _, o in sent) + 1
        ),
        timeout_s=30,
        what="commits past the refused record",
    )


def test_throttling_that_lasts_seconds_stays_transient_under_the_default_budget(broker, s3_server, replicas):
    from harness.chaos.proxy import ChaosProxy, FaultPlan

    good = upload(s3_server, "hostile/throttled.png", png_bytes(13))
    plan = FaultPlan(fail_first=6, error_status=503)  # SlowDown for the first six calls: 3-6 s of backoff
    with ChaosProxy(s3_server.endpoint_url, plan) as proxy:
        defaults = worker_settings(broker.bootstrap_servers, s3_server)
        # The defaults that matter here: no attempt cap, a 30 s budget, 0.1 s first backoff.
        s3 = defaults.s3.model_copy(update={"endpoint_url": proxy.url, "max_attempts": None, "backoff_s": 0.1})
        settings = defaults.model_copy(update={"s3": s3})
        kafka = settings.kafka
        ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic])
        produce_raw(kafka, [{"value": request(good, id="throttled")}])
        results, dead, _ = run_worker(settings, replicas, 1)
    assert dead == [] and json.loads(results[0].value)["id"] == "throttled"
    assert sum(1 for seen in proxy.seen if seen.outcome == "error") == 6


def test_produce_errors_are_classified_record_or_transport() -> None:
    from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, NotLeaderForPartitionError

    from workers.sink import UnconfirmedWrite

    assert is_record_error(MessageSizeTooLargeError("too big"))
    assert is_record_error(TypeError("header value"))
    assert is_record_error(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert not is_record_error(KafkaTimeoutError())
    assert not is_record_error(NotLeaderForPartitionError())
    assert not is_record_error(UnconfirmedWrite("acked without an offset"))
