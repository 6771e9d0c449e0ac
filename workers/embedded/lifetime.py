"""The embedded servers live no longer than the process that started them, however it ends.

A clean stop (context managers, `stop()`, the atexit hook) stops them with SIGTERM and removes
their temp folders. For an end that runs none of our code (SIGKILL, a crash) each server is
started with Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`): the kernel kills
it when its parent goes. The kernel ties that signal to the *thread* that forked the child, not
the process, so every server is forked from one launcher thread that lives as long as the
process (a server started from a short-lived thread would otherwise die with that thread).

Temp folders are named `captioner-<kind>-<pid>-…`; a later start removes those whose process is
gone (what a killed one left), so /tmp does not fill up and nothing stale is reused.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn`: the child gets SIGKILL when its parent (thread) dies.

    Runs in the forked child before exec: only a libc call and a pid check, nothing that takes a
    lock. If the parent died between fork and prctl the signal would never come, so the child
    checks its parent is still the one that forked it.
    """

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


_jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_launcher: threading.Thread | None = None
_launcher_lock = threading.Lock()


def _launch_loop() -> None:
    while True:
        job, result = _jobs.get()
        try:
            result.set_result(job())
        except BaseException as e:  # handed to the caller, who raises it
            result.set_exception(e)


def on_launcher_thread(job: Callable[[], T]) -> T:
    """Run `job` (a fork) on the process-long launcher thread and return what it returned."""
    global _launcher
    with _launcher_lock:
        if _launcher is None or not _launcher.is_alive():
            # A daemon thread: it is never joined, so it lives until the process itself ends.
            _launcher = threading.Thread(target=_launch_loop, name="server-launcher", daemon=True)
            _launcher.start()
    result: Future[T] = Future()
    _jobs.put((job, result))
    return result.result()


def server_tempdir(kind: str) -> tempfile.TemporaryDirectory[str]:
    """A temp folder for one server, named after this process; orphans of dead processes go first."""
    remove_orphaned_tempdirs(kind)
    return tempfile.TemporaryDirectory(prefix=f"captioner-{kind}-{os.getpid()}-")


def remove_orphaned_tempdirs(kind: str, root: Path | None = None) -> list[Path]:
    """Remove `captioner-<kind>-<pid>-*` folders whose process no longer exists; returns them."""
    removed = []
    for path in (root or Path(tempfile.gettempdir())).glob(f"captioner-{kind}-*-*"):
        pid_text = path.name.removeprefix(f"captioner-{kind}-").split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)) or not path.is_dir():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log.info("removed %s, left by process %s that no longer runs", path, pid_text)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    return True
