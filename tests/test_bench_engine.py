"""`captioner bench --mode engine --quick`: the CI form runs end to end and checks itself (tokens
identical to generate in fp32, every request answered once); this asserts no speed."""

from __future__ import annotations

import re

from harness.bench.engine import run


def test_quick_engine_bench_is_consistent(capsys) -> None:
    ratio = run(quick=True)
    out = capsys.readouterr().out
    header = out.splitlines()[1]  # the CPU's capabilities come first
    assert header.startswith("CPU: ") and "AMX: " in header and "bf16 in hardware: " in header
    assert "fp32 engine tokens identical to generate's: 16/16" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"engine vs generate: \d+\.\d\d", last), last
    assert float(last.split(": ")[1]) == round(ratio, 2) > 0
    p50 = {m.group(1): float(m.group(2)) for m in re.finditer(r"(continuous|static)\s+p50\s+([\d.]+) s", out)}
    assert set(p50) == {"continuous", "static"}
    ratio_line = re.search(r"p50 continuous / static: ([\d.]+)", out)
    assert (
        ratio_line
        and abs(float(ratio_line.group(1)) - p50["continuous"] / p50["static"])
        < 0.01 + 0.01 * p50["continuous"] / p50["static"]
    )
