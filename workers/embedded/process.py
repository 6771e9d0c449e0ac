"""Child server processes for the embedded servers: free loopback ports, readiness waits, start/stop.

Every server binds 127.0.0.1 only, on a port drawn below Linux's ephemeral range; readiness is
polled with a deadline; stop is SIGTERM, then SIGKILL after a timeout; an atexit hook stops
anything still running so no test run leaves orphans, and the kernel kills a server whose
parent died without stopping it (`lifetime.py`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from workers.embedded.lifetime import die_with_parent, on_launcher_thread

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# weed opens each HTTP port + 10000 for gRPC (its worker even dials admin+10000 whatever
# -admin.port.grpc says), so every HTTP port is chosen with that partner free too.
WEED_GRPC_OFFSET = 10000
# Ports are drawn below Linux's ephemeral range (32768+), HTTP ports in [12000, 22000) and their
# gRPC partners in [22000, 32000), so outgoing connections can never take one between our
# free-check and the server's bind.
_PORT_RANGE = (12000, 22000)


# --- ports and waiting ------------------------------------------------------------------------


def port_is_free(port: int, *, reuse: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    return free_ports(1)[0]


def free_ports(count: int, *, partner_offset: int | None = None) -> list[int]:
    """`count` distinct free loopback ports; with partner_offset, port+offset is free too."""
    rng = random.Random()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(10_000):
        if len(chosen) == count:
            return chosen
        port = rng.randrange(*_PORT_RANGE)
        group = [port] if partner_offset is None else [port, port + partner_offset]
        if taken.intersection(group) or not all(port_is_free(p) for p in group):
            continue
        chosen.append(port)
        taken.update(group)
    raise RuntimeError(f"could not find {count} free loopback ports")


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    abort: Callable[[], str | None] | None = None,
) -> None:
    """Poll `condition` until true or the deadline passes (then TimeoutError naming `what`).

    `abort` returns a reason to give up at once (e.g. the server process exited).
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            if condition():
                return
        except Exception as e:  # a not-yet-ready server answers with errors; keep the last one
            last_error = e
        if abort is not None and (reason := abort()):
            raise RuntimeError(f"{what}: {reason}")
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s{detail}")
        time.sleep(interval_s)


def port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


# --- child processes --------------------------------------------------------------------------

_live: set[ServerProcess] = set()
_live_lock = threading.Lock()


class ServerProcess:
    """One child server in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> None:
        self._log_file = open(self.log_path, "ab")
        log_file, parent = self._log_file, os.getpid()
        self._popen = on_launcher_thread(
            lambda: subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl+C in the terminal reaches us, and we stop the server in order.
                start_new_session=True,
                # Killed by the kernel if we die without stopping it (SIGKILL included).
                preexec_fn=die_with_parent(parent),
            )
        )
        with _live_lock:
            _live.add(self)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def exited(self) -> str | None:
        """Why the process is gone (for readiness aborts), or None while it runs."""
        if self._popen is None or self._popen.poll() is None:
            return None
        return f"{self.name} exited with {self._popen.returncode}; log tail:\n{self.log_tail()}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL the whole group. Returns the exit code."""
        popen, self._popen = self._popen, None
        code: int | None = None
        if popen is not None:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing", self.name, popen.pid, timeout_s)
            # Kill what is left of the group either way (e.g. helpers the server forked).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            code = popen.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _live_lock:
            _live.discard(self)
        return code

    def kill(self) -> None:
        """SIGKILL now (atexit, chaos tests)."""
        self.stop(timeout_s=0)


@atexit.register
def _kill_orphans() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop(timeout_s=2)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment minus anything that would re-point a server, plus `extra`."""
    drop = {"STORAGE_ENGINE", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "CLUSTER_ID", "S3_BUCKET"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("AWS_")}
    env.update(extra)
    return env


def live_servers() -> Iterator[ServerProcess]:
    """Servers this process started and has not stopped (for leak checks in tests)."""
    with _live_lock:
        yield from list(_live)
