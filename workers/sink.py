"""The sink: results and dead letters onto their topics, each outcome acknowledged by the broker.

`on_ack(None)` means the record is on the broker (acks=all, idempotent producer); `on_ack(exc)`
means it is not, and the caller must not commit past it. Callbacks run on the producer's I/O
thread: keep them short and thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaProducer

from workers import contract
from workers.config import KafkaConfig, LimitsConfig
from workers.kafkaclient import producer_kwargs

log = logging.getLogger(__name__)

OnAck = Callable[[Exception | None], None]
Headers = Sequence[tuple[str, bytes]]


class Sink:
    def __init__(self, cfg: KafkaConfig, limits: LimitsConfig, **producer_overrides: Any):
        self.cfg = cfg
        self._producer = KafkaProducer(**{**producer_kwargs(cfg, limits), **producer_overrides})

    def send(self, outcome: contract.Outcome, on_ack: OnAck) -> None:
        """Publish a result or a dead letter with its key and headers (CONTRACT-NOTES)."""
        topic = self.cfg.output_topic if isinstance(outcome, contract.Result) else self.cfg.dead_letter_topic
        self._send(topic, outcome.value, outcome.key, outcome.headers, on_ack)

    def _send(self, topic: str, value: bytes, key: bytes | None, headers: Headers, on_ack: OnAck) -> None:
        try:
            future = self._producer.send(topic, value=value, key=key, headers=list(headers))
        except Exception as e:  # e.g. record too large, producer closed: report it the same way
            _call(on_ack, e)
            return
        future.add_callback(lambda metadata: _call(on_ack, _unconfirmed(topic, metadata)))
        future.add_errback(lambda exc: _call(on_ack, exc if isinstance(exc, Exception) else RuntimeError(str(exc))))

    def flush(self, timeout: float | None = None) -> None:
        """Block until every sent record is acknowledged or failed (KafkaTimeoutError past timeout)."""
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        self._producer.close(timeout=timeout)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnconfirmedWrite(RuntimeError):
    """The broker acknowledged without an offset: not proof that the record was stored."""


def _unconfirmed(topic: str, metadata: Any) -> Exception | None:
    # Seen with Tansu around a kill -9 restart: an ack carrying offset -1, for records that were
    # sometimes never stored. Re-sending costs at most a duplicate; trusting it can lose a result.
    offset = getattr(metadata, "offset", None)
    if offset is None or offset < 0:
        return UnconfirmedWrite(f"{topic}: acknowledged with offset {offset}")
    return None


def _call(on_ack: OnAck, error: Exception | None) -> None:
    # An exception escaping a callback would be swallowed by kafka-python's I/O thread; log it.
    try:
        on_ack(error)
    except Exception:
        log.exception("on_ack callback failed")
