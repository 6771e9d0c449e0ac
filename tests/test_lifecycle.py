"""Local servers die with the command that started them (`run`, `serve`, `demo` on embedded settings).

Each test starts the real command (tiny-random model, embedded broker and S3 server, a local Ray)
in its own session and watches its process tree from /proc by descent from the command's PID.
SIGTERM must give exit 0 and, within a bounded wait, no process of the tree left; SIGKILL of
the command must take the broker and the S3 server (the command's children in sessions of their
own, as `ServerProcess` starts them) down within a bounded wait, by the kernel's parent-death
signal, with none of our code left to run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.processes import Proc, TreeWatcher
from helpers.worker_fixtures import MODEL_CACHE, RAY_TMP, REPO
from workers.embedded import free_port, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.ray, pytest.mark.slow]

READY_S = 180  # Ray start, Serve deploy and the model load on a shared 2-core box
EXIT_S = 90  # SIGTERM to exit: drain, Serve and Ray shutdown, the servers' own SIGTERM stop
# After a clean exit, what is left must be gone within this (Ray's processes exit on their own
# shutdown; measured 0–2 s here).
CLEAN_GONE_S = 30
# After SIGKILL of the command: the kernel kills the servers at once (parent-death signal).
SERVERS_GONE_S = 10
# ... and everything else (Ray) by its fate sharing and the watchdog `start_ray` starts.
TREE_GONE_S = 15


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "USE_TF": "0",
        "CAPTIONER_MODEL__SOURCE": "tiny-random",
        "CAPTIONER_MODEL__CACHE_DIR": str(MODEL_CACHE),
        "CAPTIONER_MODEL__TORCH_THREADS": "1",
        "CAPTIONER_KAFKA__BOOTSTRAP_SERVERS": "embedded",
        "CAPTIONER_S3__ENDPOINT_URL": "embedded",
        "CAPTIONER_REPLICAS__NUM_CPUS": "0",
        "CAPTIONER_METRICS__PORT": "0",
        "CAPTIONER_HTTP__PORT": str(free_port()),
        # Short: Ray's unix sockets live below it (107-byte limit); apart from the session's Ray.
        "CAPTIONER_RAY__TEMP_DIR": f"{RAY_TMP}-cmd",
    }
    for name in [k for k in env if k.startswith("AWS_")]:
        del env[name]  # the embedded S3 server's own keys, not the test session's
    return env


class Command:
    """`captioner <args>` in its own session, output in a log file, its process tree watched."""

    def __init__(self, args: list[str], tmp_path: Path):
        self.log_path = tmp_path / f"captioner-{args[0]}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args], cwd=REPO, env=_env(tmp_path),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.watcher = TreeWatcher(self.proc.pid)
        self.watcher.start()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        def exited() -> str | None:
            code = self.proc.poll()
            return None if code is None else f"exited with {code}:\n{self.output()[-3000:]}"

        wait_until(ready, timeout_s=READY_S, interval_s=0.2, what=what, abort=exited)

    def tree(self) -> list[Proc]:
        """Every process seen below the command so far (one more look first)."""
        self.watcher.sample()
        return self.watcher.stop()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()


@pytest.fixture
def command(tmp_path: Path) -> Iterator[Callable[[list[str]], Command]]:
    started: list[Command] = []

    def start(args: list[str]) -> Command:
        started.append(Command(args, tmp_path))
        return started[-1]

    yield start
    for c in started:
        c.close()


def _servers(tree: list[Proc], command_pid: int) -> list[Proc]:
    """The embedded servers: the command's children that lead sessions of their own."""
    return [p for p in tree if p.ppid == command_pid and p.session == p.pid]


def _wait_gone(procs: list[Proc], timeout_s: float, what: str) -> float:
    """Seconds until none of `procs` runs; TimeoutError naming the survivors."""
    start = time.monotonic()
    try:
        wait_until(lambda: not any(p.alive() for p in procs), timeout_s=timeout_s, interval_s=0.1, what=what)
    except TimeoutError as e:
        survivors = [f"{p.pid} {p.cmdline()}" for p in procs if p.alive()]
        raise AssertionError(f"{e}; still running: {survivors}") from None
    return time.monotonic() - start


def _sigterm_leaves_nothing(c: Command) -> None:
    tree = c.tree()
    assert len(_servers(tree, c.proc.pid)) == 2, [p.cmdline() for p in tree]
    start = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(EXIT_S) == 0, c.output()[-3000:]
    exited = time.monotonic() - start
    assert "Traceback" not in c.output(), c.output()[-3000:]
    gone = _wait_gone(tree, CLEAN_GONE_S, "every process of the command to exit")
    print(f"SIGTERM: exit 0 after {exited:.1f} s, the last of {len(tree)} processes gone {gone:.1f} s later")


def test_run_sigterm_exits_0_and_leaves_no_process(command) -> None:
    c = command(["run"])
    c.wait_for(lambda: "captioner running" in c.output(), "captioner run to be running")
    _sigterm_leaves_nothing(c)


def test_serve_sigterm_exits_0_and_leaves_no_process(command) -> None:
    c = command(["serve"])
    c.wait_for(lambda: "captioner serving" in c.output(), "captioner serve to be serving")
    _sigterm_leaves_nothing(c)
    assert "stopped" in c.output()


def test_demo_sigterm_while_starting_exits_0_and_leaves_no_process(command) -> None:
    c = command(["demo"])
    # The servers are up and Ray is starting (more of the tree than the two servers).
    c.wait_for(lambda: len(c.watcher.seen) >= 4, "the demo's servers and Ray to start")
    _sigterm_leaves_nothing(c)
    assert "SIGTERM while starting" in c.output(), c.output()[-3000:]


def test_run_sigkill_takes_the_broker_and_s3_server_with_it(command) -> None:
    c = command(["run"])
    c.wait_for(lambda: "captioner running" in c.output(), "captioner run to be running")
    tree = c.tree()
    servers = _servers(tree, c.proc.pid)
    assert len(servers) == 2, [p.cmdline() for p in tree]
    c.proc.send_signal(signal.SIGKILL)
    c.proc.wait(10)
    took = _wait_gone(servers, SERVERS_GONE_S, "the broker and the S3 server to die with the command")
    # The rest (Ray's GCS and raylet by their fate sharing, its agents and workers by our
    # watchdog) within a bound too; Ray's agents alone lingered ~62 s before the watchdog.
    took_all = _wait_gone(tree, TREE_GONE_S, "every process of the command to exit after its SIGKILL")
    print(f"after SIGKILL of the command: servers gone in {took:.1f} s, the whole tree in {took_all:.1f} s")
