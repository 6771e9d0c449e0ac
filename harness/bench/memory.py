"""Peak memory of the decode stage: many concurrent 50-megapixel images through `Stages.decode`.

    python -m harness.bench.memory [--requests 64] [--workers N] [--budget-bytes B] [--before-tree DIR]

`run()` makes five kinds of 49.8-megapixel image once (cached under `.tmp/bench-memory/`): a
baseline JPEG, a progressive JPEG, an RGB PNG, an RGBA PNG and a 16-bit greyscale PNG, all from a
real photograph scaled up. Then, in a fresh child process per variant (so no other allocation
shares the heap), `--requests` decodes of those files, round-robin, are submitted at once to a
thread pool of the worker's work-pool size (`worker.fetch_concurrency`), each reading its file
(its bytes, like a fetch) and calling `Stages.decode`. Measured per variant: the process's peak
RSS during the run (VmHWM, reset first through /proc/self/clear_refs) above the RSS before it,
the wall time, and the budget's own peak.

Variants: `budget` (this code, `worker.memory_budget_bytes`), `unbudgeted` (this code with a
budget no image reaches: what the decode paths alone cost), and with `--before-tree DIR` (a tree
of an older commit, e.g. `git archive 078cc2d workers | tar -x -C DIR`) `before` (that code,
which has no budget). The same child code runs against both trees: it only uses
`Stages(settings, None, input_size).decode(data)`, which both have.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".tmp" / "bench-memory"
SIZE = (8640, 5760)  # 49.8 MP: under the default limits.max_image_pixels (50 000 000)
KINDS = ("jpeg", "jpeg-progressive", "png-rgb", "png-rgba", "png-gray16")


def make_images(cache: Path = CACHE) -> dict[str, Path]:
    """The five test images, made once (about a minute on 2 cores)."""
    import numpy as np
    from PIL import Image

    cache.mkdir(parents=True, exist_ok=True)
    paths = {kind: cache / f"{kind}.{'jpg' if kind.startswith('jpeg') else 'png'}" for kind in KINDS}
    if all(p.exists() for p in paths.values()):
        return paths
    photo = (
        Image.open(REPO / "workers" / "samples" / "astronaut.jpg").convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
    )
    photo.save(paths["jpeg"], "JPEG", quality=90)
    photo.save(paths["jpeg-progressive"], "JPEG", quality=90, progressive=True)
    photo.save(paths["png-rgb"], "PNG", compress_level=1)
    alpha = Image.linear_gradient("L").resize(SIZE)
    rgba = photo.copy()
    rgba.putalpha(alpha)
    rgba.save(paths["png-rgba"], "PNG", compress_level=1)
    del rgba, alpha
    gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    del photo
    Image.fromarray(gray).save(paths["png-gray16"], "PNG", compress_level=1)
    return paths


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(paths: dict[str, Path], requests: int, workers: int | None, budget_bytes: int | None) -> dict[str, Any]:
    """In this process: `requests` concurrent decodes on a pool of the worker's size."""
    from PIL import Image

    from workers.config import Settings, WorkerConfig
    from workers.images import InputSize
    from workers.stages import Stages

    worker: dict[str, Any] = {}
    if budget_bytes is not None and "memory_budget_bytes" in WorkerConfig.model_fields:
        worker["memory_budget_bytes"] = budget_bytes
    settings = Settings(worker=WorkerConfig(**worker))
    pool_size = workers or settings.worker.fetch_concurrency
    stages = Stages(settings, None, InputSize(224, 224, int(Image.Resampling.BILINEAR)))
    files = [paths[KINDS[i % len(KINDS)]] for i in range(requests)]

    def one(path: Path) -> tuple[int, int]:
        prepared = stages.decode(path.read_bytes())
        return prepared.width, prepared.height

    one(files[0])  # warm the decoders and imports outside the measurement
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    start = time.perf_counter()
    with ThreadPoolExecutor(pool_size) as pool:
        sizes = list(pool.map(one, files))
    wall = time.perf_counter() - start
    budget = getattr(stages, "budget", None)
    return {
        "requests": requests,
        "pool": pool_size,
        "rss_before_mb": before / 1024,
        "peak_rss_mb": _rss_kb("VmHWM") / 1024,
        "peak_above_before_mb": (_rss_kb("VmHWM") - before) / 1024,
        "wall_s": wall,
        "budget_mb": budget.capacity / 2**20 if budget else None,
        "budget_peak_mb": budget.peak / 2**20 if budget else None,
        "all_full_size": all(s == SIZE for s in sizes),
    }


def _child(
    variant: str,
    paths: dict[str, Path],
    requests: int,
    workers: int | None,
    budget_bytes: int | None,
    tree: Path | None,
) -> dict[str, Any]:
    env = dict(os.environ, USE_TF="0")
    # Our harness module, with `workers` from the tree under test first.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in ([tree] if tree else []) + [REPO]] + inherited)
    args = [
        sys.executable,
        "-m",
        "harness.bench.memory",
        "measure",
        "--requests",
        str(requests),
        "--paths",
        json.dumps({k: str(v) for k, v in paths.items()}),
    ]
    if workers:
        args += ["--workers", str(workers)]
    if budget_bytes is not None:
        args += ["--budget-bytes", str(budget_bytes)]
    # `python -m` puts the working directory first on sys.path: run in the tree under test.
    done = subprocess.run(args, env=env, cwd=tree or REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: measuring child failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return {"variant": variant, **json.loads(out.strip().splitlines()[-1])}


def run(
    requests: int = 64, workers: int | None = None, budget_bytes: int | None = None, before_tree: Path | None = None
) -> list[dict[str, Any]]:
    """Measure every variant and print a table; returns the rows."""
    # Here, not at the top: the child processes may import an older `workers` (--before-tree).
    from harness.bench.common import cpu_features

    print(cpu_features().describe())
    paths = make_images()
    for kind, path in paths.items():
        print(f"  {kind}: {path.stat().st_size / 2**20:.1f} MB encoded, {SIZE[0]}×{SIZE[1]}")
    variants: list[tuple[str, int | None, Path | None]] = []
    if before_tree is not None:
        variants.append(("before", None, before_tree))
    variants += [("unbudgeted", 1 << 50, None), ("budget", budget_bytes, None)]
    rows = [_child(name, paths, requests, workers, budget, tree) for name, budget, tree in variants]
    print(
        f"{'variant':<11} {'requests':>8} {'pool':>4} {'RSS before':>11} {'peak RSS':>9} {'peak-before':>11} "
        f"{'budget':>8} {'budget peak':>11} {'wall s':>7}"
    )
    for r in rows:
        budget = f"{r['budget_mb']:.0f} MB" if r["budget_mb"] and r["budget_mb"] < 2**29 else "-"
        budget_peak = f"{r['budget_peak_mb']:.0f} MB" if r["budget_peak_mb"] is not None else "-"
        print(
            f"{r['variant']:<11} {r['requests']:>8} {r['pool']:>4} "
            f"{r['rss_before_mb']:>8.0f} MB {r['peak_rss_mb']:>6.0f} MB "
            f"{r['peak_above_before_mb']:>8.0f} MB {budget:>8} {budget_peak:>11} {r['wall_s']:>7.1f}"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "measure"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="default: worker.fetch_concurrency")
    parser.add_argument("--budget-bytes", type=int, default=None, help="default: worker.memory_budget_bytes")
    parser.add_argument("--before-tree", type=Path, default=None)
    parser.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "measure":
        paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
        print(json.dumps(measure(paths, args.requests, args.workers, args.budget_bytes)))
    else:
        run(args.requests, args.workers, args.budget_bytes, args.before_tree)


if __name__ == "__main__":
    main()
