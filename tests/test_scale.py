"""Scale-out on this machine: the scale benchmark's quick form (consistency, not speed) and Serve
autoscaling going up and down under load on local Ray (stand-in model: latency, no weights)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from workers.config import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.ray]


@pytest.fixture
def scale_app(ray_serve: str):
    from ray import serve

    from harness.bench.serve_app import APP

    yield ray_serve
    serve.delete(APP)


def test_scale_bench_quick_answers_every_request_once(broker, s3_server, scale_app):
    from harness.bench.scale import run

    out = io.StringIO()
    report = run(quick=True, console=Console(file=out, width=200), broker=broker, s3=s3_server, proxy_url=scale_app)
    assert [(p.ingests, p.replicas) for p in report.phases] == [(1, 1), (2, 2)]
    for phase in report.phases:
        assert phase.answered_once, f"{phase.ingests}x{phase.replicas}: a request unanswered or answered twice"
        assert phase.dead_letters == 0
    text = out.getvalue()
    assert "stand-in model" in text and "measures the plumbing, not the model" in text
    assert text.strip().splitlines()[-1].startswith("scale efficiency: ") and text.strip().endswith("at 2x2")


def test_serve_autoscaling_goes_up_under_a_backlog_and_back_down(s3_server, scale_app):
    from harness.bench.autoscale import autoscale
    from harness.bench.scale import PREFIX

    base = Settings(s3=s3_server.s3_config(allowed_buckets=["images"]), metrics={"port": 0})
    timeline = autoscale(scale_app + PREFIX, base, max_replicas=2, callers=4, hold_s=60)
    counts_under_load = [n for _, n, on in timeline if on]
    counts_after = [n for _, n, on in timeline if not on]
    assert counts_under_load[0] == 1, timeline
    assert max(counts_under_load + counts_after) == 2, timeline
    assert counts_after[-1] == 1, timeline
