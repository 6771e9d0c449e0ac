"""The settings tree: one YAML file, overridden by `CAPTIONER_*` environment variables.

Precedence (highest first): overrides passed in code (CLI flags), the environment
(`CAPTIONER_KAFKA__INPUT_TOPIC=x`), the YAML file, the defaults below. A bad value fails at
start with the key, the value and
what is wrong (`ConfigError`), never later in the hot path.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from workers.config_http import HttpConfig, Section
from workers.params import GenerationParams

EMBEDDED = "embedded"
DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"
TINY_RANDOM = "tiny-random"
# The toy captioner shipped in the package (workers/model/toy): trained, but only on generated
# scenes of coloured shapes; its captions mean something only for such images.
TOY_SHAPES = "toy-shapes"

MB = 1024 * 1024


class ModelConfig(Section):
    source: str = Field(
        DEFAULT_MODEL,
        description="Hub id, local save_pretrained directory, s3://bucket/prefix/, or 'tiny-random'.",
    )
    backend: Literal["torch", "tf"] = "torch"
    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("CAPTIONER_CACHE", "~/.cache/captioner")).expanduser() / "models",
        description="Where s3:// models are downloaded to (keyed by the objects' ETags).",
    )
    device: str = Field("auto", description="'auto' (GPU Ray assigned, else CPU), 'cpu' or 'cuda[:N]'.")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads for CPU inference")
    engine: bool = Field(True, description="torch: decode with the engine (continuous batching); false: generate")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "auto",
        description="engine precision: auto = bfloat16 on CUDA and on CPUs with AMX-BF16 or AVX512-BF16, else float32; "
        "int8 = CPU dynamic quantisation",
    )

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a hub id, a directory, an s3:// prefix or 'tiny-random'")
        return v.strip()


class LimitsConfig(Section):
    """Caps that keep one message from taking the worker down; all are per request."""

    max_message_bytes: int = Field(2 * MB, gt=0, description="Larger Kafka values are invalid_message.")
    max_object_bytes: int = Field(20 * MB, gt=0, description="Larger S3 objects are object_too_large.")
    max_image_pixels: int = Field(50_000_000, gt=0, description="Larger images are image_too_large.")
    max_http_body_bytes: int = Field(25 * MB, gt=0)
    max_beam_size: int = Field(8, ge=1)
    max_output_length: int = Field(64, ge=1)
    max_return_sequences: int = Field(8, ge=1)

    def check_params(self, params: GenerationParams) -> None:
        """Raise ValueError naming the first param above its cap."""
        for name, limit in (
            ("beam_size", "max_beam_size"),
            ("max_output_length", "max_output_length"),
            ("n_return_sequences", "max_return_sequences"),
        ):
            value, cap = getattr(params, name), getattr(self, limit)
            if value > cap:
                raise ValueError(f"{name}={value} exceeds limits.{limit} ({cap})")


class KafkaConfig(Section):
    bootstrap_servers: str = Field(EMBEDDED, description="'embedded' or host:port[,host:port]")
    input_topic: str = "images"
    output_topic: str = "captions"
    dead_letter_topic: str = "captions.dlq"
    group_id: str = "captioner"
    client_id: str = "captioner"
    consumers: int = Field(1, ge=1, description="consumer-group members in this process")
    session_timeout_ms: int = Field(10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(2_000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    poll_timeout_ms: int = Field(200, ge=1)
    fetch_max_wait_ms: int = Field(
        50,
        ge=0,
        description="how long the broker may hold a fetch with no data; Tansu answers a held "
        "fetch late when records arrive, so a low value is what keeps light-load latency low",
    )
    commit_interval_s: float = Field(1.0, gt=0)
    create_topics: bool = Field(
        True,
        description="create missing topics at start (local); false in prod, where topics are "
        "provisioned and the ingest only checks them",
    )
    min_input_partitions: int = Field(
        1,
        ge=1,
        description="the ingest refuses to start unless the input topic has at least this many "
        "partitions (prod: the KEDA ScaledObject's maxReplicaCount)",
    )
    # TLS / SASL. Secrets come from the environment (CAPTIONER_KAFKA__SASL_PASSWORD), never YAML.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    @model_validator(mode="after")
    def _check_security(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism, sasl_username "
                "and sasl_password (set CAPTIONER_KAFKA__SASL_PASSWORD in the environment)"
            )
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        return self

    @property
    def embedded(self) -> bool:
        return self.bootstrap_servers == EMBEDDED


class S3Config(Section):
    endpoint_url: str | None = Field(EMBEDDED, description="'embedded', an http(s) URL, or null for AWS itself.")
    region: str = "us-east-1"
    allowed_buckets: list[str] = Field(
        default_factory=lambda: ["images"],
        description="Only these buckets may be read; '*' allows any (not recommended).",
    )
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    max_attempts: int | None = Field(
        None, ge=1, description="tries per object on 5xx/throttling/timeouts; null: as many as retry_budget_s allows"
    )
    retry_budget_s: float = Field(
        30.0, ge=0, description="transient failures are retried (backoff with jitter) for this long, then fetch_failed"
    )
    backoff_s: float = Field(0.1, ge=0, description="first retry's delay; doubles per try up to 5 s, jittered")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0, description="per socket read")
    fetch_deadline_s: float = Field(
        60.0, gt=0, description="one attempt's total time (HEAD + GET + body): a server that drips bytes is cut off"
    )
    max_pool_connections: int = Field(32, ge=1)

    @property
    def embedded(self) -> bool:
        return self.endpoint_url == EMBEDDED


class WorkerConfig(Section):
    max_in_flight: int = Field(64, ge=1, description="pause the source at this many open messages")
    resume_below: int | None = Field(None, ge=0, description="resume under this (default half)")
    fetch_concurrency: int = Field(16, ge=1)
    cache_size: int = Field(1024, ge=0, description="LRU entries; 0 disables the caption cache")
    drain_timeout_s: float = Field(60.0, gt=0, description="SIGTERM: wait this long for open records")
    revoke_grace_s: float = Field(
        2.0,
        ge=0,
        description="rebalance: wait this long for revoked records; it runs on the heartbeat thread, so it "
        "must stay well under kafka.session_timeout_ms (checked)",
    )
    inference_retry_budget_s: float = Field(
        30.0,
        ge=0,
        description="replica calls that fail as a whole (replicas unavailable, restarting, timing out) are "
        "retried with backoff and jitter for this long; then inference_failed",
    )
    produce_deadline_s: float = Field(
        120.0,
        gt=0,
        description="an outcome the broker does not take (unreachable, timeouts) is re-sent with backoff for "
        "this long; then the worker stops with exit code 3 and commits nothing past it",
    )
    memory_budget_bytes: int = Field(
        1024 * MB,
        ge=16 * MB,
        description="process-wide bytes of images being decoded at once (encoded, decoded and "
        "transient copies, estimated from each header); sized for a 2 GiB pod",
    )

    @model_validator(mode="after")
    def _check_watermarks(self) -> WorkerConfig:
        if self.resume_below is not None and self.resume_below >= self.max_in_flight:
            raise ValueError("resume_below must be lower than max_in_flight")
        return self

    @property
    def low_watermark(self) -> int:
        return self.max_in_flight // 2 if self.resume_below is None else self.resume_below


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: int | None = Field(
        None, ge=0, description="replicas a new deployment starts with (an upgrade: the steady state)"
    )
    target_ongoing_requests: float = Field(
        2,
        gt=0,
        description="calls per replica, not images: the ingest's calls carry up to max_batch_size "
        "images, so 2 is one batch generating and the next one formed",
    )
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(120, ge=0)
    metrics_interval_s: float = Field(10, gt=0, description="how often replicas report their ongoing calls")
    look_back_period_s: float = Field(30, gt=0, description="the window the autoscaler averages over")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class ReplicasConfig(Section):
    num_replicas: int = Field(1, ge=1, description="fixed count; ignored when autoscaling is set")
    autoscaling: AutoscalingConfig | None = None
    num_gpus: float = Field(0, ge=0, description="per replica; fractions pack replicas on a GPU")
    num_cpus: float = Field(1, ge=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        description="how long a batch waits to fill, on the replica and, while a call is in "
        "flight, in the worker's micro-batcher; an idle worker sends at once",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=2,
        description="calls a replica takes at once; default 2 × max_batch_size, so per-image "
        "callers (POST /v1/captions) can still fill a batch",
    )
    call_timeout_s: float = Field(
        120.0, gt=0, description="a replica call's total deadline; a hung call is cancelled and retried"
    )
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="calls each caller may queue when every replica is at "
        "max_ongoing_requests; beyond it Serve answers 503 and the ingest pauses (None: unbounded)",
    )
    endpoint: str | None = Field(
        None,
        description="URL of the inference tier's Serve proxy (e.g. http://captioner-serve-svc:8000): "
        "`captioner run` then calls its batch endpoint over HTTP and starts no Ray",
    )

    @field_validator("num_gpus")
    @classmethod
    def _fraction_or_whole(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("above 1, num_gpus must be a whole number")
        return v

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


class RayConfig(Section):
    address: str | None = Field(None, description="None starts Ray locally; 'auto' joins a cluster")
    num_cpus: int | None = None
    num_gpus: int | None = Field(None, description="local only; fake GPUs for CPU-only tests")
    namespace: str = "captioner"
    app_name: str = "captioner"
    temp_dir: Path | None = None


class MetricsConfig(Section):
    port: int = Field(9464, ge=0, le=65535, description="0 disables the /metrics endpoint")
    host: str = "127.0.0.1"
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="/livez and /readyz from the poll loop's progress (workers/health.py); 0 disables",
    )
    max_poll_gap_s: float = Field(
        60.0, gt=0, description="not live when the poll loop has not come round for this long"
    )
    max_stall_s: float = Field(
        900.0,
        gt=0,
        description="not live when the commit watermark has not moved for this long with records open; "
        "keep it above the ingest's inference retry budget",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CAPTIONER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    s3: S3Config = Field(default_factory=S3Config)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    replicas: ReplicasConfig = Field(default_factory=ReplicasConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)

    @model_validator(mode="after")
    def _revoke_fits_the_session(self) -> Settings:
        # kafka-python runs the rebalance listener on its heartbeat path: a revoke that waits
        # longer than a third of the session timeout risks the member's eviction.
        bound_s = self.kafka.session_timeout_ms / 1000 / 3
        if self.worker.revoke_grace_s > bound_s:
            raise ValueError(
                f"worker.revoke_grace_s ({self.worker.revoke_grace_s}) must be at most a third of "
                f"kafka.session_timeout_ms ({bound_s:.1f} s), or a slow revoke gets the member evicted"
            )
        return self

    @model_validator(mode="after")
    def _generation_within_limits(self) -> Settings:
        try:
            self.limits.check_params(self.generation)
        except ValueError as e:
            raise ValueError(f"generation.{e}") from None
        return self

    def portable(self) -> dict[str, Any]:
        """The settings as plain data for another process (Serve args, actor options), without
        secrets: the receiving process reads those from its own environment (`from_portable`)."""
        return self.model_dump(mode="json", exclude={"kafka": {"sasl_password"}, "http": {"auth_tokens"}})

    @classmethod
    def from_portable(cls, data: dict[str, Any]) -> Settings:
        return cls(**data)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: code/CLI overrides, the environment, the YAML file (see load_settings).
        return (init_settings, env_settings, _YamlFileSource(settings_cls))


# Read-only: load_settings sets a new dict per call, nothing mutates the default.
_yaml_data: ContextVar[dict[str, Any]] = ContextVar("captioner_yaml_data", default={})  # noqa: B039


class _YamlFileSource(PydanticBaseSettingsSource):
    """The YAML file's values, ranked below the environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get())


class ConfigError(ValueError):
    """A config that cannot start: names each bad key, the value given and what is wrong."""

    def __init__(self, source: str, errors: list[dict[str, Any]]):
        self.errors = errors
        lines = []
        for e in errors:
            key = ".".join(str(p) for p in e.get("loc", ())) or "(root)"
            value = e.get("input")
            shown = "<secret>" if any(w in key for w in ("password", "secret", "token")) else repr(value)
            if isinstance(value, dict):
                shown = "{...}"
            lines.append(f"  {key} = {shown}: {e.get('msg')}")
        super().__init__(f"invalid configuration ({source}):\n" + "\n".join(lines))


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (if any), apply CAPTIONER_* env vars and overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(source, [{"loc": (), "input": str(p), "msg": "config file not found"}]) from None
        except yaml.YAMLError as e:
            raise ConfigError(source, [{"loc": (), "input": None, "msg": f"not valid YAML: {e}"}]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(source, [{"loc": (), "input": loaded, "msg": "top level must be a mapping"}])
        data = loaded
        if isinstance(data.get("http"), dict) and "auth_tokens" in data["http"]:
            raise ConfigError(
                source,
                [
                    {
                        "loc": ("http", "auth_tokens"),
                        "input": None,
                        "msg": "secrets come only from the environment "
                        "(CAPTIONER_HTTP__AUTH_TOKENS) or http.auth_tokens_file",
                    }
                ],
            )
    token = _yaml_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(source, e.errors(include_url=False)) from None
    finally:
        _yaml_data.reset(token)
