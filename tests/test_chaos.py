"""The chaos run at CI size: real servers, real Ray Serve replicas, real kills; nothing may be lost.

The run starts its own S3 server and a DURABLE broker on it (the session broker is in-memory and
could not survive a restart), and reuses the session's Ray + Serve (`ray_serve`): it must deploy
its replicas under its own app name and leave every other app alone.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import write_to_textfile
from typer.testing import CliRunner

from harness.chaos import RESULT, ChaosOptions, build_corpus, run_chaos, write_report
from workers.cli import app
from workers.config import LimitsConfig

POISON_CODES = {
    "invalid_message",
    "forbidden_reference",
    "object_not_found",
    "object_too_large",
    "invalid_image",
    "image_too_large",
}


def test_the_request_mix_has_every_poison_kind_and_unique_ids() -> None:
    corpus = build_corpus(ChaosOptions(requests=300, seed=3), LimitsConfig(max_message_bytes=256 * 1024), "t")
    kinds = Counter(c.kind for c in corpus.cases)
    assert len(corpus.cases) == 300
    assert len({c.id for c in corpus.cases}) == 300
    assert {c.expected for c in corpus.cases} == POISON_CODES | {RESULT}
    assert {k for k in kinds if k.startswith("awkward_")} == {
        "awkward_cmyk", "awkward_16bit", "awkward_animated_gif", "awkward_exif_rotated",
    }  # fmt: skip
    assert kinds["valid_repeat"] > 0, "no repeated image: the cache would not be exercised"
    huge = next(c for c in corpus.cases if c.kind == "huge_value")
    assert huge.value is not None and len(huge.value) > 256 * 1024
    # Same seed, same mix (ids carry the run id, so compare everything else).
    again = build_corpus(ChaosOptions(requests=300, seed=3), LimitsConfig(max_message_bytes=256 * 1024), "t")
    assert [(c.kind, c.value) for c in again.cases] == [(c.kind, c.value) for c in corpus.cases]


def test_worker_counters_are_read_from_a_registry_dump(tmp_path: Path) -> None:
    """The report's retry figure comes from the worker's Prometheus registry, not from log text."""
    from prometheus_client import CollectorRegistry, Counter

    from harness.chaos.consumers import read_metrics_file
    from harness.chaos.report import RETRIES_SAMPLE

    registry = CollectorRegistry()
    retries = Counter("captioner_inference_retries_total", "Replica calls retried", registry=registry)
    dead = Counter("captioner_dead_letters_total", "Dead letters", ["code"], registry=registry)
    retries.inc(3)
    dead.labels("invalid_image").inc(2)
    dead.labels("invalid_message").inc(5)
    path = tmp_path / "worker.prom"
    write_to_textfile(str(path), registry)

    counters = read_metrics_file(path)
    assert counters[RETRIES_SAMPLE] == 3
    assert counters["captioner_dead_letters_total"] == 7  # summed over labels
    assert not any(name.endswith("_created") for name in counters)
    assert read_metrics_file(tmp_path / "never-written.prom") == {}


def test_chaos_command_is_registered() -> None:
    result = CliRunner().invoke(app, ["chaos", "--help"])
    assert result.exit_code == 0
    for flag in ("--requests", "--seed", "--report", "--kill-replicas", "--kill-consumers", "--broker-restarts",
                 "--s3-error-rate"):
        assert flag in result.output


@pytest.mark.kafka
@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_chaos_run_loses_nothing_under_kills_restarts_and_s3_faults(ray_serve: None, tmp_path: Path) -> None:
    import ray
    from ray import serve

    apps_before = set(serve.status().applications)
    opts = ChaosOptions(
        requests=300, seed=11, kill_replicas=1, kill_consumers=1, broker_restarts=1, workdir=tmp_path / "run"
    )
    report = run_chaos(opts, command="pytest tests/test_chaos.py")
    write_report(report, tmp_path / "report.json")
    if not report.ok:  # kept where a later pytest run does not rotate it away
        write_report(report, Path(__file__).resolve().parents[1] / ".tmp" / "test-chaos-failed-report.json")
    summary = json.dumps(report.as_dict(), indent=1, default=str)

    assert report.ok, summary
    # (Outcomes at unknown coordinates may exist: copies of requests the broker acknowledged
    # with offset -1 and the feeder sent again; "no stray outcomes" checks they carry known ids.)
    assert report.lost == 0, summary
    assert report.faults["replica_kills"] == report.faults["consumer_kills"] == report.faults["broker_restarts"] == 1
    assert report.faults["s3_error"] > 0 and report.faults["s3_dropped"] > 0, summary
    assert set(report.dead_letters_by_code) == POISON_CODES, summary
    assert report.results >= 250 and report.outcomes >= report.requests
    assert report.duplicates <= report.duplicate_bound == opts.max_in_flight * 2
    assert not report.secret_leaks and report.secrets_scanned["output_records"] == report.outcomes
    assert report.secrets_scanned["log_lines"] > 0
    assert report.peak_rss_mb["consumer_workers_largest_process"] > 0
    # Worker counters come from each worker's registry dump: every worker that ran wrote one.
    assert report.worker_metrics and all(report.worker_metrics.values()), summary
    assert sum(c["captioner_consumed_total"] for c in report.worker_metrics.values()) >= report.requests * 0.9
    assert report.inference_retries == sum(
        c["captioner_inference_retries_total"] for c in report.worker_metrics.values()
    )
    # The session's Ray and its other Serve apps are untouched; ours is gone.
    assert ray.is_initialized()
    assert set(serve.status().applications) == apps_before
