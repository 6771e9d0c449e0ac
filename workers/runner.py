"""`captioner run` and `captioner demo`: start what the settings ask for, run the pipeline, stop.

The order is the data's way backwards: embedded servers, Ray, the replica deployment (the model
must be loaded before the first record is read), then the consumers. Stopping goes the other
way: consumers drain and commit first, replicas and servers last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from workers import metrics
from workers.config import DEFAULT_MODEL, TOY_SHAPES, RayConfig, Settings
from workers.logs import adopt_ray_loggers
from workers.signals import (
    Stopped,
    keep_stop_handlers,
    on_stop_signals,
    raise_on_stop_signals,
)
from workers.ui import model_banner

log = logging.getLogger(__name__)
console = Console(stderr=True)

SAMPLES = Path(__file__).parent / "samples"
DEMO_SCENES, DEMO_SEED = 8, 2026  # the toy model's demo: scenes it never saw in training (seed 0)


def start_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, or start a local one bound to loopback."""
    if cfg.address is None:
        local_ray_environment()
    import ray

    adopt_ray_loggers()  # Ray's own lines in our format (JSON too) and under --verbose
    if ray.is_initialized():
        return
    if cfg.address is not None:
        with keep_stop_handlers():
            ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=False)
        return
    temp_dir = cfg.temp_dir or Path(os.environ.get("CAPTIONER_RAY_TMP", "/tmp/captioner-ray"))
    # The cluster it starts (GCS, raylet) is fate-shared with this process; the raylet's agents
    # are not (they lingered a minute after a SIGKILL): the watchdog kills them when we are gone.
    _start_watchdog()
    # Ray replaces the SIGTERM handler; the command's own stop handling must survive it.
    with keep_stop_handlers():
        ray.init(
            namespace=cfg.namespace,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=str(temp_dir),
        )


_watchdog: Any = None


def _start_watchdog() -> None:
    """One per process (kept referenced: it must run until this process is gone)."""
    global _watchdog
    if _watchdog is None or _watchdog.poll() is not None:
        from workers.watchdog import start_watchdog

        _watchdog = start_watchdog()


def start_serve(settings: Settings, *, http: bool) -> None:
    """Serve on the local Ray: HTTP proxy on the head (settings.http) or none at all."""
    from ray import serve

    adopt_ray_loggers()
    serve.start(
        proxy_location="HeadOnly" if http else "Disabled",
        http_options={"host": settings.http.host, "port": settings.http.port},
    )


def local_ray_environment() -> None:
    """A laptop or CI box: loopback only, no token auth, no usage stats. Set before `import ray`."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


LocalTier = Callable[[Settings], contextlib.AbstractContextManager[tuple[Settings, str, Any]]]


@contextlib.contextmanager
def running_system(settings: Settings, local_tier: LocalTier | None = None) -> Iterator[tuple[Settings, Any]]:
    """Embedded servers (where asked), the topics, and the inference tier, torn down in reverse.

    The ingest always reaches the replicas the same way: HTTP to the Serve app's batch endpoint
    (`workers/replica_http.py`). With `replicas.endpoint` set (production) that is the cluster's
    Serve proxy and this process starts no Ray; without it, `local_tier` (the CLI passes
    `deployment.local.local_inference_tier`: a local Ray + Serve on loopback) provides one.
    """
    from workers.embedded import resolve_embedded

    with resolve_embedded(settings) as embedded:
        settings = embedded.settings
        prepare_topics(settings)
        if settings.replicas.endpoint is not None:
            replicas = _http_replicas(settings, settings.replicas.endpoint)
            try:
                yield settings, replicas
            finally:
                replicas.close()
            return
        if local_tier is None:
            raise ValueError("replicas.endpoint is not set: give the inference tier's URL, or run it locally")
        with local_tier(settings) as (settings, endpoint, handle):
            replicas = _http_replicas(settings, endpoint)
            # Local only: benchmarks read the replica's batch sizes through the Serve handle.
            replicas.stats = handle.stats  # type: ignore[attr-defined]
            try:
                yield settings, replicas
            finally:
                replicas.close()


def prepare_topics(settings: Settings) -> None:
    """Create the topics where that is allowed (local); in any case check the input topic has
    the partitions the consumer group needs."""
    from workers.kafkaclient import check_input_topic, ensure_topics

    kafka = settings.kafka
    if kafka.create_topics:
        ensure_topics(kafka, [kafka.input_topic], partitions=kafka.min_input_partitions)
        ensure_topics(kafka, [kafka.output_topic, kafka.dead_letter_topic])
    check_input_topic(kafka, kafka.min_input_partitions)


def _http_replicas(settings: Settings, endpoint: str) -> Any:
    from workers.replica_http import HttpReplicas

    tokens = settings.http.token_strings() if settings.http.auth == "required" else []
    return HttpReplicas(endpoint, timeout_s=settings.replicas.call_timeout_s, token=tokens[0] if tokens else None)


def local_replica_settings(settings: Settings) -> Settings:
    """A local replica uses the machine: the ingest needs a few ms of CPU per image (decode,
    resize; docs/deployment.md), far below one core, so torch gets a thread per core instead
    of one per reserved CPU."""
    if settings.model.torch_threads is not None:
        return settings
    threads = os.cpu_count() or 1
    return settings.model_copy(update={"model": settings.model.model_copy(update={"torch_threads": threads})})


def watch_progress(pipeline: Any, settings: Settings) -> Any:
    """Liveness/readiness from the poll loops' progress on metrics.health_port (0: none)."""
    from workers.health import Health, serve_health

    cfg = settings.metrics
    if cfg.health_port == 0:
        return None
    health = Health(max_poll_gap_s=cfg.max_poll_gap_s, max_stall_s=cfg.max_stall_s)
    for source in pipeline.sources:  # one member per process in production (kafka.consumers: 1)
        source.health = health
    return serve_health(health, cfg.health_port, cfg.host)


def run(settings: Settings, local_tier: LocalTier | None = None) -> int:
    """The long-running worker; SIGTERM/SIGINT stop polling, drain, commit, exit 0."""
    from workers.pipeline import Pipeline

    metrics.serve_metrics(settings.metrics.port, settings.metrics.host)
    raise_on_stop_signals()
    try:
        with running_system(settings, local_tier) as (resolved, replicas):
            pipeline = Pipeline(resolved, replicas)
            watch_progress(pipeline, resolved)
            pipeline.start()
            stop = _stop_on_signals(pipeline)
            console.print(
                f"[bold green]captioner running[/]: {resolved.kafka.input_topic} → {resolved.kafka.output_topic} "
                f"(model {pipeline.model_record['name']}, backend {pipeline.model_record['backend']})"
            )
            if banner := model_banner(pipeline.model_record):
                console.print(banner)
            pipeline.wait()
            stop()
            return pipeline.exit_code if pipeline.failed.is_set() else 0
    except Stopped as e:
        console.print(f"[yellow]{e} while starting: stopped what had started[/]")
        return 0


def _stop_on_signals(pipeline: Any) -> Any:
    stopped = threading.Event()

    def stop(*_: object) -> None:
        if not stopped.is_set():
            stopped.set()
            console.print("[yellow]stopping: draining in-flight records and committing…[/]")
            pipeline.stop()

    on_stop_signals(pipeline.request_stop)
    return stop


def pretrained_available(source: str = DEFAULT_MODEL) -> bool:
    """Whether the pretrained checkpoint is in the local HF cache (the demo never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(source, local_files_only=True)
        return True
    except Exception:
        return False


def demo(
    settings: Settings, *, model: str | None = None, timeout_s: float = 300, local_tier: LocalTier | None = None
) -> int:
    """Embedded everything: upload the images, submit one request each, caption, print, exit.

    Without the pretrained checkpoint the default is the toy captioner on generated scenes of
    shapes whose true captions are known, so a first run shows captions a person can check;
    any other model captions the sample photos."""
    source = model or (DEFAULT_MODEL if pretrained_available() else TOY_SHAPES)
    settings = settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"source": source}),
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": "embedded"}),
            "s3": settings.s3.model_copy(update={"endpoint_url": "embedded"}),
        }
    )
    images, expected = demo_images(source)
    what = "generated scenes" if expected else "sample images"
    console.print(f"[bold]demo[/]: {len(images)} {what}, model {source}, embedded Kafka + S3 + Ray")
    raise_on_stop_signals()
    try:
        return _demo(settings, images, expected, timeout_s, local_tier)
    except Stopped as e:
        console.print(f"[yellow]{e} while starting: stopped what had started[/]")
        return 0


def demo_images(source: str) -> tuple[dict[str, bytes], dict[str, str] | None]:
    """The demo's images by name, and their true captions when they are known (the toy model's
    generated scenes; a fixed seed, so every run shows the same ones)."""
    if source == TOY_SHAPES:
        from workers.model.toy.scenes import labelled_pngs

        scenes = labelled_pngs(DEMO_SCENES, seed=DEMO_SEED)
        return {name: data for name, data, _ in scenes}, {name: caption for name, _, caption in scenes}
    files = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return {p.name: p.read_bytes() for p in files}, None


def _demo(
    settings: Settings,
    images: dict[str, bytes],
    expected: dict[str, str] | None,
    timeout_s: float,
    local_tier: LocalTier | None,
) -> int:
    from workers.contract import encode
    from workers.logs import ray_output_as_logs
    from workers.pipeline import Pipeline

    # Ray's own lines (and its shutdown noise) become --verbose logs; the table comes after.
    if settings.ray.address is None:
        local_ray_environment()  # before ray_output_as_logs imports ray
    with ray_output_as_logs(), running_system(settings, local_tier) as (resolved, replicas):
        from kafka import KafkaProducer

        from workers.kafkaclient import producer_kwargs
        from workers.outcomes import outcomes_by_id
        from workers.s3 import make_s3_client

        bucket = next(b for b in resolved.s3.allowed_buckets if b != "*")
        s3 = make_s3_client(resolved.s3)
        producer = KafkaProducer(**producer_kwargs(resolved.kafka, resolved.limits))
        for name, data in images.items():
            s3.put_object(Bucket=bucket, Key=f"samples/{name}", Body=data)
            request = {"id": name, "image": f"s3://{bucket}/samples/{name}"}
            producer.send(resolved.kafka.input_topic, key=name.encode(), value=encode(request))
        producer.flush()
        producer.close()

        pipeline = Pipeline(resolved, replicas).start()
        interrupted = threading.Event()
        on_stop_signals(interrupted.set)
        try:
            outcomes = outcomes_by_id(resolved.kafka, set(images), timeout_s=timeout_s, stop=interrupted)
        finally:
            pipeline.stop()
        model_record = pipeline.model_record
    if interrupted.is_set():
        console.print("[yellow]demo stopped by a signal; everything it started is stopped[/]")
        return 0
    print_outcomes(outcomes, list(images), expected)
    if banner := model_banner(model_record):
        console.print(banner)
    missing = set(images) - set(outcomes)
    return 1 if missing else 0


def print_outcomes(
    outcomes: dict[str, dict[str, Any]], order: list[str], expected: dict[str, str] | None = None
) -> None:
    """The demo's table; with `expected` (true captions), a column saying whether each caption is
    the true one, and what the true one is when it is not."""
    table = Table(title="captions", show_lines=False)
    table.add_column("image_name", no_wrap=True)
    table.add_column("caption", overflow="fold")
    if expected is not None:
        table.add_column("true caption?", overflow="fold")
    right = 0
    for name in order:
        body = outcomes.get(name)
        if body is None:
            row = [name, "[red](no outcome before the deadline)[/]"]
        elif "error" in body:
            row = [name, f"[red]{body['error']['code']}: {body['error']['message']}[/]"]
        else:
            row = [name, body["caption"]]
        if expected is not None:
            match = body is not None and body.get("caption") == expected[name]
            right += match
            row.append("[green]yes[/]" if match else f"[red]no:[/] {expected[name]}")
        table.add_row(*row)
    if expected is not None:
        table.caption = f"{right} of {len(order)} captions are the scene's true caption"
    Console().print(table)
