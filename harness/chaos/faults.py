"""The faults a chaos run injects into the running system, and when.

Replica kills (`ray.kill` of a Serve replica actor mid-batch), hung replicas (SIGSTOP of the
app's replica processes past `replicas.call_timeout_s` and until a call has timed out, then
SIGCONT: Serve still counts them live, so the calls they hold hang until the worker's call
deadline cancels and retries them; all of them, because with one stopped Serve's router sent the
calls to the other: a 200-request run saw no call time out), broker restarts (kill -9 and a start
on the same port; durable storage keeps everything); consumer kills and SIGTERM drains live with
the consumer processes (`consumers.ConsumerWorker`). S3 faults, throttling bursts among them,
come from the proxy (`proxy.ChaosProxy`).
The run's Ray and replica app are set up here too: the app name is unique to the run, and only
that app is deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.chaos.options import ChaosOptions
from workers.config import RayConfig, Settings
from workers.embedded import Broker


@dataclass(frozen=True)
class Fault:
    at: float  # fraction of requests with an outcome
    kind: str  # one of FAULT_KINDS


# Injected kinds, in round-robin order (a replica hang away from the replica kill: it waits for
# the killed replica's replacement, so that no fresh replica takes the calls the hang holds up).
FAULT_KINDS = ("replica_kill", "throttle_burst", "consumer_kill", "replica_hang", "broker_restart", "drain_rebalance")


def fault_counts(opts: ChaosOptions) -> dict[str, int]:
    """How many of each kind the options ask for."""
    counts = {
        "replica_kill": opts.kill_replicas,
        "consumer_kill": opts.kill_consumers,
        "broker_restart": opts.broker_restarts,
        "replica_hang": opts.hang_replicas,
        "throttle_burst": opts.throttle_bursts,
        "drain_rebalance": opts.drain_rebalances,
    }
    return {kind: counts[kind] for kind in FAULT_KINDS}


def fault_schedule(opts: ChaosOptions) -> list[Fault]:
    """Faults round-robin by kind, spread over 15–80 % of the stream (so each lands mid-stream)."""
    queues = [[kind] * count for kind, count in fault_counts(opts).items()]
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


def replica_pids(app_name: str) -> list[int]:
    """Pids of the app's replica processes (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    needle = f"ServeReplica:{app_name}:".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


class ReplicaHangs:
    """Stops an app's replica processes (SIGSTOP) and continues them after `hang_s`, or later,
    until `felt()` says a call has timed out, for at most `max_extra_s` more: a hang that starts
    while the consumers send nothing (a broker restart due at the same progress stops the
    stream) would otherwise end before any call reaches its deadline, proving nothing. Continuing
    at the first timeout keeps every call to one: the earliest call is the first to time out, and
    its retry is answered.
    `resume_all` continues any still stopped (the run's cleanup: nothing is left frozen)."""

    def __init__(self, hang_s: float, max_extra_s: float = 30.0):
        self.hang_s = hang_s
        self.max_extra_s = max_extra_s
        self._stopped: set[int] = set()
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._threads: list[threading.Thread] = []

    def hang(self, app_name: str, felt: Callable[[], bool] = lambda: True) -> list[int]:
        """Stop every replica process of the app now; continue them once `hang_s` has passed
        and `felt()` is true (or `max_extra_s` after that)."""
        pids = replica_pids(app_name)
        with self._lock:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    self._stopped.add(pid)
        thread = threading.Thread(target=self._resume_when, args=(pids, felt), name="replica-hang", daemon=True)
        thread.start()
        self._threads.append(thread)
        return pids

    def _resume_when(self, pids: list[int], felt: Callable[[], bool]) -> None:
        if not self._cancelled.wait(self.hang_s):
            give_up = time.monotonic() + self.max_extra_s
            while not felt() and time.monotonic() < give_up and not self._cancelled.wait(0.1):
                pass
        self._resume(pids)

    def _resume(self, pids: list[int]) -> None:
        with self._lock:
            for pid in pids:
                if pid in self._stopped:
                    self._stopped.discard(pid)
                    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                        os.kill(pid, signal.SIGCONT)

    def resume_all(self) -> None:
        self._cancelled.set()
        for thread in self._threads:
            thread.join(5)
        self._resume(list(self._stopped))


def restart_broker(broker: Broker) -> None:
    """kill -9 and start again on the same port (durable storage keeps everything)."""
    broker.restart(kill=True)
