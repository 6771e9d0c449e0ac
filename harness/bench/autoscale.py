"""Part 3 of `captioner bench --mode scale`: Serve autoscaling on real Serve (local Ray, stand-in
replicas): from 1 replica under a backlog of batch calls up to the maximum, and back down after.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np

from harness.bench.serve_app import APP, BATCH, deploy_app, replica_settings
from workers.config import AutoscalingConfig, Settings
from workers.model.stand_in import LatencyProfile

AUTOSCALE_PROFILE = LatencyProfile(200, 1)


def autoscale(
    endpoint: str,
    base: Settings,
    *,
    max_replicas: int,
    callers: int,
    hold_s: float = 60,
    profile: LatencyProfile = AUTOSCALE_PROFILE,
) -> list[tuple[float, int, bool]]:
    """Deploy autoscaling stand-in replicas (min 1), keep `callers` back-to-back batch calls going
    until the count reaches `max_replicas` (or `hold_s`), then stop and watch it come back to 1.
    Returns (seconds, running replicas, load on) samples."""
    from ray import serve

    from workers.params import GenerationParams
    from workers.replica_http import HttpReplicas
    from workers.replicas import DEPLOYMENT_NAME

    auto = AutoscalingConfig(
        min_replicas=1,
        initial_replicas=1,
        max_replicas=max_replicas,
        target_ongoing_requests=1,
        upscale_delay_s=0.5,
        downscale_delay_s=2,
        metrics_interval_s=0.5,
        look_back_period_s=1,
    )
    deploy_app(replica_settings(base, profile, 1, autoscaling=auto))

    def running() -> int:
        states = serve.status().applications[APP].deployments[DEPLOYMENT_NAME].replica_states
        return int(states.get("RUNNING", 0))

    timeline: list[tuple[float, int, bool]] = []
    start = time.monotonic()
    items = [(np.zeros((224, 224, 3), np.uint8), GenerationParams())] * BATCH

    async def load(stop: asyncio.Event) -> None:
        replicas = HttpReplicas(endpoint, timeout_s=30)

        async def caller() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # 503s while scaling are expected; keep the backlog
                    await replicas.caption_many.remote(items)

        tasks = [asyncio.create_task(caller()) for _ in range(callers)]
        while time.monotonic() - start < hold_s and running() < max_replicas:
            timeline.append((time.monotonic() - start, running(), True))
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        await replicas.aclose()

    asyncio.run(load(asyncio.Event()))
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        timeline.append((time.monotonic() - start, running(), False))
        if timeline[-1][1] == 1 and any(n == max_replicas for _, n, _ in timeline):
            break
        time.sleep(0.5)
    return timeline
