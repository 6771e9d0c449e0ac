"""Process trees from /proc, for tests that check a command leaves nothing running.

Processes are found by descent from the command's PID, never by name, and identified by
(pid, start time) so a reused PID is not mistaken for a survivor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from harness.chaos.observe import descendants


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    start_ticks: int  # /proc/<pid>/stat field 22: with the pid, a process's identity

    def alive(self) -> bool:
        now = read_proc(self.pid)
        return now is not None and now.start_ticks == self.start_ticks and not _zombie(self.pid)

    def cmdline(self) -> str:
        try:
            return Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            return "(gone)"


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
    return Proc(pid, int(fields[1]), int(fields[3]), int(fields[19]))


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


class TreeWatcher(threading.Thread):
    """Records every process seen below `root` (polling /proc) until stopped or `root` is gone."""

    def __init__(self, root: int, interval_s: float = 0.2):
        super().__init__(name="tree-watcher", daemon=True)
        self.root = root
        self.interval_s = interval_s
        self.seen: dict[int, Proc] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> None:
        for pid in descendants(self.root):
            proc = read_proc(pid)
            if pid != self.root and proc is not None and not _zombie(pid):
                with self._lock:
                    self.seen.setdefault(pid, proc)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s) and read_proc(self.root) is not None:
            self.sample()

    def stop(self) -> list[Proc]:
        self._halt.set()
        self.join(5)
        with self._lock:
            return list(self.seen.values())
