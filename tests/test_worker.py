"""The streaming worker end to end: real Tansu broker, real SeaweedFS, real Ray Serve replicas."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from helpers.kafka_helpers import committed_offsets, consume_until, produce
from helpers.worker_fixtures import (
    BUCKET,
    collect_outcomes,
    flat_png,
    outcomes_by_offset,
    png_bytes,
    request,
    tiny_replicas,
    upload,
    worker_settings,
)
from workers import metrics
from workers.config import KafkaConfig, LimitsConfig, WorkerConfig
from workers.embedded import free_port, wait_until
from workers.kafkaclient import ensure_topics
from workers.pipeline import Pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.ray]


@pytest.fixture(scope="module")
def replicas(ray_serve: None) -> Any:
    with tiny_replicas("worker-tests") as handle:
        yield handle


def make_topics(kafka: KafkaConfig, partitions: int = 2) -> None:
    ensure_topics(kafka, [kafka.input_topic], partitions=partitions)
    ensure_topics(kafka, [kafka.output_topic, kafka.dead_letter_topic])


def run_until_outcomes(settings, replicas, count: int, timeout: float = 90) -> tuple[list, list, Pipeline]:
    """Start a pipeline, wait until `count` outcomes exist, stop it (drain + commit)."""
    pipeline = Pipeline(settings, replicas).start()
    try:
        results, dead = collect_outcomes(settings.kafka, count, timeout=timeout)
    finally:
        pipeline.stop()
    return results, dead, pipeline


def test_every_request_gets_a_result_with_its_ids_keys_headers_and_coordinates(broker, s3_server, replicas):
    settings = worker_settings(broker.bootstrap_servers, s3_server)
    metrics_port = metrics.serve_metrics(free_port())
    kafka = settings.kafka
    make_topics(kafka)
    n = 12
    uris = [upload(s3_server, f"e2e/{i}.png", png_bytes(i)) for i in range(n)]
    values = [request(uri, id=f"req-{i}", metadata={"i": i}) for i, uri in enumerate(uris)]
    keys = [f"key-{i}".encode() if i % 2 == 0 else None for i in range(n)]
    headers = [[("trace", f"t{i}".encode())] for i in range(n)]
    sent = produce(kafka.bootstrap_servers, kafka.input_topic, values, keys=keys, headers=headers)

    results, dead, _ = run_until_outcomes(settings, replicas, n)

    assert dead == []
    by_source = outcomes_by_offset(results)
    assert len(results) == n == len(by_source)
    for i, meta in enumerate(sent):
        body = by_source[(meta.partition, meta.offset)]
        assert body["id"] == f"req-{i}" and body["image"] == uris[i]
        assert body["metadata"] == {"i": i}
        assert body["source"] == {"topic": kafka.input_topic, "partition": meta.partition, "offset": meta.offset}
        assert isinstance(body["caption"], str) and body["caption"]
        assert body["model"] == {"name": "tiny-random", "backend": "torch", "untrained": True}
        assert (body["width"], body["height"]) == (48, 40)
        assert body["params"]["beam_size"] == 2 and body["cached"] is False
        assert {"fetch", "decode", "inference", "total"} <= set(body["timings_ms"])
    for r in results:
        body = json.loads(r.value)
        i = int(body["id"].split("-")[1])
        assert r.key == (keys[i] or body["id"].encode())
        assert ("trace", f"t{i}".encode()) in list(r.headers)
    metrics_text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    assert f'captioner_results_total{{topic="{kafka.output_topic}"}} {float(n)}' in metrics_text
    assert "captioner_batch_size_count" in metrics_text and "captioner_stage_seconds_bucket" in metrics_text
    assert all(
        offset == max(m.offset for m in sent if m.partition == p) + 1
        for p, offset in committed_offsets(kafka.bootstrap_servers, kafka.group_id, kafka.input_topic).items()
        if any(m.partition == p for m in sent)
    )


def test_replicas_receive_batches_under_load(broker, s3_server, replicas):
    settings = worker_settings(broker.bootstrap_servers, s3_server)
    make_topics(settings.kafka, partitions=1)
    uris = [upload(s3_server, f"batch/{i}.png", png_bytes(100 + i)) for i in range(24)]
    before = len(replicas.stats.remote().result()["batch_sizes"])
    produce(settings.kafka.bootstrap_servers, settings.kafka.input_topic, [request(u) for u in uris])

    results, dead, _ = run_until_outcomes(settings, replicas, len(uris))

    assert len(results) == len(uris) and dead == []
    sizes = replicas.stats.remote().result()["batch_sizes"][before:]
    assert sum(sizes) == len(uris)
    assert max(sizes) > 1, f"every image ran alone: {sizes}"


def test_cache_answers_a_repeated_image_without_the_model(broker, s3_server, replicas):
    settings = worker_settings(broker.bootstrap_servers, s3_server)
    make_topics(settings.kafka, partitions=1)
    data = png_bytes(7)
    first, second = upload(s3_server, "cache/a.png", data), upload(s3_server, "cache/copy-of-a.png", data)
    kafka = settings.kafka
    pipeline = Pipeline(settings, replicas).start()
    try:
        produce(kafka.bootstrap_servers, kafka.input_topic, [request(first)])
        collect_outcomes(kafka, 1, timeout=60)
        calls = sum(replicas.stats.remote().result()["batch_sizes"])
        produce(kafka.bootstrap_servers, kafka.input_topic, [request(second)])
        results, _ = collect_outcomes(kafka, 2, timeout=60)
        assert sum(replicas.stats.remote().result()["batch_sizes"]) == calls, "the model was called again"
    finally:
        pipeline.stop()
    a, b = (json.loads(r.value) for r in sorted(results, key=lambda r: r.offset))
    assert a["cached"] is False and b["cached"] is True
    assert a["caption"] == b["caption"] and b["image"] == second


def test_every_dead_letter_code_and_offsets_move_past_them(broker, s3_server, replicas):
    from harness.chaos.proxy import ChaosProxy, FaultPlan

    settings = worker_settings(
        broker.bootstrap_servers,
        s3_server,
        limits=LimitsConfig(max_object_bytes=200_000, max_image_pixels=1_000_000, max_output_length=200),
    )
    kafka = settings.kafka
    make_topics(kafka, partitions=1)
    big = upload(s3_server, "dlq/big.bin", b"\0" * 300_000)
    text = upload(s3_server, "dlq/readme.txt", b"this is not an image")
    huge = upload(s3_server, "dlq/huge.png", flat_png((1500, 1000)))  # 1.5 MP, a few KB
    good = upload(s3_server, "dlq/good.png", png_bytes(3))
    s3_server.create_bucket("private")
    upload(s3_server, "secret.png", png_bytes(4), bucket="private")
    cases: list[tuple[bytes | None, str]] = [
        (b"{not json", "invalid_message"),
        (None, "invalid_message"),  # a tombstone
        (request("http://169.254.169.254/latest/meta-data/"), "forbidden_reference"),
        (request("s3://elsewhere/a.png"), "forbidden_reference"),
        (request(f"s3://{BUCKET}/dlq/missing.png"), "object_not_found"),
        (request(big), "object_too_large"),
        (request(text), "invalid_image"),
        (request(huge), "image_too_large"),
        # More tokens than the tiny model has positions (128): generate itself fails.
        (request(good, params={"max_output_length": 150, "min_output_length": 150}), "inference_failed"),
        (request(good), "result"),
    ]
    keys = [b"tombstone" if v is None else None for v, _ in cases]  # a tombstone needs a key
    sent = produce(kafka.bootstrap_servers, kafka.input_topic, [v for v, _ in cases], keys=keys)
    results, dead, _ = run_until_outcomes(settings, replicas, len(cases))

    outcomes = outcomes_by_offset(results + dead)
    for (value, expected), meta in zip(cases, sent, strict=True):
        body = outcomes[(meta.partition, meta.offset)]
        code = body["error"]["code"] if "error" in body else "result"
        assert code == expected, (value, body)
        if "error" in body:
            assert body["error"]["message"]
            assert body["source"]["offset"] == meta.offset
    assert committed_offsets(kafka.bootstrap_servers, kafka.group_id, kafka.input_topic)[0] == sent[-1].offset + 1

    # access_denied and fetch_failed need a different S3 view: wrong keys, and a failing endpoint.
    with ChaosProxy(s3_server.endpoint_url, FaultPlan(error_rate=1.0), seed=1) as proxy:
        failing = worker_settings(
            broker.bootstrap_servers,
            s3_server,
            s3=s3_server.s3_config(endpoint_url=proxy.url, allowed_buckets=[BUCKET], max_attempts=2, backoff_s=0.01),
        )
        make_topics(failing.kafka, partitions=1)
        produce(failing.kafka.bootstrap_servers, failing.kafka.input_topic, [request(good)])
        _, dead, _ = run_until_outcomes(failing, replicas, 1)
    assert [json.loads(d.value)["error"]["code"] for d in dead] == ["fetch_failed"]
    assert json.loads(dead[0].value)["attempts"] == 2


def test_backpressure_bounds_in_flight_and_stop_drains_and_commits(broker, s3_server, replicas):
    settings = worker_settings(
        broker.bootstrap_servers, s3_server, worker=WorkerConfig(max_in_flight=3, resume_below=1)
    )
    kafka = settings.kafka
    make_topics(kafka, partitions=2)
    uris = [upload(s3_server, f"bp/{i}.png", png_bytes(200 + i)) for i in range(15)]
    produce(kafka.bootstrap_servers, kafka.input_topic, [request(u) for u in uris])
    results, dead, pipeline = run_until_outcomes(settings, replicas, len(uris))
    assert len(results) == len(uris) and dead == []
    assert 1 <= pipeline.window.peak <= 3
    assert pipeline.window.count == 0
    committed = committed_offsets(kafka.bootstrap_servers, kafka.group_id, kafka.input_topic)
    produced_per_partition: dict[int, int] = {}
    for r in results:
        p = json.loads(r.value)["source"]["partition"]
        produced_per_partition[p] = produced_per_partition.get(p, 0) + 1
    assert committed == {p: produced_per_partition.get(p) for p in committed}


def test_restart_mid_stream_loses_nothing(broker, s3_server, replicas):
    settings = worker_settings(broker.bootstrap_servers, s3_server, worker=WorkerConfig(max_in_flight=4))
    kafka = settings.kafka
    make_topics(kafka, partitions=2)
    uris = [upload(s3_server, f"restart/{i}.png", png_bytes(300 + i)) for i in range(20)]
    sent = produce(kafka.bootstrap_servers, kafka.input_topic, [request(u, id=f"r{i}") for i, u in enumerate(uris)])

    first = Pipeline(settings, replicas).start()
    collect_outcomes(kafka, 5, timeout=90)
    first.stop()
    committed = committed_offsets(kafka.bootstrap_servers, kafka.group_id, kafka.input_topic)
    assert sum(o or 0 for o in committed.values()) < len(uris), "nothing was left mid-stream"

    second = Pipeline(settings, replicas).start()
    try:
        consume_until(
            kafka.bootstrap_servers,
            kafka.output_topic,
            lambda recs: {json.loads(r.value)["id"] for r in recs} >= {f"r{i}" for i in range(len(uris))},
            timeout=120,
        )
    finally:
        second.stop()
    results, _ = collect_outcomes(kafka, len(uris), timeout=30)
    coords = [(json.loads(r.value)["source"]["partition"], json.loads(r.value)["source"]["offset"]) for r in results]
    assert {(m.partition, m.offset) for m in sent} <= set(coords)
    duplicates = len(coords) - len(set(coords))
    assert duplicates <= settings.worker.max_in_flight


def test_two_workers_in_one_group_split_partitions(broker, s3_server, replicas):
    settings = worker_settings(broker.bootstrap_servers, s3_server)
    kafka = settings.kafka
    make_topics(kafka, partitions=4)
    uris = [upload(s3_server, f"two/{i}.png", png_bytes(400 + i)) for i in range(16)]
    a = Pipeline(settings, replicas, name="a").start()
    b = Pipeline(settings, replicas, name="b").start()
    try:
        a.wait_started()
        b.wait_started()
        # Wait until the group settled with both members before producing.
        wait_until(
            lambda: (
                a.sources[0].assignment
                and b.sources[0].assignment
                and len(a.sources[0].assignment | b.sources[0].assignment) == 4
            ),
            timeout_s=60,
            what="both members assigned",
        )
        sent = produce(kafka.bootstrap_servers, kafka.input_topic, [request(u) for u in uris])
        results, _ = collect_outcomes(kafka, len(uris), timeout=120)
        assignment_a, assignment_b = set(a.sources[0].assignment), set(b.sources[0].assignment)
    finally:
        a.stop()
        b.stop()
    assert assignment_a and assignment_b and not assignment_a & assignment_b
    assert len(assignment_a | assignment_b) == 4
    assert {(m.partition, m.offset) for m in sent} == set(outcomes_by_offset(results))


def test_a_replica_without_gpus_runs_on_the_cpu(replicas):
    info = replicas.info.remote().result(timeout_s=60)
    assert info.gpu_ids == [] and info.device == "cpu"
    assert info.model == {"name": "tiny-random", "backend": "torch", "untrained": True}
