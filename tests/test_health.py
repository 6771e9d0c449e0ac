"""Ingest health from progress (workers/health.py): a fake clock for the rules, a real socket for
the probe endpoints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from workers.health import Health, serve_health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_not_ready_before_the_first_poll_then_ready() -> None:
    clock = Clock()
    health = Health(max_poll_gap_s=60, max_stall_s=900, clock=clock)
    assert health.snapshot()["live"] and not health.snapshot()["ready"]
    health.polled(open_records=0)
    assert health.snapshot()["ready"]


def test_a_stuck_poll_loop_is_not_live() -> None:
    clock = Clock()
    health = Health(max_poll_gap_s=60, max_stall_s=900, clock=clock)
    health.polled(0)
    clock.now += 61
    state = health.snapshot()
    assert not state["live"] and not state["ready"] and "no poll" in state["problems"][0]


@pytest.mark.parametrize("commit_at, live", [(None, False), (500, True)])
def test_a_watermark_stuck_with_open_records_is_not_live_but_moving_commits_are(commit_at, live) -> None:
    clock = Clock()
    health = Health(max_poll_gap_s=60, max_stall_s=900, clock=clock)
    health.polled(open_records=5)  # records open from now on
    for step in range(1, 20):  # the loop keeps polling for 950 s
        clock.now += 50
        health.polled(open_records=5)
        if step * 50 == commit_at:
            health.committed(open_records=5)  # the watermark moved: a newer record is the oldest
    state = health.snapshot()
    assert state["live"] is live
    assert state["stalled_s"] == pytest.approx(950 if commit_at is None else 950 - commit_at)


def test_an_outage_shorter_than_the_stall_limit_stays_live() -> None:
    clock = Clock()
    health = Health(max_poll_gap_s=60, max_stall_s=900, clock=clock)
    for _ in range(17):  # 850 s of open records, polling on
        health.polled(open_records=3)
        clock.now += 50
    assert health.snapshot()["live"]
    health.polled(open_records=0)  # everything answered: nothing holds the watermark
    assert health.snapshot()["stalled_s"] == 0 and health.snapshot()["live"]


def test_probe_endpoints_answer_200_or_503() -> None:
    clock = Clock()
    health = Health(max_poll_gap_s=60, clock=clock)
    server = serve_health(health, 0)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/readyz", timeout=5)
        assert e.value.code == 503
        health.polled(0)
        assert urllib.request.urlopen(url + "/readyz", timeout=5).status == 200
        body = json.loads(urllib.request.urlopen(url + "/livez", timeout=5).read())
        assert body["live"] is True
        clock.now += 120
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/livez", timeout=5)
        assert e.value.code == 503 and "no poll" in json.loads(e.value.read())["problems"][0]
    finally:
        server.shutdown()
