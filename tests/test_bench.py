"""The benchmarks' CPU header: AMX detected from /proc/cpuinfo flags, never assumed."""

from __future__ import annotations

from harness.bench.common import cpu_features, ratio_line

AMX_CPU = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
NO_AMX_CPU = """processor	: 0
model name	: AMD EPYC
flags		: fpu sse avx2 avx512f avx512_bf16
"""


def test_amx_is_detected_from_the_flags() -> None:
    amx = cpu_features(AMX_CPU)
    assert amx.amx and amx.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_bf16", "amx_int8", "avx512_bf16"} <= amx.flags
    assert "AMX: yes" in amx.describe() and "amx_int8" in amx.describe()
    plain = cpu_features(NO_AMX_CPU)
    assert not plain.amx and "avx512_bf16" in plain.flags
    assert "AMX: no" in plain.describe()
    assert not cpu_features("").amx  # no /proc/cpuinfo: no AMX claimed


def test_ratio_lines_say_whether_the_target_is_met() -> None:
    assert ratio_line("torch: batch 16 / naive pipeline", 2.61, 2.5) == (
        "torch: batch 16 / naive pipeline = 2.61× (meets the 2.5× target)"
    )
    assert "BELOW the 0.9× target" in ratio_line("batch 4: tf / torch", 0.5, 0.9)
