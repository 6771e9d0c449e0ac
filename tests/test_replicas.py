"""Replica placement on GPUs Ray assigns (fake GPUs: `ray.init(num_gpus=2)` in the session fixture)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from helpers.worker_fixtures import tiny_replicas
from workers.config import ReplicasConfig
from workers.embedded import wait_until
from workers.replica_api import ReplicaInfo

pytestmark = [pytest.mark.ray]


def replica_infos(handle: Any, count: int) -> dict[str, ReplicaInfo]:
    """Ask until `count` distinct replicas answered (the router spreads calls over them)."""
    seen: dict[str, ReplicaInfo] = {}

    def all_seen() -> bool:
        info = handle.info.remote().result(timeout_s=60)
        seen[info.replica_id] = info
        return len(seen) >= count

    wait_until(all_seen, timeout_s=120, interval_s=0, what=f"{count} replicas answering")
    return seen


@pytest.mark.parametrize("replicas, gpus_each, per_gpu", [(2, 1.0, 1), (4, 0.5, 2)])
def test_replicas_are_pinned_to_the_gpus_ray_assigns(ray_serve, replicas, gpus_each, per_gpu):
    config = ReplicasConfig(num_replicas=replicas, num_gpus=gpus_each, num_cpus=0, max_batch_size=2)
    with tiny_replicas(f"pinning-{replicas}", config) as handle:
        infos = replica_infos(handle, replicas)
    devices = Counter(info.cuda_visible_devices for info in infos.values())
    assert devices == {"0": per_gpu, "1": per_gpu}, devices
    for info in infos.values():
        assert info.gpu_ids == [info.cuda_visible_devices]
        # No CUDA on this machine: a replica with an assigned GPU id still runs, on the CPU.
        assert info.device == "cpu"
