"""The ingest's HTTP path to the inference tier: the frame, the import footprint, and what
transport failures do to records (real broker, real S3 server, a real HTTP tier on loopback)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.fake_tier import FakeTier
from helpers.kafka_helpers import produce
from helpers.worker_fixtures import (
    collect_outcomes,
    png_bytes,
    request,
    upload,
    worker_settings,
)
from workers import metrics
from workers.config import ReplicasConfig, WorkerConfig
from workers.embedded import free_port, wait_until
from workers.kafkaclient import ensure_topics
from workers.params import GenerationParams
from workers.replica_api import ReplicaAnswer, ReplicasUnavailable
from workers.replica_http import HttpReplicas
from workers.replica_wire import (
    FrameError,
    decode_answers,
    decode_batch,
    encode_answers,
    encode_batch,
)

REPO = Path(__file__).resolve().parents[1]


def test_frame_round_trips_images_and_params_in_order() -> None:
    rng = np.random.default_rng(0)
    greedy, beams = GenerationParams(beam_size=1), GenerationParams(beam_size=4)
    items = [
        (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), p)
        for h, w, p in [(4, 5, greedy), (7, 3, beams), (2, 2, greedy)]
    ]
    body = encode_batch(items)
    header_len = int.from_bytes(body[:4], "big")
    assert json.loads(body[4 : 4 + header_len])["items"] == [[4, 5, 0], [7, 3, 1], [2, 2, 0]]
    assert len(body) == 4 + header_len + sum(p.size for p, _ in items)  # raw pixels, no base64
    back = decode_batch(body)
    assert [p for _, p in back] == [greedy, beams, greedy]
    for (a, _), (b, _) in zip(items, back, strict=True):
        assert np.array_equal(a, b)
    answers = [ReplicaAnswer(["a"], [-0.5], 3, 2.0), ReplicaAnswer([], None, 3, 0.0, error="boom")]
    assert decode_answers(json.loads(json.dumps(encode_answers(answers))), 2) == answers


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:3],  # no length prefix
        lambda b: b[:-1],  # pixels cut short
        lambda b: b + b"\0",  # trailing bytes
        lambda b: (10**6).to_bytes(4, "big") + b[4:],  # header length past the end
    ],
)
def test_malformed_frames_are_refused(mangle) -> None:
    body = encode_batch([(np.zeros((2, 2, 3), np.uint8), GenerationParams())])
    with pytest.raises(FrameError):
        decode_batch(mangle(body))
    with pytest.raises(FrameError):
        decode_batch(body, max_items=0)


def test_the_http_ingest_path_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys, workers.replica_http, workers.pipeline, workers.runner, workers.health\n"
        "bad = sorted(m for m in ('torch', 'ray', 'tensorflow', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr


def test_refused_connection_and_503_raise_replicas_unavailable() -> None:
    tier = FakeTier(free_port()).start()
    replicas = HttpReplicas(tier.url, timeout_s=1)
    item = [(np.zeros((32, 32, 3), np.uint8), GenerationParams())]

    async def call():
        return await replicas.caption_many.remote(item)

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(call())[0].captions == ["fake 32x32"]
        for mode in ("busy", "stall", "down"):
            tier.set_mode(mode)
            with pytest.raises(ReplicasUnavailable):
                loop.run_until_complete(call())
        with pytest.raises(ReplicasUnavailable):
            replicas.info.remote().result(0.3)
        tier.set_mode("ok")
        assert replicas.info.remote().result(10).height == 32
    finally:
        loop.run_until_complete(replicas.aclose())
        loop.close()
        tier.stop()


@pytest.mark.kafka
@pytest.mark.s3
def test_transport_failures_pause_and_never_dead_letter(broker, s3_server, monkeypatch) -> None:
    """Refused, 503 and stalled calls: partitions pause, nothing is dead-lettered or lost, and
    the ingest catches up once the endpoint answers again."""
    from workers.pipeline import Pipeline

    for name, value in s3_server.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)

    tier = FakeTier(free_port()).start()
    settings = worker_settings(
        broker.bootstrap_servers,
        s3_server,
        worker=WorkerConfig(max_in_flight=8, drain_timeout_s=30, revoke_grace_s=2, cache_size=0),
        replicas=ReplicasConfig(max_batch_size=4, batch_wait_timeout_s=0.01),
    )
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.input_topic], partitions=2)
    ensure_topics(kafka, [kafka.output_topic, kafka.dead_letter_topic])
    n = 24
    uris = [upload(s3_server, f"transport/{i}.png", png_bytes(900 + i)) for i in range(n)]
    replicas = HttpReplicas(tier.url, timeout_s=0.5)
    pipeline = Pipeline(settings, replicas)
    tier.set_mode("down")
    produce(kafka.bootstrap_servers, kafka.input_topic, [request(u, id=f"t{i}") for i, u in enumerate(uris)])
    pipeline.start()
    try:
        # The window fills with records that cannot be answered: the source pauses.
        wait_until(
            lambda: metrics.PAUSED._value.get() == 1 and pipeline.window.count == 8,
            timeout_s=60,
            what="source paused on a full window",
        )
        retries = metrics.INFERENCE_RETRIES._value.get()
        wait_until(
            lambda: metrics.INFERENCE_RETRIES._value.get() >= retries + 2, timeout_s=30, what="refused calls retried"
        )
        tier.set_mode("busy")
        wait_until(lambda: tier.calls["busy"] >= 3, timeout_s=30, what="503s retried")
        tier.set_mode("stall")
        wait_until(lambda: tier.calls["stall"] >= 2, timeout_s=30, what="stalled calls retried")
        tier.set_mode("ok")
        results, dead = collect_outcomes(kafka, n, timeout=120)
    finally:
        pipeline.stop()
        replicas.close()
        tier.stop()
    assert dead == []
    assert sorted(json.loads(r.value)["id"] for r in results) == sorted(f"t{i}" for i in range(n))
    assert all(json.loads(r.value)["caption"] == "fake 32x32" for r in results)
