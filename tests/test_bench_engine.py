"""`captioner bench --mode engine --quick`: the CI form runs end to end and checks itself (tokens
identical to generate in fp32, every request answered once); this asserts no speed."""

from __future__ import annotations

import re
import statistics

from harness.bench.engine import run


def test_quick_engine_bench_is_consistent(capsys) -> None:
    ratio = run(quick=True, rounds=2)  # two latency pairs: the median path
    out = capsys.readouterr().out
    header = out.splitlines()[1]  # the CPU's capabilities come first
    assert header.startswith("CPU: ") and "AMX: " in header and "bf16 in hardware: " in header
    assert "fp32 engine tokens identical to generate's: 16/16" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"engine vs generate: \d+\.\d\d", last), last
    assert float(last.split(": ")[1]) == round(ratio, 2) > 0
    pairs: dict[str, dict[str, float]] = {}
    for m in re.finditer(r"pair (\d+) (continuous|static)\s+p50\s+([\d.]+) s", out):
        pairs.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    assert pairs and all(set(p50) == {"continuous", "static"} for p50 in pairs.values()), pairs
    per_pair = re.search(r"p50 continuous / static per pair: (.+)", out)
    assert per_pair, out
    printed = [float(v) for v in per_pair.group(1).split(", ")]
    expected = [p50["continuous"] / p50["static"] for p50 in pairs.values()]
    assert all(abs(a - b) < 0.01 + 0.01 * b for a, b in zip(printed, expected, strict=True))
    ratio_line = re.search(r"p50 continuous / static: ([\d.]+)", out)
    assert ratio_line and abs(float(ratio_line.group(1)) - statistics.median(expected)) < 0.01 + 0.01 * max(expected)
