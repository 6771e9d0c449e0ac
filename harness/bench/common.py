"""What every benchmark shares: the CPU header, the model it times, the generation settings, ratio lines.

Speed on CPU depends on the machine's matrix units (`workers/cpu.py`), so every benchmark prints
what this CPU has before any figure.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from workers.config import TINY_RANDOM, ModelConfig
from workers.cpu import cpu_features
from workers.params import GenerationParams

SAMPLES = Path(__file__).resolve().parents[2] / "workers" / "samples"
# Beam 2 and exactly 16 new tokens (min = max): random weights cannot make one side stop early.
BENCH_PARAMS = GenerationParams(beam_size=2, max_output_length=16, min_output_length=16)


def print_header(console: Console, title: str) -> None:
    """The first lines of every benchmark: what it is and what the CPU can do."""
    console.print(f"[bold]{title}[/]")
    console.print(cpu_features().describe())
    try:
        import torch

        console.print(
            f"torch {torch.__version__}: CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads"
        )
    except ImportError:  # a TF-only environment
        pass


def ratio_line(label: str, ratio: float, target: float) -> str:
    """`label = 2.61× (meets the 2.5× target)`: the form docs/benchmarks.md quotes."""
    verdict = "meets" if ratio >= target else "BELOW"
    return f"{label} = {ratio:.2f}× ({verdict} the {target}× target)"


def bench_model_dir(model: str, tmp: Path, console: Console) -> Path:
    """The benchmark's model: tiny-random from its cache, or the full-size one built into `tmp`."""
    from workers.model.loading import build_random_model, resolve_model_dir

    if model == TINY_RANDOM:
        return resolve_model_dir(ModelConfig(source=TINY_RANDOM)).path
    start = time.perf_counter()
    console.print("building the full-size ViT-GPT2 from configs with random weights ...")
    path = build_random_model(tmp / "vit-gpt2-random", size="full", seed=0)
    console.print(f"  built and saved in {time.perf_counter() - start:.1f} s ({path})")
    return path
