"""Where the machine's CPU went during a benchmark phase, from /proc (Linux).

The scale benchmark must show that the machine is not its bottleneck, on a machine that other
work shares: it reports the whole machine's busy share, the share of this benchmark's own
processes (every descendant of the benchmark: Ray and its actors, the ingest processes, the
broker and the S3 server), and the processes that used the most CPU, by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessCpu:
    name: str  # comm: Ray actors show as ray::ClassName (truncated to 15 characters)
    ppid: int
    cpu_s: float  # user + system, this process only (not its reaped children)


@dataclass(frozen=True)
class CpuSnapshot:
    busy_jiffies: float  # all cores
    total_jiffies: float
    processes: dict[int, ProcessCpu]

    @classmethod
    def take(cls) -> CpuSnapshot:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        processes: dict[int, ProcessCpu] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:  # exited while we looked
                continue
            rest = text.rsplit(")", 1)[1].split()
            processes[int(stat.parent.name)] = ProcessCpu(
                text[text.index("(") + 1 : text.rindex(")")],
                int(rest[1]),
                (float(rest[11]) + float(rest[12])) * _TICK_S,
            )
        return cls(sum(fields) - idle, sum(fields), processes)

    def descendants(self, root: int) -> set[int]:
        children: dict[int, list[int]] = {}
        for pid, p in self.processes.items():
            children.setdefault(p.ppid, []).append(pid)
        found, todo = set(), [root]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found


@dataclass(frozen=True)
class CpuUse:
    """CPU used between two snapshots."""

    machine: float  # busy share of all cores, 0..1
    own: float  # share of all cores used by the root's process tree, 0..1
    seconds: dict[int, float]  # CPU seconds per process that was alive at the second snapshot
    names: dict[int, str]

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot, root: int | None = None) -> CpuUse:
        span = max(after.total_jiffies - before.total_jiffies, 1)  # jiffies of all cores
        seconds = {
            pid: p.cpu_s - (before.processes[pid].cpu_s if pid in before.processes else 0.0)
            for pid, p in after.processes.items()
        }
        tree = after.descendants(os.getpid() if root is None else root)
        return cls(
            machine=(after.busy_jiffies - before.busy_jiffies) / span,
            own=sum(seconds[pid] for pid in tree if pid in seconds) / (span * _TICK_S),
            seconds=seconds,
            names={pid: p.name for pid, p in after.processes.items()},
        )

    def of(self, pids: list[int]) -> float:
        """CPU seconds of these processes."""
        return sum(self.seconds.get(pid, 0.0) for pid in pids)

    def top(self, n: int = 6) -> str:
        """The processes that used the most CPU, summed by name: `name 1.2s, ...`."""
        by_name: dict[str, float] = {}
        for pid, used in self.seconds.items():
            by_name[self.names[pid]] = by_name.get(self.names[pid], 0.0) + used
        ranked = sorted(by_name.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return ", ".join(f"{name} {used:.1f}s" for name, used in ranked)
