"""What this machine's CPU can do for matrix work, read once from /proc/cpuinfo.

The engine's `auto` precision and every benchmark's header read it here. Speed on CPU depends on
the matrix units: bf16 ran 2.4× faster than fp32 on a machine with AMX and about 2× on an AMD
EPYC with AVX512-BF16 and no AMX, while an earlier machine with neither ran it slower (0.85×), so
nothing is assumed: what is found is used and printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# The flags that decide bf16/int8 speed on x86 (/proc/cpuinfo names).
MATRIX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")
# Either means bf16 matrix products run in hardware, not emulated.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    cores: int
    flags: frozenset[str]  # only the MATRIX_FLAGS present

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    @property
    def bf16_in_hardware(self) -> bool:
        return bool(BF16_FLAGS & self.flags)

    def describe(self) -> str:
        present = [f for f in MATRIX_FLAGS if f in self.flags]
        return (
            f"CPU: {self.model}, {self.cores} cores; AMX: {'yes' if self.amx else 'no'}; "
            f"bf16 in hardware: {'yes' if self.bf16_in_hardware else 'no'}; "
            f"flags: {', '.join(present) or 'none of ' + ', '.join(MATRIX_FLAGS)}"
        )


def parse_cpuinfo(cpuinfo: str) -> CpuFeatures:
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and model == "unknown":
            model = value.strip()
        elif name == "flags" and not flags:
            flags = set(value.split())
    return CpuFeatures(model, os.cpu_count() or 1, frozenset(flags.intersection(MATRIX_FLAGS)))


@cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU (no /proc/cpuinfo: an unknown CPU with no flags, nothing claimed)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return parse_cpuinfo("")
