"""The settings tree: one YAML file, overridden by `CAPTIONER_*` environment variables.

Precedence (highest first): overrides passed in code (CLI flags), the environment
(`CAPTIONER_KAFKA__INPUT_TOPIC=x`), the YAML file, the defaults below. A bad value fails at start with the key, the value and
what is wrong (`ConfigError`), never later in the hot path.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
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

from workers.model.params import GenerationParams

EMBEDDED = "embedded"
DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"
TINY_RANDOM = "tiny-random"

MB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    source: str = Field(
        DEFAULT_MODEL,
        description="Hub id, local save_pretrained directory, s3://bucket/prefix/, or 'tiny-random'.",
    )
    backend: Literal["torch", "tf"] = "torch"
    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("CAPTIONER_CACHE", "~/.cache/captioner")).expanduser()
        / "models",
        description="Where s3:// models are downloaded to (keyed by the objects' ETags).",
    )
    device: str = Field("auto", description="'auto' (GPU Ray assigned, else CPU), 'cpu' or 'cuda[:N]'.")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads for CPU inference")
    engine: bool = Field(True, description="torch: decode with the engine (continuous batching); false: generate")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "auto",
        description="engine precision: auto = bfloat16 on CUDA and AMX-BF16 CPUs, else float32; int8 = CPU dynamic quantisation",
    )

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a hub id, a directory, an s3:// prefix or 'tiny-random'")
        return v.strip()


class LimitsConfig(_Section):
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


class KafkaConfig(_Section):
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
        50, ge=0,
        description="how long the broker may hold a fetch with no data; Tansu answers a held "
        "fetch late when records arrive, so a low value is what keeps light-load latency low",
    )
    commit_interval_s: float = Field(1.0, gt=0)
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


class S3Config(_Section):
    endpoint_url: str | None = Field(
        EMBEDDED, description="'embedded', an http(s) URL, or null for AWS itself."
    )
    region: str = "us-east-1"
    allowed_buckets: list[str] = Field(
        default_factory=lambda: ["images"],
        description="Only these buckets may be read; '*' allows any (not recommended).",
    )
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    max_attempts: int = Field(4, ge=1, description="tries per object on 5xx/timeouts")
    backoff_s: float = Field(0.1, ge=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    max_pool_connections: int = Field(32, ge=1)

    @property
    def embedded(self) -> bool:
        return self.endpoint_url == EMBEDDED


class WorkerConfig(_Section):
    max_in_flight: int = Field(64, ge=1, description="pause the source at this many open messages")
    resume_below: int | None = Field(None, ge=0, description="resume under this (default half)")
    fetch_concurrency: int = Field(16, ge=1)
    cache_size: int = Field(1024, ge=0, description="LRU entries; 0 disables the caption cache")
    drain_timeout_s: float = Field(60.0, gt=0, description="SIGTERM: wait this long for open records")
    revoke_grace_s: float = Field(10.0, ge=0, description="rebalance: wait this long for revoked records")
    inference_attempts: int = Field(2, ge=1, description="tries per image when a replica call fails")
    produce_attempts: int = Field(3, ge=1, description="sends per outcome before the worker gives up")

    @model_validator(mode="after")
    def _check_watermarks(self) -> WorkerConfig:
        if self.resume_below is not None and self.resume_below >= self.max_in_flight:
            raise ValueError("resume_below must be lower than max_in_flight")
        return self

    @property
    def low_watermark(self) -> int:
        return self.max_in_flight // 2 if self.resume_below is None else self.resume_below


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(120, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ReplicasConfig(_Section):
    num_replicas: int = Field(1, ge=1, description="fixed count; ignored when autoscaling is set")
    autoscaling: AutoscalingConfig | None = None
    num_gpus: float = Field(0, ge=0, description="per replica; fractions pack replicas on a GPU")
    num_cpus: float = Field(1, ge=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(
        0.01, ge=0,
        description="how long a batch waits to fill, on the replica and, while a call is in "
        "flight, in the worker's micro-batcher; an idle worker sends at once",
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="default: 2 × max_batch_size, so full batches can form"
    )

    @field_validator("num_gpus")
    @classmethod
    def _fraction_or_whole(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("above 1, num_gpus must be a whole number")
        return v

    @model_validator(mode="after")
    def _check_ongoing(self) -> ReplicasConfig:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                f"max_batch_size ({self.max_batch_size}), or batches can never fill"
            )
        return self

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


class RayConfig(_Section):
    address: str | None = Field(None, description="None starts Ray locally; 'auto' joins a cluster")
    num_cpus: int | None = None
    num_gpus: int | None = Field(None, description="local only; fake GPUs for CPU-only tests")
    namespace: str = "captioner"
    app_name: str = "captioner"
    temp_dir: Path | None = None


class MetricsConfig(_Section):
    port: int = Field(9464, ge=0, le=65535, description="0 disables the /metrics endpoint")
    host: str = "127.0.0.1"


class HttpConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"


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
    def _generation_within_limits(self) -> Settings:
        try:
            self.limits.check_params(self.generation)
        except ValueError as e:
            raise ValueError(f"generation.{e}") from None
        return self

    def portable(self) -> dict[str, Any]:
        """The settings as plain data for another process (Serve args, actor options), without
        secrets: the receiving process reads those from its own environment (`from_portable`)."""
        return self.model_dump(mode="json", exclude={"kafka": {"sasl_password"}})

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


_yaml_data: ContextVar[dict[str, Any]] = ContextVar("captioner_yaml_data", default={})


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
            shown = "<secret>" if "password" in key or "secret" in key else repr(value)
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
    token = _yaml_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(source, e.errors(include_url=False)) from None
    finally:
        _yaml_data.reset(token)

