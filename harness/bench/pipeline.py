"""`captioner bench --mode pipeline`: the whole worker against the bare model, in one run.

Same machine, same weights (the full-size architecture with random weights, or tiny-random for
a smoke run), beam 2 and exactly 16 new tokens (min = max, so random weights cannot stop early):

1. bare: CaptionModel.caption in this process on already-prepared arrays, at batch B (the
   largest of --batch-sizes) and at batch 1;
2. pipeline: embedded Kafka + S3 + Ray, one replica with max_batch_size B: N distinct images
   produced at once, timed from the first produce to the last result (throughput); then one
   request at a time, each timed from produce to its result being read (light-load latency).

It prints pipeline/bare throughput (target ≥ 0.9) and p50/p95 end-to-end latency next to the
bare batch-1 latency (target ≤ +50 ms). The bare model is released before the pipeline starts:
they must not share the CPU while either is timed.
"""

from __future__ import annotations

import gc
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from harness.bench.common import BENCH_PARAMS as PARAMS
from harness.bench.common import bench_model_dir, print_header, ratio_line
from workers.config import (
    TINY_RANDOM,
    ModelConfig,
    ReplicasConfig,
    Settings,
    WorkerConfig,
    load_settings,
)

THROUGHPUT_TARGET = 0.9
LATENCY_TARGET_MS = 50.0


def main(backend: str, batch_sizes: list[int], model: str, rounds: int) -> None:
    console = Console()
    batch = max(batch_sizes)
    print_header(console, f"bench mode=pipeline model={model} backend={backend} batch {batch}")
    with tempfile.TemporaryDirectory(prefix="captioner-bench-pipeline-") as tmp:
        model_dir = bench_model_dir(model, Path(tmp), console)
        spec_size = _input_size(model_dir)
        # Throughput is timed over `rounds` × 2 full batches: enough for batches to fill the way
        # they do under sustained load, not only the first partial one.
        images = [_png(i, spec_size) for i in range(batch * (2 * rounds + 1))]
        bare = _bare(model_dir, backend, batch, images, rounds, console)
        gc.collect()
        piped = _pipeline(model_dir, backend, batch, images, rounds, console)
    _report(console, model, backend, batch, bare, piped)


def _input_size(model_dir: Path) -> tuple[int, int]:
    from workers.model.preprocess import spec_from_dir

    spec = spec_from_dir(model_dir)
    return spec.height, spec.width


def _png(seed: int, size: tuple[int, int]) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bare(
    model_dir: Path, backend: str, batch: int, images: list[bytes], rounds: int, console: Console
) -> dict[str, float]:
    from workers.images import prepare
    from workers.model.core import load_model

    console.print(f"[bold]bare[/]: {backend} CaptionModel.caption in-process, batch {batch} and batch 1")
    model = load_model(ModelConfig(source=str(model_dir), backend=backend))
    spec = model.info.spec
    pixels = np.stack([prepare(b, size=spec, max_pixels=10**8).pixels for b in images[:batch]])
    model.caption(pixels, PARAMS)  # warm-up
    batch_times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.caption(pixels, PARAMS)
        batch_times.append(time.perf_counter() - start)
    model.caption(pixels[:1], PARAMS)
    single_times = []
    for i in range(max(5, rounds * 2)):
        start = time.perf_counter()
        model.caption(pixels[i % batch : i % batch + 1], PARAMS)
        single_times.append(time.perf_counter() - start)
    del model
    return {
        "images_per_s": batch / statistics.median(batch_times),
        "batch1_latency_ms": statistics.median(single_times) * 1000,
    }


def _pipeline(
    model_dir: Path, backend: str, batch: int, images: list[bytes], rounds: int, console: Console
) -> dict[str, Any]:
    from kafka import KafkaConsumer, KafkaProducer

    from deployment.local import local_inference_tier
    from workers.contract import encode
    from workers.kafkaclient import client_kwargs, producer_kwargs
    from workers.pipeline import Pipeline
    from workers.runner import running_system
    from workers.s3 import make_s3_client

    console.print(f"[bold]pipeline[/]: embedded Kafka + S3 + Ray, 1 replica, max_batch_size {batch}")
    settings: Settings = load_settings(
        model=ModelConfig(source=str(model_dir), backend=backend).model_dump(),
        generation=PARAMS.model_dump(),
        # The replica reserves every core, as the bare model uses them all (torch threads follow
        # the reservation); the default batch wait, so light-load latency is what users get.
        replicas=ReplicasConfig(num_replicas=1, num_cpus=os.cpu_count() or 1, max_batch_size=batch).model_dump(),
        worker=WorkerConfig(max_in_flight=4 * batch, cache_size=0).model_dump(),
        metrics={"port": 0},
        ray={"temp_dir": str(Path(tempfile.gettempdir()) / "captioner-bench-ray"), "num_cpus": os.cpu_count() or 2},
    )
    with running_system(settings, local_inference_tier) as (resolved, replicas):
        kafka = resolved.kafka
        bucket = resolved.s3.allowed_buckets[0]
        s3 = make_s3_client(resolved.s3)
        uris = []
        for i, data in enumerate(images):
            s3.put_object(Bucket=bucket, Key=f"bench/{i}.png", Body=data)
            uris.append(f"s3://{bucket}/bench/{i}.png")
        producer = KafkaProducer(**producer_kwargs(kafka, resolved.limits))
        consumer = KafkaConsumer(
            kafka.output_topic,
            kafka.dead_letter_topic,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            **client_kwargs(kafka),
        )
        pipeline = Pipeline(resolved, replicas).start()
        seen: dict[str, float] = {}
        stage_ms: dict[str, list[float]] = {}

        def send(ids: list[str]) -> float:
            start = time.perf_counter()
            for rid in ids:
                producer.send(kafka.input_topic, encode({"id": rid, "image": uris[int(rid.split("-")[1])]}))
            producer.flush()
            return start

        def wait_for(ids: list[str], timeout: float = 600) -> None:
            deadline = time.monotonic() + timeout
            while not all(r in seen for r in ids):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{sum(r in seen for r in ids)}/{len(ids)} outcomes")
                for records in consumer.poll(timeout_ms=50).values():
                    for rec in records:
                        body = json.loads(rec.value)
                        if "error" in body:
                            raise RuntimeError(f"bench request failed: {body['error']}")
                        seen[body["id"]] = time.perf_counter()
                        if body["id"].startswith("one-"):
                            for stage, ms in body["timings_ms"].items():
                                stage_ms.setdefault(stage, []).append(ms)

        try:
            warm = [f"warm-{i}" for i in range(batch)]
            send(warm)
            wait_for(warm)
            timed = [f"run-{i}" for i in range(batch, len(images))]
            start = send(timed)
            wait_for(timed)
            throughput = len(timed) / (max(seen[r] for r in timed) - start)
            batch_sizes = replicas.stats.remote().result()["batch_sizes"]
            latencies = []
            for i in range(max(5, rounds * 2)):
                rid = f"one-{i % len(images)}"
                seen.pop(rid, None)
                t0 = send([rid])
                wait_for([rid])
                latencies.append((seen[rid] - t0) * 1000)
        finally:
            pipeline.stop()
            producer.close()
            consumer.close()
    latencies.sort()
    return {
        "images_per_s": throughput,
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
        "stages_ms": {stage: statistics.median(values) for stage, values in stage_ms.items()},
        "batch_sizes": batch_sizes,
    }


def _report(
    console: Console, model: str, backend: str, batch: int, bare: dict[str, float], piped: dict[str, Any]
) -> None:
    table = Table(title=f"pipeline vs bare model ({model}, {backend}, beam 2, 16 new tokens, batch {batch})")
    for col in ("", "bare model", "pipeline", "ratio / delta", "target"):
        table.add_column(col)
    ratio = piped["images_per_s"] / bare["images_per_s"]
    delta = piped["p50_ms"] - bare["batch1_latency_ms"]
    table.add_row(
        "images/s",
        f"{bare['images_per_s']:.2f}",
        f"{piped['images_per_s']:.2f}",
        f"{ratio:.2f}×",
        f"≥ {THROUGHPUT_TARGET}×",
    )
    table.add_row(
        "latency p50 (light load)",
        f"{bare['batch1_latency_ms']:.0f} ms (batch 1)",
        f"{piped['p50_ms']:.0f} ms",
        f"{delta:+.0f} ms",
        f"≤ +{LATENCY_TARGET_MS:.0f} ms",
    )
    table.add_row("latency p95 (light load)", "", f"{piped['p95_ms']:.0f} ms", "", "")
    console.print(table)
    console.print(ratio_line("pipeline / bare model images/s", ratio, THROUGHPUT_TARGET))
    stages = ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in piped["stages_ms"].items())
    console.print(f"light load, median per stage inside the worker: {stages}")
    console.print(f"batch sizes the replica ran (warm-up and throughput): {piped['batch_sizes']}")
    if model == TINY_RANDOM:
        console.print("[yellow]tiny-random: a smoke run; the figures that count come from --model full[/]")
