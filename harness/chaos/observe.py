"""What a chaos run watches besides the outcomes: the memory of its process tree, and every log
line it captured (its own, the workers', the broker's, Ray's) scanned for secrets.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path


def proc_status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from /proc (a snapshot: processes come and go)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _category(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "consumer-worker" in cmd:
        return "consumer_workers"
    if "ServeReplica" in cmd:
        return "replicas"
    if "tansu" in cmd or "weed" in cmd:
        return "servers"
    return "ray_other"


class MemorySampler(threading.Thread):
    """Samples the RSS of this process tree (Ray workers, children, servers) once a second."""

    def __init__(self, interval_s: float = 1.0):
        super().__init__(name="chaos-memory", daemon=True)
        self.interval_s = interval_s
        self.root = os.getpid()
        self.peak_tree_kb = 0
        self.peak_by_category_kb: Counter[str] = Counter()  # largest sum per category at one sample
        self.peak_process_kb: Counter[str] = Counter()  # largest single process per category (VmHWM)
        self._halt = threading.Event()

    def sample(self) -> None:
        sums: Counter[str] = Counter()
        for pid in descendants(self.root):
            category = _category(pid, self.root)
            sums[category] += proc_status_kb(pid, "VmRSS")
            hwm = proc_status_kb(pid, "VmHWM")
            self.peak_process_kb[category] = max(self.peak_process_kb[category], hwm)
        self.peak_tree_kb = max(self.peak_tree_kb, sum(sums.values()))
        for category, kb in sums.items():
            self.peak_by_category_kb[category] = max(self.peak_by_category_kb[category], kb)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.sample()

    def report_mb(self) -> dict[str, float]:
        out = {"tree_total": round(self.peak_tree_kb / 1024, 1)}
        out.update({f"{k}_total": round(v / 1024, 1) for k, v in sorted(self.peak_by_category_kb.items())})
        out.update({f"{k}_largest_process": round(v / 1024, 1) for k, v in sorted(self.peak_process_kb.items())})
        return out


_LOG_FORMAT = "%(asctime)s %(processName)s %(threadName)s %(levelname)s %(name)s: %(message)s"


def configure_logging(handler: logging.Handler) -> Callable[[], None]:
    """Send everything (our modules at DEBUG, the rest at INFO) to `handler`; returns an undo."""
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root = logging.getLogger()
    ours = [logging.getLogger(name) for name in ("workers", "harness")]
    saved = (root.level, [logger.level for logger in ours])
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
    for logger in ours:
        logger.setLevel(logging.DEBUG)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for logger, level in zip(ours, saved[1], strict=True):
            logger.setLevel(level)
        handler.close()

    return undo


def scan_files(paths: list[Path], secrets_to_find: list[str]) -> tuple[int, int, list[str]]:
    """(files, lines scanned, 'file:line' of every line holding a secret)."""
    needles = [s.encode() for s in secrets_to_find]
    files = lines = 0
    leaks: list[str] = []
    for path in paths:
        try:
            handle = open(path, "rb")
        except OSError:
            continue
        files += 1
        with handle:
            for number, line in enumerate(handle, 1):
                lines += 1
                if any(n in line for n in needles):
                    leaks.append(f"{path.name}:{number}")
    return files, lines, leaks


def ray_log_files(since: float) -> list[Path]:
    """This Ray session's log files written during the run (replica stdout/stderr among them)."""
    try:
        import ray

        logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for it
    except Exception:
        return []
    return [p for p in logs.rglob("*") if p.is_file() and p.stat().st_mtime >= since]
