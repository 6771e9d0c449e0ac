"""The faults a chaos run injects into the running system, and when.

Replica kills (`ray.kill` of a Serve replica actor mid-batch), broker restarts (kill -9 and a
start on the same port; durable storage keeps everything); consumer kills live with the consumer
processes (`consumers.ConsumerWorker.kill`). S3 faults come from the proxy (`proxy.ChaosProxy`).
The run's Ray and replica app are set up here too: the app name is unique to the run, and only
that app is deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.chaos.options import ChaosOptions
from workers.config import RayConfig, Settings
from workers.embedded import Broker


@dataclass(frozen=True)
class Fault:
    at: float  # fraction of requests with an outcome
    kind: str  # replica_kill, consumer_kill or broker_restart


def fault_schedule(opts: ChaosOptions) -> list[Fault]:
    """Faults round-robin by kind, spread over 15–80 % of the stream (so each lands mid-stream)."""
    queues = [
        ["replica_kill"] * opts.kill_replicas,
        ["consumer_kill"] * opts.kill_consumers,
        ["broker_restart"] * opts.broker_restarts,
    ]
    kinds = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return [Fault(0.15 + 0.65 * (j + 0.5) / len(kinds), kind) for j, kind in enumerate(kinds)]


@contextlib.contextmanager
def replicas_app(settings: Settings, app_name: str, ray_tmp: Path) -> Iterator[Any]:
    """Reuse an initialised Ray (tests) or start one; deploy our app; delete only what we made."""
    from workers.runner import start_ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from workers.replicas import replica_app

    started_ray = not ray.is_initialized()
    if started_ray:
        ray_tmp.mkdir(parents=True, exist_ok=True)
        start_ray(RayConfig(num_cpus=2, temp_dir=ray_tmp, namespace="captioner-chaos"))
    serve.start(proxy_location="Disabled")
    try:
        yield serve.run(replica_app(settings.model, None, settings.replicas), name=app_name, route_prefix=None)
    finally:
        with contextlib.suppress(Exception):
            serve.delete(app_name)
        if started_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def replica_actor_names(app_name: str) -> list[str]:
    """Names of the app's live replica actors (Serve names them SERVE_REPLICA::app#deployment#id)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_one_replica(app_name: str, rng: random.Random) -> str:
    """ray.kill one live replica of the app: the calls it holds fail mid-batch."""
    import ray

    names = replica_actor_names(app_name)
    victim = rng.choice(names)
    # Not waiting for the replacement: the stream keeps flowing through the other replica
    # while Serve starts a new one (checked at the end of the run).
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    return victim


def restart_broker(broker: Broker) -> None:
    """kill -9 and start again on the same port (durable storage keeps everything)."""
    broker.restart(kill=True)
