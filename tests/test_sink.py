"""The sink against the real broker: keys, headers, topics, and on_ack after the broker's ack."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from helpers.kafka_helpers import consume_until, kafka_config
from workers import contract
from workers.config import KafkaConfig, LimitsConfig
from workers.embedded import Broker
from workers.params import GenerationParams
from workers.sink import Sink


class Acks:
    """Records on_ack calls: (error, thread name), and wakes waiters."""

    def __init__(self) -> None:
        self.calls: list[tuple[Exception | None, str]] = []
        self._cond = threading.Condition()

    def __call__(self, error: Exception | None) -> None:
        with self._cond:
            self.calls.append((error, threading.current_thread().name))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 15) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= count, timeout), self.calls


@pytest.fixture
def cfg(broker: Broker) -> KafkaConfig:
    return kafka_config(broker.bootstrap_servers)


@pytest.fixture
def sink(cfg: KafkaConfig) -> Iterator[Sink]:
    with Sink(cfg, LimitsConfig()) as s:
        yield s


def make_request(key: bytes | None = None) -> contract.Request:
    return contract.Request(
        id="cat-1",
        image="s3://images/cat.jpg",
        params=GenerationParams(),
        key=key,
        headers=[("trace-id", b"abc"), ("tenant", b"t1")],
        source=contract.Source("images", 0, 41),
    )


def test_result_goes_to_output_topic_keyed_by_id_with_headers(sink: Sink, cfg: KafkaConfig, broker: Broker) -> None:
    acks = Acks()
    request = make_request()
    record = {"id": request.id, "caption": "a cat", "source": request.source.as_dict()}
    sink.send(contract.Result.for_request(request, record), acks)
    acks.wait_for(1)

    assert acks.calls[0][0] is None
    assert acks.calls[0][1] != threading.main_thread().name  # the producer's I/O thread
    # Acknowledged means on the broker: a fresh consumer reads it now.
    [published] = consume_until(broker.bootstrap_servers, cfg.output_topic, 1, timeout=10)
    assert published.key == b"cat-1"
    assert list(published.headers) == [("trace-id", b"abc"), ("tenant", b"t1")]
    assert json.loads(published.value) == record


def test_result_key_prefers_the_request_key(sink: Sink, cfg: KafkaConfig, broker: Broker) -> None:
    acks = Acks()
    sink.send(contract.Result.for_request(make_request(key=b"original-key"), {"id": "cat-1"}), acks)
    sink.flush(10)
    assert [e for e, _ in acks.calls] == [None]
    [published] = consume_until(broker.bootstrap_servers, cfg.output_topic, 1, timeout=10)
    assert published.key == b"original-key"


def test_dead_letter_goes_to_dlq_topic_with_key_and_headers(sink: Sink, cfg: KafkaConfig, broker: Broker) -> None:
    acks = Acks()
    record = contract.dead_letter_record(
        code=contract.ErrorCode.OBJECT_NOT_FOUND,
        message="s3://images/x.jpg does not exist",
        value=b'{"image": "s3://images/x.jpg"}',
        source=contract.Source("images", 2, 7),
        attempts=1,
    )
    code = contract.ErrorCode.OBJECT_NOT_FOUND
    sink.send(contract.DeadLetter(code, record, key=b"k", headers=[("trace-id", b"xyz")]), acks)
    sink.send(contract.DeadLetter(code, record, key=None, headers=[]), acks)
    sink.flush(10)
    assert [e for e, _ in acks.calls] == [None, None]
    published = consume_until(broker.bootstrap_servers, cfg.dead_letter_topic, 2, timeout=10)
    assert sorted((r.key or b"", list(r.headers)) for r in published) == [
        (b"", []),
        (b"k", [("trace-id", b"xyz")]),
    ]
    assert all(json.loads(r.value)["error"]["code"] == "object_not_found" for r in published)
    assert consume_until(broker.bootstrap_servers, cfg.output_topic, lambda _r: True, timeout=5) == []


def test_record_too_large_reports_the_error_to_on_ack(sink: Sink) -> None:
    acks = Acks()
    huge = {"id": "big", "metadata": {"blob": "x" * (4 * 1024 * 1024)}}
    sink.send(contract.Result.for_request(make_request(), huge), acks)
    acks.wait_for(1)
    error, _thread = acks.calls[0]
    assert type(error).__name__ == "MessageSizeTooLargeError"
