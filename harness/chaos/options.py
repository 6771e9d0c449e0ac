"""What a chaos run is asked to do (`ChaosOptions`, the `chaos` command's flags) and the settings
its workers run with: short Kafka sessions, frequent commits, raised retry counts, a configured
(unused) SASL password whose leaking the run checks for.
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
    consumers: int = 2
    partitions: int = 4
    max_in_flight: int = 32
    # Retries run on the defaults (worker.inference_retry_budget_s, s3.retry_budget_s: 30 s of
    # backoff each): a killed replica or a burst of S3 faults must not need raised settings.
    poison_fraction: float = 0.12
    max_worker_rss_mb: int = 1500
    timeout_s: float | None = None  # default: scaled with requests
    workdir: Path | None = None
    keep_workdir: bool = False

    @property
    def deadline_s(self) -> float:
        return self.timeout_s if self.timeout_s is not None else 240 + self.requests * 0.15


def tmp_root() -> Path:
    """Where runs keep their work dirs and Ray's temp dir: .tmp/ in the tree (git-ignored)."""
    root = REPO / ".tmp"
    root.mkdir(exist_ok=True)
    return root


def chaos_settings(
    opts: ChaosOptions, *, bootstrap: str, s3_endpoint: str, run_id: str, kafka_secret: str
) -> Settings:
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
            "backoff_s": 0.02,
            "read_timeout_s": 10,
        },
        worker=WorkerConfig(
            max_in_flight=opts.max_in_flight,
            fetch_concurrency=8,
            drain_timeout_s=60,
            revoke_grace_s=2,
        ),
        replicas=ReplicasConfig(num_replicas=2, num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.02),
        limits=LimitsConfig(max_message_bytes=256 * 1024, max_object_bytes=1024 * 1024),
        metrics=MetricsConfig(port=0),
    )
