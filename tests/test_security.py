"""Security and limits, against the real servers: a least-privilege S3 identity, Kafka over TLS,
SASL settings, secrets that never leak, and the per-request caps not covered elsewhere.

Session broker and S3 server come from conftest; this module adds its own S3 server with a
read-only "reader" identity, a broker advertised behind a TLS terminator, and (for the CLI test)
a `captioner run` subprocess with its own Ray.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from botocore.exceptions import ClientError
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from pydantic import SecretStr

from harness.chaos.proxy import DROPPED, ChaosProxy, FaultPlan
from helpers.kafka_helpers import committed_offsets, kafka_config, produce
from helpers.tls_helpers import TestCA, TlsTerminator
from helpers.worker_fixtures import (
    MODEL_CACHE,
    REPO,
    collect_outcomes,
    png_bytes,
    request,
    tiny_replicas,
    worker_settings,
)
from workers.config import ConfigError, KafkaConfig, LimitsConfig, load_settings
from workers.contract import ErrorCode, Rejected, parse_request
from workers.embedded import Broker, S3Server, free_port, wait_until
from workers.fetch import Fetcher
from workers.kafkaclient import client_kwargs, consumer_kwargs, ensure_topics, producer_kwargs
from workers.params import GenerationParams
from workers.pipeline import Pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.s3]

SASL_PASSWORD = "sasl-pw-" + os.urandom(8).hex()  # distinctive: any occurrence is a leak
MB = 1024 * 1024
# A refused TLS or SASL handshake fails at once; this only bounds the client's retries.
BOOTSTRAP_TIMEOUT_MS = 1000
ACCEPT_TIMEOUT_MS = 15_000


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reader_s3() -> Iterator[S3Server]:
    """An S3 server whose "reader" may read and list `images` only; `private` is admin-only."""
    # stop_timeout_s=1: weed takes ~4 s to exit on SIGTERM and is safe to SIGKILL (FIELD-NOTES).
    with S3Server(buckets=["images", "private"], reader_buckets=["images"], stop_timeout_s=1) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory)
    return {
        "ca": ca,
        "loopback": ca.issue("loopback", ["127.0.0.1", "localhost"]),
        "wrong_host": ca.issue("wrong-host", ["wrong.example"]),
        "stranger_ca": TestCA(directory, "stranger CA"),
    }


@pytest.fixture(scope="module")
def tls_broker(pki: dict[str, Any]) -> Iterator[tuple[Broker, TlsTerminator]]:
    """Tansu on a plaintext loopback port, advertising the TLS terminator's port in front of it."""
    tls_port = free_port()
    with Broker(advertised_port=tls_port) as broker, TlsTerminator(broker.port, pki["loopback"], port=tls_port) as tls:
        yield broker, tls


@pytest.fixture(scope="module")
def replicas(ray_serve: None) -> Iterator[Any]:
    with tiny_replicas("security-tests") as handle:
        yield handle


def tls_kafka(tls: TlsTerminator, pki: dict[str, Any], **overrides: Any) -> KafkaConfig:
    return kafka_config(
        tls.address,
        security_protocol="SSL",
        ssl_cafile=pki["ca"].cafile,
        commit_interval_s=0.2,
        poll_timeout_ms=100,
        **overrides,
    )


def assert_no_secret(secrets: dict[str, str], **places: str) -> None:
    for place, text in places.items():
        for name, secret in secrets.items():
            assert secret not in text, f"{name} leaked into {place}"


def records_text(records: list[Any]) -> str:
    """Everything a consumer of these records sees: values, keys and headers."""
    parts = []
    for r in records:
        parts.append((r.value or b"").decode("utf-8", "replace"))
        parts.append((r.key or b"").decode("utf-8", "replace"))
        parts.extend(f"{k}={v.decode('utf-8', 'replace')}" for k, v in r.headers or [])
    return "\n".join(parts)


# --- 1. least-privilege S3 identity ---------------------------------------------------------------


def test_reader_identity_reads_and_lists_only_its_buckets(reader_s3: S3Server) -> None:
    admin, reader = reader_s3.client(), reader_s3.reader_client()
    admin.put_object(Bucket="images", Key="acl/open.png", Body=b"open")
    admin.put_object(Bucket="private", Key="acl/closed.png", Body=b"closed")

    assert reader.get_object(Bucket="images", Key="acl/open.png")["Body"].read() == b"open"
    assert reader.list_objects_v2(Bucket="images", Prefix="acl/")["KeyCount"] == 1
    denied = [
        lambda: reader.get_object(Bucket="private", Key="acl/closed.png"),
        lambda: reader.head_object(Bucket="private", Key="acl/closed.png"),
        lambda: reader.list_objects_v2(Bucket="private"),
        lambda: reader.put_object(Bucket="images", Key="acl/new.png", Body=b"x"),
        lambda: reader.delete_object(Bucket="images", Key="acl/open.png"),
    ]
    for call in denied:
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert admin.get_object(Bucket="images", Key="acl/open.png")["Body"].read() == b"open"  # not deleted
    env = reader_s3.reader_env()
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        reader_s3.reader_access_key,
        reader_s3.reader_secret_key,
    )
    assert reader_s3.reader_secret_key not in repr(reader_s3) and reader_s3.secret_key not in repr(reader_s3)


def test_pipeline_with_reader_keys_dead_letters_access_denied_and_leaks_no_secret(
    broker: Broker,
    reader_s3: S3Server,
    replicas: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker holds only the reader's keys: allow-listed `private` is access_denied (not a
    crash, not a retry storm), a dropped connection is fetch_failed from botocore's own error
    text, and no secret (S3 keys, SASL password) reaches logs, outcomes or metrics."""
    admin = reader_s3.client()
    admin.put_object(Bucket="images", Key="sec/a.png", Body=png_bytes(901))
    admin.put_object(Bucket="images", Key="sec/b.png", Body=png_bytes(902))
    admin.put_object(Bucket="images", Key="sec/broken/c.png", Body=png_bytes(903))
    admin.put_object(Bucket="private", Key="secret.png", Body=png_bytes(904))
    # Fetcher (make_s3_client) takes its keys from the environment: the reader's, for this test only.
    for name, value in reader_s3.reader_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CAPTIONER_KAFKA__SASL_PASSWORD", SASL_PASSWORD)
    from_env = load_settings().kafka.sasl_password
    assert from_env is not None and from_env.get_secret_value() == SASL_PASSWORD
    caplog.set_level(logging.DEBUG)

    plan = FaultPlan(drop_rate=1.0, applies_to=lambda _method, path: "/broken/" in path)
    with ChaosProxy(reader_s3.endpoint_url, plan) as proxy:
        s3 = reader_s3.s3_config(
            endpoint_url=proxy.url, allowed_buckets=["images", "private"], max_attempts=2, backoff_s=0.01
        )
        settings = worker_settings(broker.bootstrap_servers, reader_s3, s3=s3)
        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"sasl_password": from_env})})
        kafka = settings.kafka
        ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic], partitions=1)
        values = [
            request("s3://images/sec/a.png", id="ok-1"),
            request("s3://private/secret.png", id="denied"),
            request("s3://images/sec/broken/c.png", id="dropped"),
            request("s3://images/sec/b.png", id="ok-2"),
        ]
        sent = produce(kafka.bootstrap_servers, kafka.input_topic, values)
        pipeline = Pipeline(settings, replicas).start()
        try:
            results, dead = collect_outcomes(kafka, len(values), timeout=60)
        finally:
            pipeline.stop()
        assert proxy.counts()[DROPPED] == 2  # both attempts at the broken key were dropped

    outcomes = {json.loads(r.value)["id"]: json.loads(r.value) for r in results + dead}
    assert {i for i, b in outcomes.items() if "error" not in b} == {"ok-1", "ok-2"}
    denied, dropped = outcomes["denied"]["error"], outcomes["dropped"]["error"]
    assert denied["code"] == ErrorCode.ACCESS_DENIED and "s3://private/secret.png" in denied["message"]
    assert outcomes["denied"]["attempts"] == 1  # a 403 is final: not retried
    assert dropped["code"] == ErrorCode.FETCH_FAILED and "ConnectionClosedError" in dropped["message"]
    assert committed_offsets(kafka.bootstrap_servers, kafka.group_id, kafka.input_topic) == {0: sent[-1].offset + 1}

    secrets = {
        "reader secret key": reader_s3.reader_secret_key,
        "admin secret key": reader_s3.secret_key,
        "SASL password": SASL_PASSWORD,
    }
    assert any(r.levelno == logging.DEBUG and r.name.startswith("botocore") for r in caplog.records)
    assert_no_secret(
        secrets,
        logs=caplog.text + "\n".join(str(r.args) for r in caplog.records),
        outcomes=records_text(results + dead),
        metrics=prometheus_client.generate_latest().decode(),
    )


# --- 2. Kafka over TLS ----------------------------------------------------------------------------


def test_pipeline_over_tls_requests_in_results_out(
    tls_broker: tuple[Broker, TlsTerminator], pki: dict[str, Any], s3_server: S3Server, replicas: Any
) -> None:
    _, tls = tls_broker
    settings = worker_settings(tls.address, s3_server, kafka=tls_kafka(tls, pki))
    kafka, limits = settings.kafka, settings.limits
    assert kafka.ssl_check_hostname  # the default: the cert's 127.0.0.1 SAN must match
    ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic], partitions=1)
    uris = []
    for i in range(3):
        s3_server.client().put_object(Bucket="images", Key=f"tls/{i}.png", Body=png_bytes(950 + i))
        uris.append(f"s3://images/tls/{i}.png")
    producer = KafkaProducer(**producer_kwargs(kafka, limits))
    try:
        for i, uri in enumerate(uris):
            producer.send(kafka.input_topic, value=request(uri, id=f"tls-{i}")).get(timeout=30)
    finally:
        producer.close(timeout=10)
    handshakes_before = tls.handshakes

    pipeline = Pipeline(settings, replicas).start()
    try:
        results, dead = collect_outcomes(kafka, len(uris))
    finally:
        pipeline.stop()

    assert dead == []
    assert sorted(json.loads(r.value)["id"] for r in results) == ["tls-0", "tls-1", "tls-2"]
    assert all(json.loads(r.value)["caption"] for r in results)
    assert tls.handshakes > handshakes_before  # the worker's consumer and producer came through TLS
    consumer = KafkaConsumer(**client_kwargs(kafka), group_id=kafka.group_id, enable_auto_commit=False)
    try:
        assert consumer.committed(TopicPartition(kafka.input_topic, 0)) == len(uris)
    finally:
        consumer.close()


def test_plaintext_client_cannot_talk_to_the_tls_port(tls_broker: tuple[Broker, TlsTerminator]) -> None:
    _, tls = tls_broker
    handshakes_before = tls.handshakes
    started = time.monotonic()
    with pytest.raises(KafkaError):
        KafkaConsumer(bootstrap_servers=tls.address, bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS).close()
    assert time.monotonic() - started < 10
    assert tls.handshakes == handshakes_before


def test_tls_checks_hostname_and_ca(tls_broker: tuple[Broker, TlsTerminator], pki: dict[str, Any]) -> None:
    broker, tls = tls_broker

    def bootstraps(address: str, timeout_ms: int = BOOTSTRAP_TIMEOUT_MS, **overrides: Any) -> bool:
        cfg = kafka_config(address, **{"security_protocol": "SSL", "ssl_cafile": pki["ca"].cafile, **overrides})
        try:
            KafkaConsumer(**client_kwargs(cfg), bootstrap_timeout_ms=timeout_ms).close()
        except KafkaError:
            return False
        return True

    # The loopback cert names both 127.0.0.1 and localhost. Where a handshake should succeed it
    # gets time to (a loaded CI machine took over 1 s once); refusals are quick either way.
    assert bootstraps(tls.address, timeout_ms=ACCEPT_TIMEOUT_MS)
    assert bootstraps(f"localhost:{tls.port}", timeout_ms=ACCEPT_TIMEOUT_MS)
    # A cert from the trusted CA for another host: refused while the hostname is checked.
    with TlsTerminator(broker.port, pki["wrong_host"], port=free_port()) as wrong_host:
        assert not bootstraps(wrong_host.address)
        assert bootstraps(wrong_host.address, timeout_ms=ACCEPT_TIMEOUT_MS, ssl_check_hostname=False)
    # Hostname checks off still verify the chain: another CA's trust file refuses our server.
    assert not bootstraps(tls.address, ssl_cafile=pki["stranger_ca"].cafile, ssl_check_hostname=False)


# --- 3. SASL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
def test_sasl_settings_reach_consumer_and_producer(protocol: str, tmp_path: Path) -> None:
    """SASL is NOT exercised end to end: Tansu (the only broker installable here) answers every
    SASL handshake with UnsupportedSaslMechanism, with or without `--authentication`
    (shared/FIELD-NOTES.md). So this checks what we control: the settings reach kafka-python's
    clients intact, and the clients accept them (constructed with `api_version` set, so no
    network is needed, against a port nobody listens on)."""
    cafile = tmp_path / "ca.pem"
    cafile.write_text("unused: nothing connects")
    cfg = KafkaConfig(
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        security_protocol=protocol,
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="captioner",
        sasl_password=SASL_PASSWORD,
        ssl_cafile=cafile if protocol == "SASL_SSL" else None,
    )
    limits = LimitsConfig()
    expected = {
        "security_protocol": protocol,
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "captioner",
        "sasl_plain_password": SASL_PASSWORD,
    }
    for kwargs in (client_kwargs(cfg), consumer_kwargs(cfg, limits), producer_kwargs(cfg, limits)):
        assert expected.items() <= kwargs.items()
        assert ("ssl_cafile" in kwargs) == (protocol == "SASL_SSL")
    offline = {"api_version": (2, 5)}
    consumer = KafkaConsumer(**consumer_kwargs(cfg, limits), **offline)
    producer = KafkaProducer(**producer_kwargs(cfg, limits), **offline)
    try:
        for client in (consumer, producer):
            assert {k: client.config[k] for k in expected} == expected
    finally:
        consumer.close()
        producer.close(timeout=2)


def test_sasl_handshake_is_attempted_and_the_password_is_not_logged(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """The nearest to end to end this broker allows: a SASL_PLAINTEXT client really sends its
    SaslHandshake (Tansu refuses the mechanism), and nothing it logs at DEBUG holds the password."""
    caplog.set_level(logging.DEBUG, logger="kafka")
    cfg = KafkaConfig(
        bootstrap_servers=broker.bootstrap_servers,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="captioner",
        sasl_password=SASL_PASSWORD,
    )
    with pytest.raises(KafkaError):
        KafkaConsumer(**client_kwargs(cfg), bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS).close()
    assert "SaslHandshakeRequest" in caplog.text and "mechanism='PLAIN'" in caplog.text
    assert SASL_PASSWORD not in caplog.text


def test_kafka_debug_logs_redact_sasl_plain_credentials(caplog: pytest.LogCaptureFixture) -> None:
    """kafka-python logs each request's repr at DEBUG, and a SASL PLAIN authenticate request's
    repr is the password in clear. Tansu refuses the handshake before that request is sent, so
    the two log calls kafka-python 3.0.12 makes are replayed here (its format strings, its
    request class) through its own loggers; kafkaclient's filter must redact both."""
    from kafka.net.sasl.plain import SaslMechanismPlain
    from kafka.protocol.sasl import SaslAuthenticateRequest

    token = SaslMechanismPlain(sasl_plain_username="captioner", sasl_plain_password=SASL_PASSWORD).auth_bytes()
    authenticate = SaslAuthenticateRequest(token)
    assert SASL_PASSWORD in repr(authenticate)  # what would be logged without the filter
    caplog.set_level(logging.DEBUG, logger="kafka")
    logging.getLogger("kafka.protocol.parser").debug("%s Sending request %d %s", "node=0", 3, authenticate)
    logging.getLogger("kafka.net.connection").debug("%s Request %d: %s", "<KafkaConnection>", 3, authenticate)
    assert caplog.text.count("SaslAuthenticateRequest(auth_bytes=<redacted>)") == 2
    assert SASL_PASSWORD not in caplog.text


def test_sasl_password_comes_from_the_environment_as_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "captioner"}
    with pytest.raises(ConfigError, match="sasl_password") as missing:
        load_settings(kafka=sasl)
    assert "CAPTIONER_KAFKA__SASL_PASSWORD" in str(missing.value)

    monkeypatch.setenv("CAPTIONER_KAFKA__SASL_PASSWORD", SASL_PASSWORD)
    settings = load_settings(kafka=sasl)
    assert isinstance(settings.kafka.sasl_password, SecretStr)
    assert settings.kafka.sasl_password.get_secret_value() == SASL_PASSWORD
    for text in (str(settings), repr(settings), settings.model_dump_json()):
        assert SASL_PASSWORD not in text
    # A config that fails for another reason does not echo the password either.
    with pytest.raises(ConfigError) as bad:
        load_settings(kafka={**sasl, "sasl_username": None, "session_timeout_ms": 1})
    assert SASL_PASSWORD not in str(bad.value)


# --- 4. the real CLI: SIGTERM drains, commits, exits 0, and leaks nothing ------------------------


def test_captioner_run_drains_on_sigterm_and_leaks_no_secret(
    broker: Broker, reader_s3: S3Server, tmp_path: Path
) -> None:
    admin = reader_s3.client()
    admin.put_object(Bucket="private", Key="cli/secret.png", Body=png_bytes(960))
    admin.put_object(Bucket="images", Key="cli/broken/x.png", Body=png_bytes(961))
    good = []
    for i in range(8):
        admin.put_object(Bucket="images", Key=f"cli/{i}.png", Body=png_bytes(970 + i))
        good.append(f"s3://images/cli/{i}.png")
    kafka = kafka_config(broker.bootstrap_servers)
    ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic], partitions=1)
    first = [
        request("s3://private/cli/secret.png", id="denied"),
        request("s3://images/cli/broken/x.png", id="dropped"),
        request(good[0], id="ok-0"),
    ]
    produce(kafka.bootstrap_servers, kafka.input_topic, first)

    plan = FaultPlan(drop_rate=1.0, applies_to=lambda _method, path: "/broken/" in path)
    with ChaosProxy(reader_s3.endpoint_url, plan) as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CAPTIONER_")) and k != "RAY_ADDRESS"}
        env.update(reader_s3.reader_env())  # the worker holds only the read-only keys
        env.update(
            {
                "CAPTIONER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "CAPTIONER_KAFKA__INPUT_TOPIC": kafka.input_topic,
                "CAPTIONER_KAFKA__OUTPUT_TOPIC": kafka.output_topic,
                "CAPTIONER_KAFKA__DEAD_LETTER_TOPIC": kafka.dead_letter_topic,
                "CAPTIONER_KAFKA__GROUP_ID": kafka.group_id,
                "CAPTIONER_KAFKA__SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
                "CAPTIONER_KAFKA__HEARTBEAT_INTERVAL_MS": str(kafka.heartbeat_interval_ms),
                "CAPTIONER_KAFKA__POLL_TIMEOUT_MS": "100",
                # Only the stop path commits: the committed offset below is the drain's doing.
                "CAPTIONER_KAFKA__COMMIT_INTERVAL_S": "600",
                "CAPTIONER_KAFKA__SASL_USERNAME": "captioner",
                "CAPTIONER_KAFKA__SASL_PASSWORD": SASL_PASSWORD,
                "CAPTIONER_S3__ENDPOINT_URL": proxy.url,
                "CAPTIONER_S3__ALLOWED_BUCKETS": '["images", "private"]',
                "CAPTIONER_S3__MAX_ATTEMPTS": "2",
                "CAPTIONER_S3__BACKOFF_S": "0.01",
                "CAPTIONER_MODEL__SOURCE": "tiny-random",
                "CAPTIONER_MODEL__CACHE_DIR": str(MODEL_CACHE),
                "CAPTIONER_MODEL__TORCH_THREADS": "1",
                "CAPTIONER_REPLICAS__MAX_BATCH_SIZE": "4",
                "CAPTIONER_RAY__TEMP_DIR": f"/tmp/captioner-test-ray-cli-{os.getuid()}",  # short: AF_UNIX paths
                "CAPTIONER_RAY__NUM_CPUS": "2",
                "CAPTIONER_METRICS__PORT": "0",
                "CAPTIONER_WORKER__DRAIN_TIMEOUT_S": "30",
                "USE_TF": "0",  # torch backend: importing TensorFlow too would cost ~2 s and 600 MB
                "PYTHONUNBUFFERED": "1",
            }
        )
        log_path = tmp_path / "captioner-run.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "run"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                collect_outcomes(kafka, len(first), timeout=120)
                # More work, then SIGTERM as soon as one of it is answered: the rest is in flight.
                produce(
                    kafka.bootstrap_servers,
                    kafka.input_topic,
                    [request(u, id=f"ok-{i}") for i, u in enumerate(good[1:], start=1)],
                )
                collect_outcomes(kafka, len(first) + 1, timeout=60)
                proc.send_signal(signal.SIGTERM)
                returncode = proc.wait(timeout=90)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    output = log_path.read_text(errors="replace")
    assert returncode == 0, output[-3000:]
    assert "draining" in output

    committed = committed_offsets(kafka.bootstrap_servers, kafka.group_id, kafka.input_topic)[0]
    total = len(first) + len(good) - 1
    results, dead = collect_outcomes(kafka, committed, timeout=30)
    answered = sorted(json.loads(r.value)["source"]["offset"] for r in results + dead)
    # Everything it read was answered and committed; nothing past the commit was answered.
    assert len(first) < committed <= total
    assert answered == list(range(committed)), (committed, answered)
    codes = {json.loads(d.value)["id"]: json.loads(d.value)["error"]["code"] for d in dead}
    assert codes == {"denied": "access_denied", "dropped": "fetch_failed"}
    secrets = {
        "reader secret key": reader_s3.reader_secret_key,
        "admin secret key": reader_s3.secret_key,
        "SASL password": SASL_PASSWORD,
    }
    assert_no_secret(secrets, output=output, outcomes=records_text(results + dead))


# --- 5. limits not covered elsewhere ----------------------------------------------------------------


def test_limit_defaults_match_the_contract() -> None:
    limits = LimitsConfig()
    assert (limits.max_object_bytes, limits.max_image_pixels, limits.max_message_bytes) == (20 * MB, 50_000_000, 2 * MB)
    assert (limits.max_beam_size, limits.max_output_length, limits.max_return_sequences) == (8, 64, 8)


def test_message_size_limit_with_a_real_broker(broker: Broker) -> None:
    """kafka-python fetches 1 MB per partition by default; the worker's consumer must still read a
    request up to the limit, and one over it (to dead-letter it as invalid_message)."""
    limits = LimitsConfig(max_message_bytes=int(1.5 * MB))
    cfg = kafka_config(broker.bootstrap_servers)
    ensure_topics(cfg, [cfg.input_topic], partitions=1)
    pad_to_limit = "x" * (limits.max_message_bytes - 200)
    at_limit = json.dumps({"image": "s3://images/a.png", "metadata": {"pad": pad_to_limit}}).encode()
    over_limit = at_limit + b" " * (limits.max_message_bytes - len(at_limit) + 1)
    assert len(at_limit) <= limits.max_message_bytes < len(over_limit)
    produce(cfg.bootstrap_servers, cfg.input_topic, [at_limit, over_limit])

    consumer = KafkaConsumer(**consumer_kwargs(cfg, limits))
    read: list[bytes] = []
    try:
        consumer.assign([TopicPartition(cfg.input_topic, 0)])
        consumer.seek_to_beginning()

        def both_read() -> bool:
            read.extend(r.value for records in consumer.poll(timeout_ms=200).values() for r in records)
            return len(read) >= 2

        wait_until(both_read, timeout_s=20, interval_s=0, what="two big records")
    finally:
        consumer.close()
    assert parse_request(read[0], defaults=GenerationParams(), limits=limits).metadata["pad"] == pad_to_limit
    with pytest.raises(Rejected) as err:
        parse_request(read[1], defaults=GenerationParams(), limits=limits)
    assert err.value.code == ErrorCode.INVALID_MESSAGE and "max_message_bytes" in err.value.message


class _Redirector(http.server.BaseHTTPRequestHandler):
    """Answers every request with a redirect to `location` (the S3 server never sees it)."""

    status = 307
    location = ""

    def _redirect(self) -> None:
        self.send_response(self.status)
        self.send_header("Location", self.location + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _redirect

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(s3_server: S3Server, status: int) -> None:
    trap_hits: list[str] = []

    class Trap(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            trap_hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    trap = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trap)
    handler = type("Redirect", (_Redirector,), {"status": status, "location": f"http://127.0.0.1:{trap.server_port}"})
    redirector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    servers = [trap, redirector]
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = s3_server.client(endpoint_url=f"http://127.0.0.1:{redirector.server_port}")
        fetcher = Fetcher(
            client, s3_server.s3_config(max_attempts=2, backoff_s=0), LimitsConfig(), sleep=lambda _s: None
        )
        with pytest.raises(Rejected) as err:
            fetcher.fetch("s3://images/redirected.png")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert err.value.code == ErrorCode.FETCH_FAILED and "redirect not followed" in err.value.message
    assert trap_hits == []
