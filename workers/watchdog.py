"""`python -m workers.watchdog PID`: kills what a command started once the command is gone.

Ray's processes started by `ray.init` are fate-shared with the driver (the kernel kills GCS and
raylet when it dies), but the raylet's agents (dashboard agent, runtime-env agent) notice the
raylet's death only by polling and then try to report to the dead GCS: after a SIGKILL of
`captioner run` they lingered 62 s here. This watchdog, started beside a local Ray, records the
command's process tree (by descent from its PID, with start times, so a reused PID is never
touched) every 0.5 s while the command lives; when the command is gone, however it ended, it
SIGKILLs whatever of that tree still runs and exits. It imports nothing heavy and ignores SIGINT
(a Ctrl+C in the terminal reaches the whole process group; the command stops cleanly itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

INTERVAL_S = 0.5


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _tree(root: int, skip: int) -> dict[int, int]:
    """pid → start time of every live process below `root`, except `skip` (this watchdog)."""
    children: dict[int, list[int]] = defaultdict(list)
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children[stat[0]].append(int(entry.name))
            starts[int(entry.name)] = stat[1]
    out: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid != skip and pid in starts:
            out[pid] = starts[pid]
            stack.extend(children.get(pid, []))
    return out


def watch(parent: int) -> int:
    """Track `parent`'s tree until `parent` is gone; then kill the tree's survivors. Returns how many."""
    me = os.getpid()
    seen: dict[int, int] = {}
    while os.getppid() == parent:
        seen.update(_tree(parent, me))
        seen = {pid: start for pid, start in seen.items() if (stat := _stat(pid)) and stat[1] == start}
        time.sleep(INTERVAL_S)
    killed = 0
    for pid, start in seen.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def start_watchdog() -> subprocess.Popen[bytes] | None:
    """Start a watchdog for this process (Linux only: it reads /proc)."""
    if not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "workers.watchdog", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True,
    )  # fmt: skip


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
