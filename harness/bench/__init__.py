"""`captioner bench`: benchmarks that print ratios measured in one run, with the CPU's features.

`model` (harness/bench/model.py): the batched CaptionModel against a naive one-image-per-call
transformers pipeline (and TF against PyTorch with --backend both). `pipeline`
(harness/bench/pipeline.py): the whole worker against the bare model. What both share
(the CPU header, the model builder, the generation settings, ratio lines) is in `common`.
"""

from __future__ import annotations

from harness.bench.common import cpu_features

__all__ = ["cpu_features", "main"]


def main(mode: str, backend: str, batch_sizes: list[int], model: str, rounds: int) -> None:
    if mode == "model":
        from harness.bench.model import main as run_mode
    elif mode == "pipeline":
        from harness.bench.pipeline import main as run_mode
    else:
        raise ValueError(f"unknown bench mode {mode!r}: use 'model' or 'pipeline'")
    run_mode(backend=backend, batch_sizes=batch_sizes, model=model, rounds=rounds)
