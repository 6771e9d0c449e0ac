"""The fetch stage against the real SeaweedFS: each error code from a matching real condition."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.chaos.proxy import DRIPPED, DROPPED, ERROR, TRUNCATED, ChaosProxy, FaultPlan
from workers.config import LimitsConfig
from workers.contract import ErrorCode, Rejected
from workers.embedded import S3Server, free_port
from workers.fetch import Fetcher
from workers.s3 import make_s3_client

PAYLOAD = b"\xff\xd8\xff" + bytes(range(256)) * 8  # 2 KiB, JPEG-ish start


@pytest.fixture(scope="module")
def image_key(s3_server: S3Server) -> str:
    key = f"fetch/{uuid.uuid4().hex}/cat.jpg"
    s3_server.client().put_object(Bucket="images", Key=key, Body=PAYLOAD)
    return key


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[ChaosProxy]:
    with ChaosProxy(s3_server.endpoint_url, seed=7) as p:
        yield p


def make_fetcher(
    s3_server: S3Server,
    *,
    endpoint_url: str | None = None,
    max_object_bytes: int = 1024 * 1024,
    sleeps: list[float] | None = None,
    **s3_overrides,
) -> Fetcher:
    cfg = s3_server.s3_config(**{"backoff_s": 0.01, "max_attempts": 3, **s3_overrides})
    client = s3_server.client(endpoint_url=endpoint_url, read_timeout_s=s3_overrides.get("read_timeout_s", 30))
    sleep = sleeps.append if sleeps is not None else (lambda _s: None)
    return Fetcher(client, cfg, LimitsConfig(max_object_bytes=max_object_bytes), sleep=sleep, seed=1)


def rejected(fetcher: Fetcher, uri: str) -> Rejected:
    with pytest.raises(Rejected) as info:
        fetcher.fetch(uri)
    return info.value


def test_fetch_returns_bytes_etag_and_attempts(s3_server: S3Server, image_key: str) -> None:
    fetched = make_fetcher(s3_server).fetch(f"s3://images/{image_key}")
    assert fetched.data == PAYLOAD
    assert fetched.ref.key == image_key and fetched.attempts == 1
    assert fetched.etag and fetched.elapsed_ms > 0


def test_make_s3_client_finds_keys_in_the_environment(
    s3_server: S3Server, image_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    cfg = s3_server.s3_config()
    fetcher = Fetcher(make_s3_client(cfg), cfg, LimitsConfig())
    assert fetcher.fetch(f"S3://images/{image_key}").data == PAYLOAD  # scheme is case-insensitive


@pytest.mark.parametrize(
    "uri",
    [
        "s3://not-allowed/cat.jpg",
        "http://127.0.0.1/images/cat.jpg",
        "https://images.s3.amazonaws.com/cat.jpg",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "s3://images/../secret.jpg",
        "s3://images/a/../../b.jpg",
        "s3://images/",
        "s3:///cat.jpg",
    ],
)
def test_forbidden_references_never_reach_the_server(s3_server: S3Server, proxy: ChaosProxy, uri: str) -> None:
    fetcher = make_fetcher(s3_server, endpoint_url=proxy.url)
    assert rejected(fetcher, uri).code == ErrorCode.FORBIDDEN_REFERENCE
    assert proxy.seen == []


def test_missing_key_is_object_not_found_naming_the_uri(s3_server: S3Server) -> None:
    uri = f"s3://images/fetch/{uuid.uuid4().hex}.jpg"
    error = rejected(make_fetcher(s3_server), uri)
    assert error.code == ErrorCode.OBJECT_NOT_FOUND and uri in error.message


def test_missing_allow_listed_bucket_is_object_not_found(s3_server: S3Server) -> None:
    fetcher = make_fetcher(s3_server, allowed_buckets=["images", "no-such-bucket"])
    assert rejected(fetcher, "s3://no-such-bucket/cat.jpg").code == ErrorCode.OBJECT_NOT_FOUND


def test_object_too_large_is_refused_before_download(s3_server: S3Server, proxy: ChaosProxy) -> None:
    key = f"fetch/{uuid.uuid4().hex}/big.jpg"
    s3_server.client().put_object(Bucket="images", Key=key, Body=b"x" * 5000)
    fetcher = make_fetcher(s3_server, endpoint_url=proxy.url, max_object_bytes=4999)
    error = rejected(fetcher, f"s3://images/{key}")
    assert error.code == ErrorCode.OBJECT_TOO_LARGE and "5000" in error.message
    assert [s.method for s in proxy.seen] == ["HEAD"]  # no GET: not one body byte moved
    assert sum(s.body_bytes for s in proxy.seen) == 0


def test_object_that_grows_after_head_is_too_large(s3_server: S3Server, proxy: ChaosProxy) -> None:
    key = f"fetch/{uuid.uuid4().hex}/grows.jpg"
    direct = s3_server.client()
    direct.put_object(Bucket="images", Key=key, Body=b"small")

    def grow_before_first_get(method: str, _path: str) -> None:
        if method == "GET" and proxy.before_forward is not None:
            proxy.before_forward = None
            direct.put_object(Bucket="images", Key=key, Body=b"y" * 5000)

    proxy.before_forward = grow_before_first_get
    fetcher = make_fetcher(s3_server, endpoint_url=proxy.url, max_object_bytes=1000)
    assert rejected(fetcher, f"s3://images/{key}").code == ErrorCode.OBJECT_TOO_LARGE
    # The GET carried If-Match with the HEAD's ETag: refused (412), retried, and the new HEAD saw
    # the new size.
    assert [(s.method, s.status) for s in proxy.seen] == [("HEAD", 200), ("GET", 412), ("HEAD", 200)]


def test_read_guard_stops_at_limit_when_head_understates_the_size(s3_server: S3Server, proxy: ChaosProxy) -> None:
    key = f"fetch/{uuid.uuid4().hex}/liar.jpg"
    s3_server.client().put_object(Bucket="images", Key=key, Body=b"y" * 5000)

    def head_says_five_bytes(method: str, _path: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if method != "HEAD":
            return headers
        return [(k, "5" if k.lower() == "content-length" else v) for k, v in headers]

    proxy.rewrite_response_headers = head_says_five_bytes
    fetcher = make_fetcher(s3_server, endpoint_url=proxy.url, max_object_bytes=1000)
    error = rejected(fetcher, f"s3://images/{key}")
    assert error.code == ErrorCode.OBJECT_TOO_LARGE and "while being read" in error.message


def test_wrong_credentials_are_access_denied_without_echoing_keys(s3_server: S3Server, image_key: str) -> None:
    wrong_secret = "wrong-secret-" + uuid.uuid4().hex
    cfg = s3_server.s3_config()
    client = s3_server.client(secret_key=wrong_secret)
    error = rejected(Fetcher(client, cfg, LimitsConfig()), f"s3://images/{image_key}")
    assert error.code == ErrorCode.ACCESS_DENIED
    for secret in (wrong_secret, s3_server.secret_key):
        assert secret not in str(error)


def test_transient_503s_are_retried_with_growing_backoff(
    s3_server: S3Server, proxy: ChaosProxy, image_key: str
) -> None:
    proxy.set_plan(FaultPlan(fail_first=2, error_status=503))
    sleeps: list[float] = []
    fetched = make_fetcher(s3_server, endpoint_url=proxy.url, sleeps=sleeps).fetch(f"s3://images/{image_key}")
    assert fetched.data == PAYLOAD and fetched.attempts == 3
    assert proxy.counts()[ERROR] == 2
    # Exponential with jitter: attempt n waits in [b·2^(n-1)/2, b·2^(n-1)] for b = 0.01.
    assert len(sleeps) == 2 and 0.005 <= sleeps[0] <= 0.01 and 0.01 <= sleeps[1] <= 0.02


def test_persistent_5xx_is_fetch_failed_after_max_attempts(
    s3_server: S3Server, proxy: ChaosProxy, image_key: str
) -> None:
    proxy.set_plan(FaultPlan(fail_first=100, error_status=500))
    error = rejected(make_fetcher(s3_server, endpoint_url=proxy.url), f"s3://images/{image_key}")
    assert error.code == ErrorCode.FETCH_FAILED
    assert "3 attempt" in error.message and "500" in error.message
    assert proxy.counts()[ERROR] == 3
    assert s3_server.secret_key not in error.message and s3_server.access_key not in error.message


def test_dropped_connections_are_retried_then_fetch_failed(
    s3_server: S3Server, proxy: ChaosProxy, image_key: str
) -> None:
    proxy.set_plan(FaultPlan(drop_rate=1.0, applies_to=lambda method, _path: method == "GET"))
    error = rejected(make_fetcher(s3_server, endpoint_url=proxy.url), f"s3://images/{image_key}")
    assert error.code == ErrorCode.FETCH_FAILED
    assert proxy.counts()[DROPPED] == 3


def test_truncated_bodies_are_retried(s3_server: S3Server, proxy: ChaosProxy, image_key: str) -> None:
    # Every GET promises the whole body and hangs up halfway: each attempt fails, none succeeds.
    proxy.set_plan(FaultPlan(truncate_rate=1.0, applies_to=lambda method, _path: method == "GET"))
    error = rejected(make_fetcher(s3_server, endpoint_url=proxy.url), f"s3://images/{image_key}")
    assert error.code == ErrorCode.FETCH_FAILED and proxy.counts()[TRUNCATED] == 3

    proxy.set_plan(FaultPlan(fail_first=1, error_status=503, applies_to=lambda m, _p: m == "GET"))
    fetched = make_fetcher(s3_server, endpoint_url=proxy.url).fetch(f"s3://images/{image_key}")
    assert fetched.data == PAYLOAD and fetched.attempts == 2


def test_slow_responses_time_out_and_are_retried(s3_server: S3Server, proxy: ChaosProxy, image_key: str) -> None:
    proxy.set_plan(FaultPlan(delay_rate=1.0, delay_s=1.0, applies_to=lambda m, _p: m == "HEAD"))
    fetcher = make_fetcher(s3_server, endpoint_url=proxy.url, read_timeout_s=0.2, max_attempts=2)
    error = rejected(fetcher, f"s3://images/{image_key}")
    assert error.code == ErrorCode.FETCH_FAILED and "2 attempt" in error.message
    assert "timeout" in error.message.lower()


def test_unreachable_endpoint_is_fetch_failed(s3_server: S3Server, image_key: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    error = rejected(make_fetcher(s3_server, endpoint_url=dead, max_attempts=2), f"s3://images/{image_key}")
    assert error.code == ErrorCode.FETCH_FAILED and "2 attempt" in error.message


def test_concurrent_fetches_share_one_fetcher(s3_server: S3Server) -> None:
    client = s3_server.client()
    bodies = {f"fetch/par/{i}.jpg": f"image-{i}".encode() * 50 for i in range(16)}
    for key, body in bodies.items():
        client.put_object(Bucket="images", Key=key, Body=body)
    fetcher = make_fetcher(s3_server)
    threads: set[str] = set()

    def fetch(key: str) -> bytes:
        threads.add(threading.current_thread().name)
        return fetcher.fetch(f"s3://images/{key}").data

    keys = list(bodies) * 3
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetch, keys))
    assert results == [bodies[k] for k in keys]
    assert len(threads) > 1


def test_a_dripping_server_is_cut_off_at_the_fetch_deadline(
    s3_server: S3Server, proxy: ChaosProxy, image_key: str
) -> None:
    # Each socket read returns well inside the read timeout; only a total deadline ends it.
    proxy.set_plan(FaultPlan(drip_rate=1.0, drip_bytes=8, drip_interval_s=0.2, applies_to=lambda m, _p: m == "GET"))
    fetcher = make_fetcher(s3_server, endpoint_url=proxy.url, read_timeout_s=5, fetch_deadline_s=1.0, max_attempts=2)
    started = time.monotonic()
    error = rejected(fetcher, f"s3://images/{image_key}")
    assert error.code == ErrorCode.FETCH_FAILED and "fetch deadline" in error.message
    assert time.monotonic() - started < 8, "two attempts of about a second each, not the whole drip"
    assert proxy.counts()[DRIPPED] == 2


def test_retries_last_for_the_budget_not_a_count(s3_server: S3Server, proxy: ChaosProxy, image_key: str) -> None:
    proxy.set_plan(FaultPlan(fail_first=1000, error_status=503))
    cfg = s3_server.s3_config(backoff_s=0.05, max_attempts=None, retry_budget_s=1.5)
    client = s3_server.client(endpoint_url=proxy.url)
    started = time.monotonic()
    error = rejected(Fetcher(client, cfg, LimitsConfig(), seed=1), f"s3://images/{image_key}")
    elapsed = time.monotonic() - started
    assert error.code == ErrorCode.FETCH_FAILED and "503" in error.message
    assert 0.5 < elapsed < 4, elapsed
    assert proxy.counts()[ERROR] >= 5, "more tries than the old fixed count of 4 within the budget"
    proxy.set_plan(FaultPlan(fail_first=6, error_status=503))
    assert (
        Fetcher(client, cfg.model_copy(update={"retry_budget_s": 30}), LimitsConfig())
        .fetch(f"s3://images/{image_key}")
        .data
        == PAYLOAD
    ), "a burst of throttling inside the budget is not a dead letter"
