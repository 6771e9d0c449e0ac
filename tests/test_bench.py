"""The benchmarks' CPU header: AMX and bf16 units detected from /proc/cpuinfo flags, never assumed."""

from __future__ import annotations

from harness.bench.common import ratio_line
from workers.cpu import parse_cpuinfo

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
    amx = parse_cpuinfo(AMX_CPU)
    assert amx.amx and amx.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_bf16", "amx_int8", "avx512_bf16"} <= amx.flags
    assert "AMX: yes" in amx.describe() and "amx_int8" in amx.describe()
    plain = parse_cpuinfo(NO_AMX_CPU)
    assert not plain.amx and "avx512_bf16" in plain.flags
    assert "AMX: no" in plain.describe()
    assert plain.bf16_in_hardware and "bf16 in hardware: yes" in plain.describe()
    nothing = parse_cpuinfo("")  # no /proc/cpuinfo: nothing claimed
    assert not nothing.amx and not nothing.bf16_in_hardware


def test_ratio_lines_say_whether_the_target_is_met() -> None:
    assert ratio_line("torch: batch 16 / naive pipeline", 2.61, 2.5) == (
        "torch: batch 16 / naive pipeline = 2.61× (meets the 2.5× target)"
    )
    assert "BELOW the 0.9× target" in ratio_line("batch 4: tf / torch", 0.5, 0.9)


def test_bench_report_writes_each_plot_and_a_summary_with_its_numbers(tmp_path) -> None:
    from harness.bench.report import BenchReport

    report = BenchReport(tmp_path / "report", cpu="test CPU, AMX: no")
    report.throughput_vs_batch("throughput", {"generate fp32": {1: 1.1, 4: 2.0, 16: 2.7}, "engine bf16": {16: 8.5}})
    report.latency_cdf("latency", {"continuous": [0.5, 0.6, 0.9], "static": [1.0, 1.2, 2.5]})
    report.scale_efficiency("scale", {1: 10.0, 2: 19.0, 4: 36.0}, note="stand-in model: measures the plumbing")
    report.bars("engine", "engine vs generate", {"generate fp32 b16": 1.9, "engine auto": 6.2}, "img/s")
    summary = report.write().read_text()
    for name in ("throughput", "latency", "scale", "engine"):
        png = (tmp_path / "report" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, name
        assert f"({name}.png)" in summary
    assert "| 4×4 | 36.0 | 0.90 |" in summary, "efficiency against linear from 1×1"
    # numpy's linear percentiles, as the benchmarks print them: p99 of (1.0, 1.2, 2.5) is 2.474
    assert "| static | 3 | 1.200 | 2.474 |" in summary
    assert "CPU: test CPU, AMX: no" in summary and "stand-in model" in summary
