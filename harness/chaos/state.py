"""The state of one chaos run, in one object: what was started, what runs, what happened.

`run.py` builds a `RunState` once everything is up and hands it whole to each phase (faults,
the graceful end, the evaluation) instead of long parameter lists. `Observations` is what the run
measured at its end besides the outcomes (fault counts, memory, the secret scan, the workers'
counters), gathered before the evaluation so `report.evaluate` does no I/O.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.chaos.consumers import ConsumerWorker
from harness.chaos.corpus import Corpus
from harness.chaos.faults import ReplicaHangs
from harness.chaos.observe import MemorySampler
from harness.chaos.options import ChaosOptions
from harness.chaos.proxy import ChaosProxy, FaultPlan
from harness.chaos.stream import Collector, CommitProgress, Feeder
from workers.config import Settings
from workers.embedded import Broker, S3Server


@dataclass
class RunState:
    opts: ChaosOptions
    command: str
    run_id: str
    workdir: Path
    secrets: list[str]  # values that must appear in no log line and no output record
    rng: random.Random  # fault victims; the request mix and S3 faults have their own seeded draws
    started: float  # time.monotonic() at the start
    started_wall: float  # time.time() at the start (Ray log files written since)
    s3: S3Server
    broker: Broker
    proxy: ChaosProxy
    plan: FaultPlan  # the S3 faults once the stream flows (none during the uploads)
    settings: Settings  # what the consumer workers run with
    settings_path: Path  # the same, for the workers, without the SASL password
    child_env: dict[str, str]
    corpus: Corpus
    app_name: str  # the run's own Serve application
    sampler: MemorySampler
    progress: CommitProgress
    hangs: ReplicaHangs
    feeder: Feeder
    collector: Collector
    workers: list[ConsumerWorker] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)  # kind → injected
    killed_replicas: list[str] = field(default_factory=list)
    hung_replicas: list[int] = field(default_factory=list)  # pids stopped (and continued)
    exits: list[str] = field(default_factory=list)  # unexpected exits and run errors, for the report

    @property
    def total(self) -> int:
        return len(self.corpus.cases)

    def remaining_s(self) -> float:
        """Seconds left before the run's deadline (at least 1, so every wait still looks once)."""
        return max(1.0, self.started + self.opts.deadline_s - time.monotonic())

    def spawn_worker(self) -> ConsumerWorker:
        worker = ConsumerWorker(len(self.workers), self.workdir, self.settings_path, self.app_name, self.child_env)
        self.workers.append(worker.start())
        return worker

    def note_unexpected_exits(self) -> None:
        """Record each worker that exited without being killed (once per worker)."""
        noted = {e.split(":")[0] for e in self.exits}
        for w in self.workers:
            code = w.exit_code()
            # A drained worker's exit is expected; its code is checked when the run ends.
            if code is not None and not w.killed and not w.drained and w.name not in noted:
                self.exits.append(f"{w.name}: exited with {code}")


@dataclass
class Observations:
    faults: dict[str, Any]  # injected faults, proxy outcomes, feeder/collector retries
    peak_rss_mb: dict[str, float]
    scanned: dict[str, int]  # log files, log lines and output records scanned for secrets
    leaks: list[str]  # where a secret was found
    worker_stats: list[dict[str, Any]]
    worker_metrics: dict[str, dict[str, float]]  # worker name → counters from its registry dump
    wall_time_s: float
