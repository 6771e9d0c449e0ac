"""The operators' tools against a live worker (real broker, S3, Ray Serve replicas):

- a real Prometheus scrapes the worker's /metrics and Ray's own exporter, holds every Ray Serve
  name the dashboard and alerts use, and answers every dashboard query;
- dead letters from a real run are replayed after their cause is fixed, and the worker captions
  them; a second replay sends nothing; a truncated echo is reported, never sent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client import REGISTRY
from test_monitoring import GRAFANA_VARIABLES, dashboard_queries, external_names
from typer.testing import CliRunner

from helpers.kafka_helpers import produce
from helpers.worker_fixtures import (
    collect_outcomes,
    png_bytes,
    request,
    tiny_replicas,
    upload,
    worker_settings,
)
from workers import metrics
from workers.cli import app
from workers.embedded import free_port, wait_until
from workers.kafkaclient import ensure_topics
from workers.ops.deadletters import REPLAY_HEADER
from workers.pipeline import Pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _no_cli_logging_left_behind():
    """The CLI installs a root log handler; later tests should not inherit it."""
    from workers.logs import unconfigure_logging

    yield
    unconfigure_logging()


PROMETHEUS = shutil.which("prometheus")
LATE_BUCKET = "late"  # not allow-listed at first: its requests are dead-lettered (forbidden_reference)


@pytest.fixture(scope="module")
def replicas(ray_serve: None) -> Any:
    with tiny_replicas("ops-live-tests") as handle:
        yield handle


class Prometheus:
    """A real Prometheus server scraping its targets (job -> port) every second, loopback only."""

    def __init__(self, targets: dict[str, int], workdir: Path):
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = (workdir / "prometheus.log").open("w")
        self._proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(
            self._ready,
            timeout_s=30,
            what="Prometheus ready",
            abort=lambda: f"exited {self._proc.returncode}" if self._proc.poll() is not None else None,
        )

    def _ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=1).ok
        except requests.ConnectionError:
            return False

    def query(self, expr: str) -> list[dict]:
        answer = requests.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        assert answer.ok and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=15)
        self._log.close()


@pytest.fixture
def prometheus(tmp_path, replicas) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("the prometheus server is not on PATH: `apt-get install prometheus` (Debian); CI installs it")
    import ray

    port = metrics.serve_metrics(free_port())
    assert port is not None
    # Ray's own exporter on the (one, local) node: Ray and Serve metrics, as the ray-metrics port in k8s.
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    server = Prometheus({"captioner": port, "ray": node["MetricsExportPort"]}, tmp_path)
    yield server
    server.stop()


def _run_until(settings, replicas, count: int) -> tuple[list, list]:
    pipeline = Pipeline(settings, replicas).start()
    try:
        return collect_outcomes(settings.kafka, count, timeout=90)
    finally:
        pipeline.stop()


def test_dashboard_on_real_prometheus_and_replay_of_real_dead_letters(broker, s3_server, replicas, prometheus) -> None:
    settings = worker_settings(broker.bootstrap_servers, s3_server)
    settings = settings.model_copy(update={"s3": settings.s3.model_copy(update={"allowed_buckets": ["images"]})})
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic])
    s3_server.create_bucket(LATE_BUCKET)
    good = [upload(s3_server, f"ops/{i}.png", png_bytes(300 + i)) for i in range(2)]
    late = [upload(s3_server, f"ops/{i}.png", png_bytes(310 + i), bucket=LATE_BUCKET) for i in range(3)]
    values = [request(u, id=f"good-{i}") for i, u in enumerate(good)]
    values += [request(u, id=f"late-{i}") for i, u in enumerate(late)]
    # Over the dead letter's 64 KiB echo: dead-lettered with a truncated copy of itself.
    values.append(request(late[0], id="too-big-to-echo", metadata={"pad": "x" * 70_000}))
    keys = [v and json.loads(v)["id"].encode() for v in values]
    produce(kafka.bootstrap_servers, kafka.input_topic, values, keys=keys, headers=[[("tenant", b"t1")]] * len(values))
    dl_before = REGISTRY.get_sample_value("captioner_dead_letters_total", {"code": "forbidden_reference"}) or 0

    results, dead = _run_until(settings, replicas, len(values))
    assert len(results) == 2 and len(dead) == 4
    assert {json.loads(d.value)["error"]["code"] for d in dead} == {"forbidden_reference"}

    # Prometheus scraped the worker: the counter it holds is the registry's, label and all.
    exported = REGISTRY.get_sample_value("captioner_dead_letters_total", {"code": "forbidden_reference"})
    assert exported == dl_before + 4

    def scraped() -> bool:
        got = prometheus.query('captioner_dead_letters_total{code="forbidden_reference"}')
        return bool(got) and float(got[0]["value"][1]) == exported

    wait_until(scraped, timeout_s=30, what="Prometheus to scrape the dead letters")
    names = set(
        requests.get(f"http://127.0.0.1:{prometheus.port}/api/v1/label/__name__/values", timeout=10).json()["data"]
    )
    assert {
        "captioner_consumed_total",
        "captioner_results_total",
        "captioner_dead_letters_total",
        "captioner_in_flight",
        "captioner_stage_seconds_bucket",
        "captioner_batch_size_bucket",
    } <= names
    # Ray's exporter serves the Serve names the dashboard and alerts use (all but the error
    # counter, which has no series until a replica raises, and GPU figures: no GPU here).
    serve_names = external_names()["ray_serve"] - {"ray_serve_deployment_error_counter_total"}

    def ray_scraped() -> bool:
        names = set(
            requests.get(f"http://127.0.0.1:{prometheus.port}/api/v1/label/__name__/values", timeout=10).json()["data"]
        )
        return serve_names <= names

    wait_until(ray_scraped, timeout_s=60, interval_s=1, what=f"Ray's exporter to serve {sorted(serve_names)}")
    for _, expr in dashboard_queries():  # every query runs on the real engine
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        prometheus.query(expr.replace('namespace=~".*"', 'namespace=~".*|"'))

    # The cause is fixed: the bucket is allow-listed. Replay through the CLI, as an operator would.
    env = {
        "CAPTIONER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "CAPTIONER_KAFKA__INPUT_TOPIC": kafka.input_topic,
        "CAPTIONER_KAFKA__DEAD_LETTER_TOPIC": kafka.dead_letter_topic,
        "CAPTIONER_KAFKA__GROUP_ID": kafka.group_id,
        "COLUMNS": "160",
    }
    first = CliRunner().invoke(app, ["replay"], env=env)
    print(first.output)  # the closing note's sample (pytest -s)
    assert first.exit_code == 1  # the truncated echo could not be replayed
    assert "too-big-to-echo" in first.output and "truncated" in first.output
    fixed = settings.model_copy(
        update={"s3": settings.s3.model_copy(update={"allowed_buckets": ["images", LATE_BUCKET]})}
    )
    results, dead = _run_until(fixed, replicas, len(values) + 3)
    replayed = [json.loads(r.value) for r in results if dict(r.headers).get(REPLAY_HEADER)]
    assert sorted(b["id"] for b in replayed) == ["late-0", "late-1", "late-2"]
    assert all(b["caption"] and b["image"].startswith(f"s3://{LATE_BUCKET}/") for b in replayed)
    assert all(("tenant", b"t1") in list(r.headers) for r in results)

    second = CliRunner().invoke(app, ["replay"], env=env)
    assert second.exit_code == 0 and "0 dead letter(s) read" in second.output, second.output
