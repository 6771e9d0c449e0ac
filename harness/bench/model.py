"""`captioner bench --mode model`: batched CaptionModel vs a naive one-image-at-a-time transformers pipeline.

It builds the full-size ViT-GPT2 architecture from configs with random weights (the
pretrained checkpoint cannot be assumed here), or uses tiny-random for a smoke run, and measures
in ONE run, on the same machine and weights:
- CaptionModel.caption at each batch size, from encoded image bytes (decode + resize included);
- transformers' `pipeline("image-to-text")` called once per image file (its own decode and
  preprocessing included), the way a naive script would caption a folder.
Both generate with beam 2 and exactly 16 new tokens (min = max), so random weights cannot make
one side stop early. Each case is warmed up once; figures are the median of `rounds`, and the
rounds interleave the cases so that background load on a shared machine hits them alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from harness.bench.common import (
    BENCH_PARAMS,
    SAMPLES,
    bench_model_dir,
    print_header,
    ratio_line,
)
from harness.bench.report import BenchReport
from workers.config import TINY_RANDOM, ModelConfig

TARGET_RATIO = 2.5
TF_TARGET_RATIO = 0.9


@dataclass(frozen=True)
class Measurement:
    backend: str
    how: str
    batch_size: int
    images_per_s: float
    latency_s: float  # median wall time of one call: a batch, or one image for the naive loop


def main(backend: str, batch_sizes: list[int], model: str, rounds: int, report: BenchReport | None = None) -> None:
    if backend not in ("torch", "tf", "both"):
        raise ValueError(f"unknown backend {backend!r}: use torch, tf or both")
    if model not in ("full", TINY_RANDOM):
        raise ValueError(f"unknown bench model {model!r}: use 'full' or 'tiny-random'")
    if any(b < 1 for b in batch_sizes) or not batch_sizes or rounds < 1:
        raise ValueError("batch sizes and rounds must be positive")
    backends = ["torch", "tf"] if backend == "both" else [backend]
    if "tf" not in backends:
        os.environ.setdefault("USE_TF", "0")  # keep TensorFlow out of a torch-only run
    console = Console()
    print_header(console, f"bench mode=model model={model} backend={backend}")
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        model_dir = bench_model_dir(model, Path(tmp), console)
        measurements = _run(console, model_dir, model, backends, sorted(set(batch_sizes)), rounds)
    if report is not None:
        series: dict[str, dict[int, float]] = {}
        for m in measurements:
            series.setdefault(f"{m.backend} {m.how}", {})[m.batch_size] = m.images_per_s
        report.throughput_vs_batch("throughput-vs-batch", series, note=f"model={model}, beam 2, 16 new tokens")


@dataclass
class _Case:
    """One thing to time: `run` handles `images` images per call; `warm_up` primes it once."""

    backend: str
    how: str
    batch_size: int
    images: int
    run: Callable[[], None]
    warm_up: Callable[[], None]
    times: list[float] = field(default_factory=list)


def _run(
    console: Console, model_dir: Path, model: str, backends: list[str], batch_sizes: list[int], rounds: int
) -> list[Measurement]:
    import torch

    from workers.images import prepare
    from workers.model.core import load_model

    files = sorted(SAMPLES.glob("*.jpg"))
    encoded = [f.read_bytes() for f in files]
    cases: list[_Case] = []
    torch_model = None
    for name in backends:
        try:
            caption_model = load_model(ModelConfig(source=str(model_dir), backend=name), device="cpu")  # type: ignore[arg-type]
        except Exception as e:
            console.print(f"[red]backend {name}: cannot load ({type(e).__name__}: {e}); skipped[/red]")
            continue
        if name == "torch":
            torch_model = caption_model.backend.model
            params_count = sum(p.numel() for p in torch_model.parameters())
            console.print(f"torch: {params_count / 1e6:.1f} M parameters, {torch.get_num_threads()} threads")
        for batch_size in batch_sizes:
            batch = [encoded[i % len(encoded)] for i in range(batch_size)]

            def one_batch(batch: list[bytes] = batch, cm=caption_model) -> None:
                pixels = np.stack([prepare(b, size=cm.spec, max_pixels=100_000_000).pixels for b in batch])
                cm.caption(pixels, BENCH_PARAMS)

            cases.append(_Case(name, "CaptionModel.caption", batch_size, batch_size, one_batch, one_batch))
    cases.append(_naive_case(model_dir, torch_model, [files[i % len(files)] for i in range(max(batch_sizes))]))

    for case in cases:
        case.warm_up()
    # Rounds interleave the cases, so load from other processes on a shared machine slows all
    # of them alike instead of whichever case happened to run at the time.
    for round_ in range(rounds):
        for case in cases:
            start = time.perf_counter()
            case.run()
            case.times.append(time.perf_counter() - start)
            console.print(
                f"  round {round_ + 1}: {case.backend} {case.how} batch {case.batch_size}: {case.times[-1]:.2f} s"
            )
    measurements = []
    for case in cases:
        seconds = statistics.median(case.times)
        per_call = seconds if case.images == case.batch_size else seconds / case.images
        measurements.append(Measurement(case.backend, case.how, case.batch_size, case.images / seconds, per_call))
    _report(console, measurements, model, rounds)
    return measurements


def _naive_case(model_dir: Path, torch_model: object | None, files: list[Path]) -> _Case:
    """transformers' image-to-text pipeline, one image per call, same weights and settings."""
    from transformers import (
        AutoTokenizer,
        VisionEncoderDecoderModel,
        ViTImageProcessor,
        pipeline,
    )

    captioner = pipeline(
        "image-to-text",
        # The very same weights as the batched torch case (no second copy in memory).
        model=torch_model if torch_model is not None else VisionEncoderDecoderModel.from_pretrained(model_dir),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        image_processor=ViTImageProcessor.from_pretrained(model_dir),
        device="cpu",
    )
    kwargs = BENCH_PARAMS.generate_kwargs()

    def loop() -> None:
        for f in files:
            captioner(str(f), generate_kwargs=kwargs)

    return _Case(
        "torch",
        "naive pipeline, 1 image/call",
        1,
        len(files),
        loop,
        lambda: captioner(str(files[0]), generate_kwargs=kwargs),
    )


def _report(console: Console, measurements: list[Measurement], model: str, rounds: int) -> None:
    table = Table(title=f"bench mode=model model={model} beam 2, 16 new tokens, median of {rounds} round(s), CPU")
    for column in ("backend", "how", "batch", "images/s", "latency s"):
        table.add_column(column, justify="right" if column in ("batch", "images/s", "latency s") else "left")
    for m in measurements:
        table.add_row(m.backend, m.how, str(m.batch_size), f"{m.images_per_s:.2f}", f"{m.latency_s:.3f}")
    console.print(table)
    naive = next(m for m in measurements if m.how.startswith("naive"))
    for name in dict.fromkeys(m.backend for m in measurements if not m.how.startswith("naive")):
        largest = max(
            (m for m in measurements if m.backend == name and not m.how.startswith("naive")), key=lambda m: m.batch_size
        )
        ratio = largest.images_per_s / naive.images_per_s
        console.print(ratio_line(f"{name}: batch {largest.batch_size} / naive pipeline", ratio, TARGET_RATIO))
    _report_tf_vs_torch(console, measurements)
    # Peak resident memory of this process (both backends' weights when both ran).
    import resource

    console.print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def _report_tf_vs_torch(console: Console, measurements: list[Measurement]) -> None:
    """With --backend both: TF images/s over PyTorch's at each batch size, same run, same weights."""
    by = {(m.backend, m.batch_size): m for m in measurements if not m.how.startswith("naive")}
    for (backend, batch), tf in sorted(by.items(), key=lambda kv: kv[0][1]):
        torch_m = by.get(("torch", batch))
        if backend != "tf" or torch_m is None:
            continue
        console.print(ratio_line(f"batch {batch}: tf / torch", tf.images_per_s / torch_m.images_per_s, TF_TARGET_RATIO))
