"""Which precision the engine computes in (`model.dtype`), from what the CPU can do (`workers/cpu.py`).

`auto` is bfloat16 on CUDA and on CPUs that multiply bf16 in hardware: AMX-BF16 tiles (Sapphire
Rapids and later) or AVX512-BF16 dot products (Cooper Lake, AMD Zen 4 and later). On an AMD EPYC
with AVX512-BF16 and no AMX the engine ran 2.2× faster in bf16 than in fp32 (`captioner bench
--mode engine --also bfloat16`, docs/benchmarks.md), and the trained toy model keeps ≥ 99% of its
captions. Elsewhere (AVX2, plain AVX-512) bf16 is emulated at no gain worth the lost precision, so
`auto` is float32. float32 stays the correctness reference.
`int8` (CPU only) is float32 with every linear layer dynamically quantised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from workers.cpu import cpu_features

Precision = Literal["auto", "float32", "bfloat16", "float16", "int8"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}


@dataclass(frozen=True)
class Resolved:
    name: str  # float32 | bfloat16 | float16 | int8
    dtype: torch.dtype
    int8: bool


def resolve(precision: str, device: torch.device) -> Resolved:
    if precision == "auto":
        fast_bf16 = device.type == "cuda" or cpu_features().bf16_in_hardware
        precision = "bfloat16" if fast_bf16 else "float32"
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}: auto, float32, bfloat16, float16 or int8")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("int8 (dynamic quantisation) runs on CPU only")
    return Resolved(precision, _DTYPES[precision], precision == "int8")
