"""Consumer workers as child processes, each running a real Pipeline in the run's consumer group,
so "kill a consumer" is a real SIGKILL: no drain, no commit, no LeaveGroup.

A worker writes its Prometheus registry to a text file every half second and on exit
(`prometheus_client.write_to_textfile`, atomic), so the driver reads a killed worker's counters
as of its last half second: the report's retry figures come from `captioner_inference_retries_total`,
never from log text.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from harness.chaos.observe import configure_logging, proc_status_kb
from harness.chaos.options import REPO
from workers.config import Settings
from workers.embedded import wait_until

log = logging.getLogger(__name__)

METRICS_DUMP_INTERVAL_S = 0.5


class ConsumerWorker:
    """A child process running one Pipeline; SIGKILL is a real crash."""

    def __init__(self, index: int, workdir: Path, settings_path: Path, app_name: str, env: dict[str, str]):
        self.index = index
        self.name = f"consumer-{index}"
        self.log_path = workdir / f"{self.name}.log"
        self.ready_path = workdir / f"{self.name}.ready"
        self.stats_path = workdir / f"{self.name}.stats.json"
        self.metrics_path = workdir / f"{self.name}.prom"
        import ray

        self.argv = [
            sys.executable, "-m", "harness.chaos", "consumer-worker",
            "--settings", str(settings_path), "--app", app_name, "--name", self.name,
            "--ray-address", ray.get_runtime_context().gcs_address,
            "--ready", str(self.ready_path), "--stats", str(self.stats_path), "--metrics", str(self.metrics_path),
        ]  # fmt: skip
        self.env = env
        self.killed = False
        self.drained = False  # sent SIGTERM mid-run: it must drain, commit and exit 0
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerWorker:
        with open(self.log_path, "ab") as out:
            self._popen = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=REPO,
            )  # fmt: skip
        _children.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def wait_ready(self, timeout_s: float = 120) -> None:
        def exited() -> str | None:
            code = self.exit_code()
            return None if code is None else f"{self.name} exited with {code}: {_tail(self.log_path)}"

        wait_until(self.ready_path.exists, timeout_s=timeout_s, interval_s=0.1, what=f"{self.name} ready", abort=exited)

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self.killed = True
            os.kill(self._popen.pid, signal.SIGKILL)
            self._popen.wait(30)

    def sigterm(self) -> None:
        """Ask it to drain and exit (mid-run); `terminate` later collects its exit code."""
        if self._popen is not None and self._popen.poll() is None:
            self.drained = True
            os.kill(self._popen.pid, signal.SIGTERM)

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM: the worker drains, commits and exits; SIGKILL past the timeout."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            # Once only: a drained worker already got its SIGTERM, and a second one landing
            # while the process exits (Ray's shutdown restores the default handler) kills it -15.
            if not self.drained:
                os.kill(self._popen.pid, signal.SIGTERM)
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing", self.name, timeout_s)
                self.kill()
        _children.discard(self)
        return self._popen.returncode

    def stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {}

    def metrics(self) -> dict[str, float]:
        """The worker's counters as of its last registry dump ({} if it never wrote one)."""
        return read_metrics_file(self.metrics_path)


def read_metrics_file(path: Path) -> dict[str, float]:
    """Sample name → value summed over labels, and `name{label=value,…}` → each labelled
    sample's own value, from a Prometheus text file ({} if none).

    `_created` timestamps are left out: they are not counts.
    """
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = path.read_text()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                if sample.labels:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    totals[f"{sample.name}{{{labels}}}"] = sample.value
    return totals


class MetricsDumper(threading.Thread):
    """Writes this process's Prometheus registry to `path` every `interval_s` and once more on stop."""

    def __init__(self, path: Path, interval_s: float = METRICS_DUMP_INTERVAL_S):
        super().__init__(name="metrics-dump", daemon=True)
        self.path = path
        self.interval_s = interval_s
        self._halt = threading.Event()

    def dump(self) -> None:
        from prometheus_client import REGISTRY, write_to_textfile

        write_to_textfile(str(self.path), REGISTRY)  # a temp file renamed over: never half-written

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.dump()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.dump()


_children: set[ConsumerWorker] = set()


@atexit.register
def _kill_children() -> None:
    for child in list(_children):
        with contextlib.suppress(Exception):
            child.kill()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def consumer_worker_main(argv: list[str]) -> int:
    """The child: connect to the run's Ray, get the replica app's handle, run a Pipeline until SIGTERM."""
    parser = argparse.ArgumentParser(prog="harness.chaos consumer-worker")
    for flag in ("--settings", "--app", "--name", "--ray-address", "--ready", "--stats", "--metrics"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    configure_logging(logging.StreamHandler(sys.stderr))
    data = json.loads(Path(args.settings).read_text())
    settings = Settings(**data)  # the SASL password comes from the environment, as in production
    import ray
    from ray import serve

    from workers.pipeline import Pipeline

    ray.init(address=args.ray_address, namespace="captioner-chaos", log_to_driver=False)
    pipeline = Pipeline(settings, serve.get_app_handle(args.app), name=args.name)
    signal.signal(signal.SIGTERM, lambda *_: pipeline.request_stop())
    signal.signal(signal.SIGINT, lambda *_: pipeline.request_stop())
    dumper = MetricsDumper(Path(args.metrics))
    dumper.start()
    pipeline.start()
    pipeline.wait_started()
    Path(args.ready).write_text(str(os.getpid()))
    log.info("%s: running (pid %d)", args.name, os.getpid())
    pipeline.wait()
    pipeline.stop()
    dumper.stop()
    stats = {
        "window_peak": pipeline.window.peak,
        "failed": pipeline.failed.is_set(),
        "vm_hwm_kb": proc_status_kb(os.getpid(), "VmHWM"),
    }
    Path(args.stats).write_text(json.dumps(stats))
    return 1 if pipeline.failed.is_set() else 0
