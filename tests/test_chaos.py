"""The chaos run at CI size: real servers, real Ray Serve replicas, real kills; nothing may be lost.

The run starts its own S3 server and a DURABLE broker on it (the session broker is in-memory and
could not survive a restart), and reuses the session's Ray + Serve (`ray_serve`): it must deploy
its replicas under its own app name and leave every other app alone.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

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


CHAOS_LIMITS = LimitsConfig(max_message_bytes=256 * 1024, max_object_bytes=1024 * 1024, max_image_pixels=4_000_000)
HOSTILE_KINDS = {
    "surrogate_in_id", "surrogate_in_metadata", "nan_in_params", "infinity_in_metadata", "non_utf8_header_key",
    "null_header_value", "oversized_key", "oversized_headers",
}  # fmt: skip


def test_the_request_mix_has_every_poison_kind_and_unique_ids() -> None:
    corpus = build_corpus(ChaosOptions(requests=300, seed=3), CHAOS_LIMITS, "t")
    kinds = Counter(c.kind for c in corpus.cases)
    assert len(corpus.cases) == 300
    assert len({c.id for c in corpus.cases}) == 300
    assert len({c.key for c in corpus.cases}) == 300
    assert {c.expected for c in corpus.cases} == POISON_CODES | {RESULT}
    assert {k for k in kinds if k.startswith("awkward_")} == {
        "awkward_cmyk", "awkward_16bit", "awkward_animated_gif", "awkward_exif_rotated",
    }  # fmt: skip
    assert HOSTILE_KINDS <= set(kinds)
    assert kinds["valid_repeat"] > 0, "no repeated image: the cache would not be exercised"
    huge = next(c for c in corpus.cases if c.kind == "huge_value")
    assert huge.value is not None and len(huge.value) > 256 * 1024
    # Same seed, same mix (ids carry the run id, so compare everything else).
    again = build_corpus(ChaosOptions(requests=300, seed=3), CHAOS_LIMITS, "t")
    assert [(c.kind, c.value, c.headers) for c in again.cases] == [(c.kind, c.value, c.headers) for c in corpus.cases]


def test_hostile_records_and_near_limit_images_are_what_they_claim() -> None:
    from workers.contract import Rejected, parse_request
    from workers.images import decode
    from workers.params import GenerationParams

    corpus = build_corpus(ChaosOptions(requests=300, seed=3), CHAOS_LIMITS, "t")
    by_kind = {c.kind: c for c in corpus.cases}
    # Each hostile record is refused by the contract for what it is, or answered (null header).
    for kind in HOSTILE_KINDS:
        case = by_kind[kind]
        request: dict[str, Any] = {
            "defaults": GenerationParams(), "limits": CHAOS_LIMITS, "key": case.key, "headers": list(case.headers),
        }  # fmt: skip
        if case.expected == RESULT:
            assert parse_request(case.value, **request).id == case.id
        else:
            with pytest.raises(Rejected) as refused:
                parse_request(case.value, **request)
            assert refused.value.code == case.expected, (kind, refused.value)
    assert len(by_kind["oversized_key"].key) > CHAOS_LIMITS.max_message_bytes
    assert by_kind["oversized_key"].key.startswith(by_kind["oversized_key"].id.encode() + b"#")
    assert by_kind["null_header_value"].null_headers and not by_kind["non_utf8_header_key"].null_headers
    # Near-limit images: under both limits, close to them, and decodable.
    pixels = corpus.objects[("images", "chaos/near_limit_pixels.img")]
    width, height = by_kind["near_limit_pixels"].size or (0, 0)
    assert 0.99 * CHAOS_LIMITS.max_image_pixels < width * height <= CHAOS_LIMITS.max_image_pixels
    assert decode(pixels, max_pixels=CHAOS_LIMITS.max_image_pixels).size == (width, height)
    heavy = corpus.objects[("images", "chaos/near_limit_bytes.img")]
    assert 0.85 * CHAOS_LIMITS.max_object_bytes < len(heavy) <= CHAOS_LIMITS.max_object_bytes


def test_a_throttling_burst_answers_every_call_503_for_its_duration() -> None:
    import http.client
    import time

    from harness.chaos.proxy import FORWARDED, THROTTLED, ChaosProxy

    with ChaosProxy("127.0.0.1:9") as proxy:  # upstream unused while throttled
        proxy.throttle_for(0.5)
        statuses = []
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
            conn.request("GET", "/images/a.png")
            response = conn.getresponse()
            statuses.append((response.status, b"SlowDown" in response.read()))
            conn.close()
        assert statuses == [(503, True)] * 3
        time.sleep(0.6)  # the burst's own duration is what is under test
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        conn.request("GET", "/images/a.png")  # forwarded now: the dead upstream drops it
        try:
            conn.getresponse()
        except (http.client.HTTPException, OSError):
            pass
        conn.close()
        outcomes = [s.outcome for s in proxy.seen]
        assert outcomes[:3] == [THROTTLED] * 3 and THROTTLED not in outcomes[3:] and FORWARDED not in outcomes


def test_a_replica_hang_lasts_until_a_call_has_timed_out(monkeypatch) -> None:
    """Stopped for at least hang_s, then until `felt()` (a call timed out), not longer."""
    import subprocess
    import threading
    import time

    from harness.chaos import faults
    from workers.embedded.process import wait_until

    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    child = subprocess.Popen(["sleep", "60"])
    try:
        monkeypatch.setattr(faults, "replica_pids", lambda app_name: [child.pid])
        felt = threading.Event()
        hangs = faults.ReplicaHangs(hang_s=0.2, max_extra_s=60)
        started = time.monotonic()
        assert hangs.hang("app", felt.is_set) == [child.pid]
        wait_until(lambda: state(child.pid) == "T", timeout_s=5, what="stopped")
        wait_until(lambda: time.monotonic() - started > 1.0, timeout_s=5, what="well past hang_s")
        assert state(child.pid) == "T"  # hang_s is over, but no call has timed out yet
        felt.set()
        wait_until(lambda: state(child.pid) != "T", timeout_s=5, what="continued once a call timed out")
        hangs.resume_all()
    finally:
        child.kill()
        child.wait()


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
    assert counters["captioner_dead_letters_total{code=invalid_image}"] == 2  # and by label
    assert not any(name.endswith("_created") for name in counters)
    assert read_metrics_file(tmp_path / "never-written.prom") == {}


def test_chaos_command_is_registered() -> None:
    result = CliRunner().invoke(app, ["chaos", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--requests",
        "--seed",
        "--report",
        "--kill-replicas",
        "--kill-consumers",
        "--broker-restarts",
        "--s3-error-rate",
        "--s3-drip-rate",
        "--hang-replicas",
        "--throttle-bursts",
        "--drain-rebalances",
    ):
        assert flag in result.output


@pytest.mark.kafka
@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_chaos_run_loses_nothing_under_kills_hangs_drains_restarts_and_s3_faults(
    ray_serve: None, tmp_path: Path
) -> None:
    import ray
    from ray import serve

    apps_before = set(serve.status().applications)
    opts = ChaosOptions(
        requests=300,
        seed=11,
        kill_replicas=1,
        kill_consumers=1,
        broker_restarts=1,
        hang_replicas=1,
        throttle_bursts=1,
        drain_rebalances=1,
        s3_drip_rate=0.02,
        workdir=tmp_path / "run",
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
    for kind in (
        "replica_kills",
        "consumer_kills",
        "broker_restarts",
        "replica_hangs",
        "throttle_bursts",
        "drain_rebalances",
    ):
        assert report.faults[kind] == 1, (kind, summary)
    assert report.faults["s3_error"] > 0 and report.faults["s3_dropped"] > 0, summary
    # The slow faults bit: a hang cancelled calls, a burst throttled fetches, a drip hit the deadline.
    retries = report.retries_by_fault
    assert retries["replica kills + hung replicas"]["replica call timeouts"] > 0, summary
    assert report.faults["s3_throttled"] > 0 and report.faults["s3_dripped"] > 0, summary
    assert retries["s3 dripping GETs"]["fetch retries, deadline"] > 0, summary
    assert set(report.dead_letters_by_code) == POISON_CODES, summary
    assert {k for k in report.requests_by_kind if k in HOSTILE_KINDS} == HOSTILE_KINDS
    assert report.results >= 250 and report.outcomes >= report.requests
    assert report.duplicates <= report.duplicate_bound == opts.max_in_flight * opts.consumers * 3
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
