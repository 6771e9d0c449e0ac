"""The streaming worker end to end with `model.backend: tf`: same contract, same captions as torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.kafka_helpers import produce
from helpers.worker_fixtures import collect_outcomes, png_bytes, request, tiny_model_config, upload, worker_settings
from workers.config import ReplicasConfig
from workers.kafkaclient import ensure_topics
from workers.pipeline import Pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.ray]


def test_tf_replicas_caption_the_stream_exactly_like_torch(broker, s3_server, ray_serve):
    from ray import serve

    from workers.images import prepare
    from workers.model import load_model
    from workers.replicas import replica_app

    tf_model = tiny_model_config().model_copy(update={"backend": "tf"})
    settings = worker_settings(broker.bootstrap_servers, s3_server, model=tf_model)
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic])
    images = [png_bytes(700 + i) for i in range(6)]
    uris = [upload(s3_server, f"tf/{i}.png", data) for i, data in enumerate(images)]
    params = [{}, {"beam_size": 4, "n_return_sequences": 2}, {"beam_size": 1}] * 2
    produce(
        kafka.bootstrap_servers,
        kafka.input_topic,
        [request(u, id=f"tf{i}", params=p) for i, (u, p) in enumerate(zip(uris, params, strict=True))],
    )

    replicas = ReplicasConfig(num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.05)
    handle = serve.run(replica_app(tf_model, None, replicas), name="tf-worker", route_prefix=None)
    pipeline = Pipeline(settings, handle).start()
    try:
        results, dead = collect_outcomes(kafka, len(uris), timeout=180)
        stats = handle.stats.remote().result(timeout_s=60)
    finally:
        pipeline.stop()
        serve.delete("tf-worker")

    assert dead == []
    bodies = {json.loads(r.value)["id"]: json.loads(r.value) for r in results}
    assert {b["model"]["backend"] for b in bodies.values()} == {"tf"}
    assert stats["backend"]["compiled_shapes"] >= 1 and stats["backend"]["shape_cache_hits"] >= 1

    # The PyTorch reference on the same weights and the same prepared pixels, one image at a time.
    torch_model = load_model(tiny_model_config())
    for i, data in enumerate(images):
        pixels = prepare(data, size=torch_model.info.spec, max_pixels=10**7).pixels[np.newaxis]
        expected = torch_model.caption(pixels, settings.generation.with_overrides(params[i]))[0]
        body = bodies[f"tf{i}"]
        assert body.get("captions", [body["caption"]]) == expected.captions, i
