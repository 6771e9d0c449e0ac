"""The inference tier the scale benchmarks deploy: configs/serve.yaml's application (HTTP API,
batch endpoint, replicas) with stand-in replicas, on the local Serve under one name and prefix."""

from __future__ import annotations

from typing import Any

from workers.config import ModelConfig, ReplicasConfig, Settings
from workers.model.stand_in import LatencyProfile

APP = "scale-bench"
PREFIX = "/scale"
BATCH = 16


def deploy_app(settings: Settings) -> None:
    from ray import serve

    from deployment.app import application

    serve.run(application(settings, ingest=False), name=APP, route_prefix=PREFIX)


def replica_settings(base: Settings, profile: LatencyProfile, replicas: int, **extra: Any) -> Settings:
    return base.model_copy(
        update={
            "model": ModelConfig(source=profile.source),
            "replicas": ReplicasConfig(
                num_replicas=replicas, num_gpus=1, num_cpus=0, max_batch_size=BATCH, batch_wait_timeout_s=0.01, **extra
            ),
        }
    )
