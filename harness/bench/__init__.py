"""`captioner bench`: benchmarks that print ratios measured in one run, with the CPU's features.

- `model` (model.py): the batched CaptionModel against a naive one-image-per-call transformers
  pipeline (and TF against PyTorch with --backend both);
- `pipeline` (pipeline.py): the whole worker against the bare model;
- `engine` (engine.py): the decoding engine against `generate`, precisions, continuous vs static
  latency under Poisson arrivals;
- `scale` (scale.py): N ingest processes × M Serve replicas with a stand-in model, and Serve
  autoscaling;
- `memory` (memory.py): peak RSS of concurrent 50-megapixel decodes, with and without the budget.
What they share (the CPU header, the model builder, the generation settings, ratio lines) is in
`common`; `report.py` turns what a mode measured into PNG plots and a Markdown summary.
"""

from __future__ import annotations

from pathlib import Path

from harness.bench.common import cpu_features
from harness.bench.report import BenchReport

__all__ = ["MODES", "cpu_features", "main"]


MODES = ("model", "pipeline", "engine", "scale", "memory")


def main(
    mode: str,
    backend: str = "torch",
    batch_sizes: list[int] | None = None,
    model: str = "full",
    rounds: int = 2,
    quick: bool = False,
    report_dir: Path | None = None,
) -> None:
    """Run one mode; with `report_dir`, also write its plots and `summary.md` there."""
    if mode not in MODES:
        raise ValueError(f"unknown bench mode {mode!r}: use one of {', '.join(MODES)}")
    report = (
        BenchReport(
            report_dir, cpu=cpu_features().describe().removeprefix("CPU: "), title=f"captioner bench --mode {mode}"
        )
        if report_dir
        else None
    )
    batch_sizes = batch_sizes or [1, 4, 16]
    if mode == "model":
        from harness.bench.model import main as run_model

        run_model(backend=backend, batch_sizes=batch_sizes, model=model, rounds=rounds, report=report)
    elif mode == "pipeline":
        from harness.bench.pipeline import main as run_pipeline

        run_pipeline(backend=backend, batch_sizes=batch_sizes, model=model, rounds=rounds)
    elif mode == "engine":
        from harness.bench.engine import run as run_engine

        run_engine(quick=quick, report=report)
    elif mode == "scale":
        from harness.bench.scale import run as run_scale

        scale = run_scale(quick=quick)
        if report is not None:
            report.scale_efficiency(
                "scale-efficiency",
                {p.ingests: p.rate for p in scale.phases},
                note="Stand-in model with a fixed latency profile: this measures the plumbing, not the model.",
            )
    else:
        from harness.bench.memory import run as run_memory

        rows = run_memory(requests=16 if quick else 64)
        if report is not None:
            report.bars(
                "memory-peak-rss",
                f"Peak RSS, {rows[0]['requests']} concurrent 50-megapixel images",
                {r["variant"]: r["peak_rss_mb"] for r in rows},
                "MB",
            )
    if report is not None:
        print(f"report: {report.write()}")
