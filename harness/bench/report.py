"""`captioner bench … --report DIR`: the figures of a run as PNG plots and a Markdown summary.

Each bench mode hands what it measured to one `BenchReport`; nothing is re-measured here. The
plots a mode can add:

- `throughput_vs_batch`: images/s per batch size, one line per series (model, engine);
- `latency_cdf`: the share of requests answered within t, one line per policy;
- `scale_efficiency`: images/s per N×M topology against linear from 1×1;
- `bars`: one figure per comparison (engine vs generate, wire formats).

`write()` saves `summary.md` beside the PNGs, with the CPU line every benchmark prints, each
plot embedded and the numbers behind it as a table, so a person can check a plot against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class _Section:
    title: str
    image: str
    table: list[list[str]]
    note: str = ""


@dataclass
class BenchReport:
    directory: Path
    cpu: str
    title: str = "captioner bench"
    sections: list[_Section] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def throughput_vs_batch(self, name: str, series: dict[str, dict[int, float]], note: str = "") -> Path:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in series.items():
            sizes = sorted(points)
            ax.plot(sizes, [points[b] for b in sizes], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (images)")
        ax.set_ylabel("images/s")
        ax.set_title("Throughput vs batch size")
        ax.grid(True, alpha=0.3)
        ax.legend()
        rows = [[label, str(b), f"{v:.2f}"] for label, points in series.items() for b, v in sorted(points.items())]
        return self._save(fig, name, "Throughput vs batch size", [["series", "batch", "img/s"], *rows], note)

    def latency_cdf(self, name: str, series: dict[str, list[float]], note: str = "") -> Path:
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = [["policy", "requests", "p50 s", "p99 s"]]
        for label, latencies in series.items():
            ordered = sorted(latencies)
            n = len(ordered)
            ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=label)
            rows.append([label, str(n), f"{_quantile(ordered, 0.5):.3f}", f"{_quantile(ordered, 0.99):.3f}"])
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("share of requests answered")
        ax.set_title("Latency CDF")
        ax.grid(True, alpha=0.3)
        ax.legend()
        return self._save(fig, name, "Latency CDF", rows, note)

    def scale_efficiency(self, name: str, throughput: dict[int, float], note: str = "") -> Path:
        """`throughput`: N (for an N×N topology) → images/s."""
        ns = sorted(throughput)
        base = throughput[ns[0]] / ns[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ns, [throughput[n] for n in ns], marker="o", label="measured")
        ax.plot(ns, [base * n for n in ns], linestyle="--", label="linear")
        ax.set_xticks(ns, [f"{n}×{n}" for n in ns])
        ax.set_xlabel("ingest processes × replicas")
        ax.set_ylabel("images/s")
        ax.set_title("Scale-out")
        ax.grid(True, alpha=0.3)
        ax.legend()
        rows = [["topology", "img/s", "efficiency"]] + [
            [f"{n}×{n}", f"{throughput[n]:.1f}", f"{throughput[n] / (base * n):.2f}"] for n in ns
        ]
        return self._save(fig, name, "Scale efficiency", rows, note)

    def bars(self, name: str, title: str, values: dict[str, float], unit: str, note: str = "") -> Path:
        fig, ax = plt.subplots(figsize=(6, 0.6 * len(values) + 1.5))
        labels = list(values)
        ax.barh(labels, [values[k] for k in labels])
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
        rows = [["", unit]] + [[k, f"{v:.2f}"] for k, v in values.items()]
        return self._save(fig, name, title, rows, note)

    def write(self) -> Path:
        lines = [f"# {self.title}", "", f"CPU: {self.cpu}", ""]
        for section in self.sections:
            lines += [f"## {section.title}", "", f"![{section.title}]({section.image})", ""]
            if section.note:
                lines += [section.note, ""]
            header, *rows = section.table
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        path = self.directory / "summary.md"
        path.write_text("\n".join(lines))
        return path

    def _save(self, fig: plt.Figure, name: str, title: str, table: list[list[str]], note: str) -> Path:
        path = self.directory / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.sections.append(_Section(title, path.name, table, note))
        return path


def _quantile(ordered: list[float], q: float) -> float:
    """numpy's (linear) percentile, as the benchmarks print theirs, so the tables agree."""
    if not ordered:
        return float("nan")
    return float(np.percentile(ordered, 100 * q))
