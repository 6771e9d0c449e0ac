"""What a chaos run is asked to do (`ChaosOptions`, the `chaos` command's flags) and the settings
its workers run with: short Kafka sessions, frequent commits, the default retry budgets, two
deadlines shortened so the slow faults land within a bounded run, and a configured (unused) SASL
password whose leaking the run checks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from workers.config import (
    KafkaConfig,
    LimitsConfig,
    MetricsConfig,
    ModelConfig,
    ReplicasConfig,
    Settings,
    WorkerConfig,
)

REPO = Path(__file__).resolve().parents[2]
BUCKET = "images"
PRIVATE_BUCKET = "chaos-private"  # exists and holds an object, but is not allow-listed
KAFKA_SECRET_ENV = "CAPTIONER_KAFKA__SASL_PASSWORD"
# Defaults 60 s and 120 s; shortened so a dripping GET and a hung replica are cut off and
# retried within the run (a dripped 5 KB image would take a minute; a hang, forever).
FETCH_DEADLINE_S = 5.0
CALL_TIMEOUT_S = 10.0
# Near-limit images are decoded by the workers: 4 MP keeps that affordable on 2 cores
# (the default is 50 MP).
MAX_IMAGE_PIXELS = 4_000_000


@dataclass
class ChaosOptions:
    requests: int = 300
    seed: int = 0
    kill_replicas: int = 1
    kill_consumers: int = 1
    broker_restarts: int = 1
    s3_error_rate: float = 0.05
    s3_drop_rate: float = 0.02
    s3_delay_rate: float = 0.02
    s3_truncate_rate: float = 0.02
    s3_delay_s: float = 0.3
    # A GET whose body arrives 2 bytes every 0.25 s: only s3.fetch_deadline_s cuts it off
    # (even the smallest object in the mix, a ~70-byte PNG, would take ~9 s).
    s3_drip_rate: float = 0.01
    s3_drip_bytes: int = 2
    s3_drip_interval_s: float = 0.25
    hang_replicas: int = 1  # times the replicas are SIGSTOPped past replicas.call_timeout_s, then SIGCONT
    throttle_bursts: int = 1  # every S3 call answered 503 SlowDown for throttle_burst_s
    throttle_burst_s: float = 2.5
    drain_rebalances: int = 1  # SIGTERM a consumer (it drains) while a replacement joins the group
    consumers: int = 2
    partitions: int = 4
    max_in_flight: int = 32
    # Retries run on the defaults (worker.inference_retry_budget_s, s3.retry_budget_s: 30 s of
    # backoff each; s3.backoff_s): a killed replica or a burst of S3 faults must not need raised
    # settings. Two per-attempt deadlines are shortened instead, so a slow fault is cut off (and
    # retried) within a bounded run: see FETCH_DEADLINE_S and CALL_TIMEOUT_S.
    poison_fraction: float = 0.12
    max_worker_rss_mb: int = 1500
    timeout_s: float | None = None  # default: scaled with requests
    workdir: Path | None = None
    keep_workdir: bool = False

    @property
    def hang_s(self) -> float:
        """How long the replicas stay stopped: calls made in the first 8 s time out, and their
        retries are answered once the replicas continue, inside the 30 s retry budget."""
        return CALL_TIMEOUT_S + 8

    @property
    def deadline_s(self) -> float:
        return self.timeout_s if self.timeout_s is not None else 240 + self.requests * 0.15


def tmp_root() -> Path:
    """Where runs keep their work dirs and Ray's temp dir: .tmp/ in the tree (git-ignored)."""
    root = REPO / ".tmp"
    root.mkdir(exist_ok=True)
    return root


def chaos_settings(opts: ChaosOptions, *, bootstrap: str, s3_endpoint: str, run_id: str, kafka_secret: str) -> Settings:
    return Settings(
        model=ModelConfig(source="tiny-random", cache_dir=REPO / ".tmp" / "models", torch_threads=1),
        kafka=KafkaConfig(
            bootstrap_servers=bootstrap,
            input_topic=f"chaos-in-{run_id}",
            output_topic=f"chaos-out-{run_id}",
            dead_letter_topic=f"chaos-dlq-{run_id}",
            group_id=f"chaos-group-{run_id}",
            client_id=f"chaos-{run_id}",
            consumers=1,
            # Short sessions (FIELD-NOTES: the first join waits half of it; a SIGKILLed member's
            # partitions move after it), frequent commits (fewer redeliveries per fault).
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            poll_timeout_ms=100,
            commit_interval_s=0.2,
            # Not used on PLAINTEXT: present so the scan proves a configured secret never leaks.
            sasl_password=SecretStr(kafka_secret),
        ),
        s3={
            "endpoint_url": s3_endpoint,
            "allowed_buckets": [BUCKET],
            "read_timeout_s": 10,
            "fetch_deadline_s": FETCH_DEADLINE_S,
        },
        worker=WorkerConfig(
            max_in_flight=opts.max_in_flight,
            fetch_concurrency=8,
            drain_timeout_s=60,
            revoke_grace_s=2,
        ),
        replicas=ReplicasConfig(
            num_replicas=2, num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.02, call_timeout_s=CALL_TIMEOUT_S
        ),
        limits=LimitsConfig(
            max_message_bytes=256 * 1024, max_object_bytes=1024 * 1024, max_image_pixels=MAX_IMAGE_PIXELS
        ),
        metrics=MetricsConfig(port=0),
    )
