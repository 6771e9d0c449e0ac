"""What every benchmark shares: the CPU header, the model it times, the generation settings, ratio lines.

Speed on CPU depends on the machine's matrix units (FIELD-NOTES: bf16 ran 2.4× faster than fp32
with AMX, 0.85× without), so every benchmark prints what this CPU has before any figure.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from workers.config import TINY_RANDOM, ModelConfig
from workers.params import GenerationParams

SAMPLES = Path(__file__).resolve().parents[2] / "workers" / "samples"
# Beam 2 and exactly 16 new tokens (min = max): random weights cannot make one side stop early.
BENCH_PARAMS = GenerationParams(beam_size=2, max_output_length=16, min_output_length=16)
# The flags that decide bf16/int8 speed on x86 (/proc/cpuinfo names).
MATRIX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    cores: int
    flags: frozenset[str]  # only the MATRIX_FLAGS present

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    def describe(self) -> str:
        present = [f for f in MATRIX_FLAGS if f in self.flags]
        return (
            f"CPU: {self.model}, {self.cores} cores; AMX: {'yes' if self.amx else 'no'}; "
            f"flags: {', '.join(present) or 'none of ' + ', '.join(MATRIX_FLAGS)}"
        )


def cpu_features(cpuinfo: str | None = None) -> CpuFeatures:
    """This machine's CPU model and matrix-unit flags, from /proc/cpuinfo (or the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and model == "unknown":
            model = value.strip()
        elif name == "flags" and not flags:
            flags = set(value.split())
    return CpuFeatures(model, os.cpu_count() or 1, frozenset(flags.intersection(MATRIX_FLAGS)))


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
