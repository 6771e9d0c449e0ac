"""The embedded servers: real processes, loopback ports, credentials enforced, clean stops."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

from helpers.kafka_helpers import consume_until, kafka_config, produce, unique_topic
from workers.config import load_settings
from workers.embedded import (
    WEED_GRPC_OFFSET,
    Broker,
    S3Server,
    free_ports,
    live_servers,
    resolve_embedded,
)
from workers.kafkaclient import ensure_topics


def test_s3_server_round_trip_and_rejects_wrong_signature(s3_server: S3Server) -> None:
    key = f"embedded/{uuid.uuid4().hex}.bin"
    s3_server.client().put_object(Bucket="images", Key=key, Body=b"payload")
    assert s3_server.client().get_object(Bucket="images", Key=key)["Body"].read() == b"payload"

    impostor = s3_server.client(secret_key="not-the-secret-" + "x" * 25)
    with pytest.raises(ClientError) as denied:
        impostor.get_object(Bucket="images", Key=key)
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3_server_rejects_unsigned_requests(s3_server: S3Server) -> None:
    s3_server.client().put_object(Bucket="images", Key="embedded/public.txt", Body=b"x")
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{s3_server.endpoint_url}/images/embedded/public.txt", timeout=5)
    assert denied.value.code == 403


def test_s3_server_keeps_secret_out_of_repr_and_exposes_config(s3_server: S3Server) -> None:
    assert s3_server.secret_key not in repr(s3_server)
    assert s3_server.access_key in repr(s3_server)
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    cfg = s3_server.s3_config(max_attempts=2)
    assert (cfg.endpoint_url, cfg.region, cfg.max_attempts) == (s3_server.endpoint_url, "us-east-1", 2)
    env = s3_server.env()
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key
    assert env["AWS_ENDPOINT"] == s3_server.endpoint_url and env["AWS_ALLOW_HTTP"] == "true"


def test_free_ports_leave_grpc_partners_free() -> None:
    ports = free_ports(5, partner_offset=WEED_GRPC_OFFSET)
    assert len(set(ports) | {p + WEED_GRPC_OFFSET for p in ports}) == 10
    assert all(p + WEED_GRPC_OFFSET < 32768 for p in ports)  # below the ephemeral range


def test_broker_round_trip_with_headers(broker: Broker) -> None:
    topic = unique_topic("embedded")
    produce(broker.bootstrap_servers, topic, [b"v1", b"v2"], keys=[b"k1", None], headers=[[("h", b"1")], []])
    records = consume_until(broker.bootstrap_servers, topic, 2, timeout=15)
    by_value = {r.value: r for r in records}  # auto-created topics have 4 partitions: no order
    assert (by_value[b"v1"].key, by_value[b"v2"].key) == (b"k1", None)
    assert list(by_value[b"v1"].headers) == [("h", b"1")] and list(by_value[b"v2"].headers) == []


def test_ensure_topics_is_idempotent(broker: Broker) -> None:
    cfg = kafka_config(broker.bootstrap_servers)
    topics = [unique_topic("ensure"), unique_topic("ensure")]
    assert sorted(ensure_topics(cfg, topics, partitions=2)) == sorted(topics)
    assert ensure_topics(cfg, topics, partitions=2) == []
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert consumer.partitions_for_topic(topics[0]) == {0, 1}
    finally:
        consumer.close()


def test_durable_broker_restart_keeps_port_records_and_commits(s3_server: S3Server) -> None:
    bucket = f"tansu-{uuid.uuid4().hex[:8]}"
    topic, group = unique_topic("durable"), unique_topic("g")
    with Broker(s3=s3_server, bucket=bucket) as durable:
        address, first_pid = durable.bootstrap_servers, durable.pid
        # One partition: auto-created topics get 4 here, and order holds only within a partition.
        ensure_topics(kafka_config(address), [topic], partitions=1)
        produce(address, topic, [b"a", b"b", b"c"])
        consumer = KafkaConsumer(bootstrap_servers=address, group_id=group, enable_auto_commit=False)
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.commit({tp: OffsetAndMetadata(2, "", -1)})
        finally:
            consumer.close()

        durable.restart()

        assert durable.bootstrap_servers == address and durable.pid != first_pid
        assert [r.value for r in consume_until(address, topic, 3, timeout=15)] == [b"a", b"b", b"c"]
        consumer = KafkaConsumer(bootstrap_servers=address, group_id=group, enable_auto_commit=False)
        try:
            assert consumer.committed(TopicPartition(topic, 0)) == 2
        finally:
            consumer.close()
    assert not durable.running
    # Tansu stored its data in the bucket it was given (created for it).
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) > 0


def test_stop_leaves_no_process(tmp_path) -> None:
    broker = Broker(workdir=tmp_path)
    broker.start()
    pid = broker.pid
    assert pid is not None and any(p.pid == pid for p in live_servers())
    broker.stop()
    assert not any(p.pid == pid for p in live_servers())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_resolve_embedded_starts_resolves_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    settings = load_settings(s3={"allowed_buckets": ["photos", "more"]})
    assert settings.kafka.embedded and settings.s3.embedded

    with resolve_embedded(settings) as embedded:
        resolved = embedded.settings
        assert resolved.kafka.bootstrap_servers == embedded.broker.bootstrap_servers
        assert resolved.s3.endpoint_url == embedded.s3.endpoint_url
        assert os.environ["AWS_ACCESS_KEY_ID"] == embedded.s3.access_key
        # The standard chain (make_s3_client) finds the keys; allow-listed buckets exist.
        from workers.s3 import make_s3_client

        names = {b["Name"] for b in make_s3_client(resolved.s3).list_buckets()["Buckets"]}
        assert {"photos", "more"} <= names
        pids = {embedded.broker.pid, embedded.s3._proc.pid}

    assert "AWS_ACCESS_KEY_ID" not in os.environ
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert settings.kafka.embedded  # the input settings are untouched


def test_clean_stop_removes_the_servers_temp_folders() -> None:
    with S3Server() as s3, Broker(s3=None) as broker:
        folders = [s3.workdir, broker.workdir]
        assert all(f.is_dir() for f in folders)
        assert all(f"-{os.getpid()}-" in f.name for f in folders)  # named after their process
    assert not any(f.exists() for f in folders)


_KILLED_PARENT = """
import json, sys, threading
from workers.embedded import Broker, S3Server
box = {}
def start():  # from a thread that ends at once: the servers must outlive it, not the process
    box["s3"], box["broker"] = S3Server().start(), Broker().start()
t = threading.Thread(target=start); t.start(); t.join()
s3, broker = box["s3"], box["broker"]
print(json.dumps({"pids": [s3._proc.pid, broker.pid], "folders": [str(s3.workdir), str(broker.workdir)],
                  "s3_ports": s3.ports, "broker_port": broker.port}), flush=True)
threading.Event().wait()
"""


def test_servers_die_with_a_killed_parent_and_a_later_start_is_not_tripped(tmp_path) -> None:
    """SIGKILL leaves no server running (the kernel's parent-death signal), and a later start on
    the very same ports cleans up after it: the orphaned temp folders go, weed's stale gRPC
    sockets do not block it."""
    import json
    import subprocess
    import sys

    from helpers.processes import read_proc
    from workers.embedded import wait_until

    parent = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PARENT],
        stdout=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        started = json.loads(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(10)
    servers = [read_proc(pid) for pid in started["pids"]]
    assert all(servers), "the servers did not outlive the thread that started them"
    wait_until(lambda: not any(p.alive() for p in servers), timeout_s=10, what="servers to die with their parent")
    assert all(Path(f).is_dir() for f in started["folders"])  # left behind: nobody ran to remove them

    s3 = S3Server()
    s3.ports = started["s3_ports"]
    with s3, Broker(port=started["broker_port"]) as broker:
        assert s3.client().list_buckets() is not None
        assert broker.running
    assert not any(Path(f).exists() for f in started["folders"])
