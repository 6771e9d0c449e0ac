"""Session-wide servers (one broker, one S3 server per test run) and environment hygiene."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Ray on a shared box: loopback only, no token auth, no usage stats. Set before anything imports
# ray. USE_TF is deliberately not set here: the TensorFlow backend has tests of its own.
for _name, _value in (
    ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
    ("RAY_AUTH_MODE", "disabled"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

from workers.embedded import Broker, S3Server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server(buckets=["images"]) as server:
        yield server


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    with Broker() as b:
        yield b


# One Ray cluster + Serve for every test module that needs it (a start costs ~6 s).
from helpers.worker_fixtures import ray_serve  # noqa: E402,F401
