"""The scale benchmark's arithmetic, without servers: steady-state rates, efficiency, CPU shares."""

from __future__ import annotations

import os

import pytest

from harness.bench.cpu_use import CpuSnapshot, CpuUse, ProcessCpu
from harness.bench.scale import PhaseResult, ScaleReport


def phase(n: int, answer_times: list[float]) -> PhaseResult:
    idle = CpuUse(machine=0.0, own=0.0, seconds={}, names={})
    return PhaseResult(n, n, len(answer_times), answer_times, idle, True, 0, 0, 16.0)


def steady_then_drain(rate: float, images: int, fill_s: float, drain_s: float) -> list[float]:
    """Answers at `rate` after a fill of `fill_s`; the last one `drain_s` after the others."""
    times = [fill_s + i / rate for i in range(images - 1)]
    return times + [times[-1] + drain_s]


def test_steady_rate_leaves_out_fill_and_drain() -> None:
    p = phase(1, steady_then_drain(10.0, 200, fill_s=5.0, drain_s=4.0))
    assert p.rate == pytest.approx(10.0)
    assert p.overall_rate < 8.0  # the whole run counts the 9 s of fill and drain


def test_efficiency_compares_steady_rates_against_linear() -> None:
    report = ScaleReport(
        phases=[
            phase(1, steady_then_drain(10.0, 320, fill_s=2.0, drain_s=2.0)),
            phase(4, steady_then_drain(30.0, 1280, fill_s=2.0, drain_s=2.0)),
        ]
    )
    assert report.efficiency(4) == pytest.approx(0.75)
    assert report.efficiency(4, whole_run=True) < report.efficiency(1, whole_run=True)


def test_cpu_use_counts_the_process_tree_of_the_root_apart_from_the_machine() -> None:
    def snapshot(busy: float, total: float, mine: float, child: float, other: float) -> CpuSnapshot:
        return CpuSnapshot(
            busy_jiffies=busy,
            total_jiffies=total,
            processes={
                10: ProcessCpu("bench", 1, mine),
                11: ProcessCpu("ray::Replica", 10, child),
                12: ProcessCpu("other", 1, other),
            },
        )

    tick = 1 / os.sysconf("SC_CLK_TCK")
    before, after = snapshot(0, 0, 0, 0, 0), snapshot(500, 1500, 100 * tick, 200 * tick, 400 * tick)
    use = CpuUse.between(before, after, root=10)
    assert use.machine == pytest.approx(500 / 1500)
    assert use.own == pytest.approx(300 / 1500)  # 10 and its child 11, not 12
    assert use.of([11]) == pytest.approx(200 * tick)
    assert use.top(2).startswith("other ")
