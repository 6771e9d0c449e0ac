"""The one place that knows the whole way: source → fetch → decode → replicas → sink → commit.

Threads, and why:
- one poll loop per consumer (`KafkaSource.run`): polls, issues a `Delivery` ticket per record,
  commits watermarks;
- a work pool (`worker.fetch_concurrency` threads): the stage chain (parse, fetch, cache lookup,
  decode/resize, `workers/stages.py`), then building and sending the outcome, and re-sending one
  the broker refused;
- one asyncio loop: awaits the replicas through `ReplicaClient`, so thousands of images can wait
  on inference without a thread each; it only awaits, and hands each answer back to the pool;
- the producer's I/O thread: settles a ticket once the broker acknowledged its outcome, which is
  what frees the window slot and moves the partition's watermark.

Every record ends as exactly one outcome (result or dead letter) per delivery; a failure at any
stage becomes a dead letter with that stage's code. Only the ticket ends a record (settled or
abandoned, once). An outcome the broker refuses as a record (too large, not encodable) is
replaced by a compact dead letter; one it does not take for transport reasons is re-sent with
backoff until `worker.produce_deadline_s`, and then the worker stops (exit code 3) without
committing it, so the next start delivers it again: nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from workers import metrics
from workers.cache import CachedCaption, CaptionCache
from workers.config import Settings
from workers.contract import (
    DeadLetter,
    ErrorCode,
    Outcome,
    Rejected,
    Request,
    Result,
    compact_dead_letter,
    dead_letter,
    describe,
    result_record,
)
from workers.delivery import Delivery, InFlightWindow
from workers.fetch import Fetcher
from workers.logs import log_fields
from workers.replica_api import InferenceError, ReplicaAnswer, ReplicaInfo
from workers.replica_client import ReplicaCallFailed, ReplicaClient
from workers.retry import backoff_s
from workers.s3 import make_s3_client
from workers.sink import Sink
from workers.source import KafkaSource
from workers.stages import Stages, elapsed_ms

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """One record's way through the stages; its ticket is the only thing that ends it."""

    delivery: Delivery
    timings_ms: dict[str, float] = field(default_factory=dict)
    request: Request | None = None
    attempts: int = 1

    @property
    def log_extra(self) -> dict[str, Any]:
        """What a JSON log line about this record carries: request id and Kafka coordinates."""
        d = self.delivery
        request_id = self.request.id if self.request else None
        return log_fields(request_id=request_id, topic=d.topic, partition=d.partition, offset=d.offset)


class Pipeline:
    """A worker's consumers and stages around a handle to the replica deployment."""

    def __init__(self, settings: Settings, replicas: Any, *, name: str = "worker"):
        """`replicas` is a Serve DeploymentHandle to CaptionReplica."""
        self.settings = settings
        self.name = name
        info: ReplicaInfo = replicas.info.remote().result()
        self.model_record: dict[str, Any] = info.model
        worker = settings.worker
        self.window = InFlightWindow(worker.max_in_flight, worker.low_watermark)
        self.cache = CaptionCache(worker.cache_size)
        fetcher = Fetcher(make_s3_client(settings.s3), settings.s3, settings.limits)
        self.stages = Stages(settings, fetcher, info.input_size)
        self.sink = Sink(settings.kafka, settings.limits)
        self.sources = [
            KafkaSource(settings.kafka, settings.limits, worker, self.window, self._on_delivery, name=f"{name}-{i}")
            for i in range(settings.kafka.consumers)
        ]
        self.failed = threading.Event()
        self.exit_code = 0  # set when failed: 1 a poll loop died, 3 the broker would not take outcomes
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(worker.fetch_concurrency, thread_name_prefix=f"{name}-work")
        self._loop = asyncio.new_event_loop()
        self.replica_client = ReplicaClient(
            replicas,
            max_batch_size=settings.replicas.max_batch_size,
            wait_s=settings.replicas.batch_wait_timeout_s,
            retry_budget_s=worker.inference_retry_budget_s,
            call_timeout_s=settings.replicas.call_timeout_s,
            # No more calls than the window holds full ones: under load calls fill up instead.
            max_calls=-(-worker.max_in_flight // settings.replicas.max_batch_size),
            on_retry=self._on_inference_retry,
            on_timeout=metrics.REPLICA_CALL_TIMEOUTS.inc,
        )
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-infer", daemon=True)
        self._source_threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Pipeline:
        self._loop_thread.start()
        for source in self.sources:
            t = threading.Thread(target=self._run_source, args=(source,), name=source.name, daemon=True)
            t.start()
            self._source_threads.append(t)
        return self

    def _run_source(self, source: KafkaSource) -> None:
        """A poll loop that dies stops the worker as failed (exit 1, so a supervisor restarts it):
        a live process whose consumer is gone would hold no partitions and do nothing, silently."""
        try:
            source.run(self._stop)
        except Exception:
            log.exception("%s: poll loop died; stopping the worker", source.name)
            self.exit_code = self.exit_code or 1
            self.failed.set()
            self._stop.set()

    def wait_started(self, timeout: float = 30) -> None:
        for source in self.sources:
            if not source.started.wait(timeout):
                raise TimeoutError(f"{source.name} did not start within {timeout}s")

    def request_stop(self) -> None:
        """Ask the sources to stop; safe from a signal handler. `stop()` does the draining."""
        self._stop.set()

    def stop(self) -> None:
        """Stop polling, drain open records (bounded), commit, close. Idempotent."""
        self._stop.set()
        if not self._loop_thread.is_alive() and not self._source_threads:
            return
        for t in self._source_threads:
            t.join()
        self.sink.flush(timeout=self.settings.worker.drain_timeout_s)
        self._pool.shutdown(wait=True)
        asyncio.run_coroutine_threadsafe(self.replica_client.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5)
        self.sink.close()
        self._source_threads.clear()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() was requested or a fatal error happened."""
        return self._stop.wait(timeout)

    # -- stages ----------------------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        """Called on the poll thread: must return at once."""
        self._submit(self._prepare, _Job(delivery))

    def _submit(self, fn: Any, job: _Job, *args: Any) -> None:
        """Run on the work pool; once the pool is shut down (a drain that timed out), the record
        is abandoned: its offset is never committed, so it is delivered again."""
        try:
            self._pool.submit(fn, job, *args)
        except RuntimeError:
            log.warning("work pool closed; %s will be redelivered", job.delivery.source, extra=job.log_extra)
            job.delivery.abandon()

    def _prepare(self, job: _Job) -> None:
        """Parse, fetch, cache lookup, decode: the CPU side, on the work pool."""
        try:
            self._prepare_stages(job)
        except Exception as e:  # a bug in our own code must still end as an outcome
            log.exception("unexpected error at %s", job.delivery.source, extra=job.log_extra)
            code = ErrorCode.INVALID_MESSAGE if job.request is None else ErrorCode.FETCH_FAILED
            self._finish(job, self._dead_letter(job, Rejected(code, describe(e))))

    def _prepare_stages(self, job: _Job) -> None:
        delivery = job.delivery
        try:
            job.request = self.stages.parse(
                delivery.value, key=delivery.key, headers=delivery.headers, source=delivery.source
            )
            if not delivery.owned:  # revoked while queued: skip the fetch, the new owner redoes it
                delivery.abandon()
                return
            fetched = self.stages.fetch(job.request.image, job.timings_ms)
            job.attempts = fetched.attempts
            key = self.cache.key(fetched.data, job.request.params)
            hit = self.cache.get(key)
            if hit is not None:
                metrics.CACHE_HITS.inc()
                self._finish(job, self._result(job, hit, cached=True))
                return
            metrics.CACHE_MISSES.inc()
            prepared = self.stages.decode(fetched.data, job.timings_ms)
        except Rejected as e:
            job.attempts = max(job.attempts, e.attempts)
            self._finish(job, self._dead_letter(job, e))
            return
        future = asyncio.run_coroutine_threadsafe(self._infer(job, prepared.pixels), self._loop)
        # The loop only awaits; building and publishing the outcome goes back to the pool.
        future.add_done_callback(
            lambda f: self._submit(self._after_inference, job, key, (prepared.width, prepared.height), f)
        )

    async def _infer(self, job: _Job, pixels: Any) -> ReplicaAnswer:
        assert job.request is not None
        start = time.perf_counter()
        try:
            answer = await self.replica_client.caption(pixels, job.request.params)
        except (InferenceError, ReplicaCallFailed) as e:
            raise Rejected(ErrorCode.INFERENCE_FAILED, str(e)) from None
        job.timings_ms["inference"] = answer.inference_ms
        job.timings_ms["queue"] = max(0.0, elapsed_ms(start) - answer.inference_ms)
        return answer

    def _after_inference(self, job: _Job, key: Any, size: tuple[int, int], future: Any) -> None:
        try:
            answer: ReplicaAnswer = future.result()
        except Rejected as e:
            self._finish(job, self._dead_letter(job, e))
            return
        except Exception as e:  # a bug in our own code must still end as an outcome
            self._finish(job, self._dead_letter(job, Rejected(ErrorCode.INFERENCE_FAILED, describe(e))))
            return
        metrics.BATCH_SIZE.observe(answer.batch_size)
        metrics.STAGE_LATENCY.labels("inference").observe(answer.inference_ms / 1000)
        value = CachedCaption(answer.captions, answer.scores, *size)
        self.cache.put(key, value)
        self._finish(job, self._result(job, value, cached=False))

    @staticmethod
    def _on_inference_retry(attempt: int, error: BaseException) -> None:
        metrics.INFERENCE_RETRIES.inc()
        log.warning("replica call attempt %d failed (%s); retrying", attempt, type(error).__name__)

    # -- outcomes -----------------------------------------------------------------------------

    def _result(self, job: _Job, caption: CachedCaption, *, cached: bool) -> Result:
        assert job.request is not None
        job.timings_ms["total"] = elapsed_ms(job.delivery.taken_at)
        metrics.STAGE_LATENCY.labels("total").observe(job.timings_ms["total"] / 1000)
        record = result_record(
            job.request,
            captions=caption.captions,
            model=self.model_record,
            cached=cached,
            width=caption.width,
            height=caption.height,
            timings_ms=job.timings_ms,
            scores=caption.scores,
        )
        return Result.for_request(job.request, record)

    def _dead_letter(self, job: _Job, error: Rejected) -> DeadLetter:
        d = job.delivery
        log.info("dead letter %s at %s: %s", error.code, d.source, error.message, extra=job.log_extra)
        return dead_letter(
            error,
            value=d.value,
            key=d.key,
            headers=d.headers,
            source=d.source,
            request=job.request,
            attempts=job.attempts,
        )

    def _finish(self, job: _Job, outcome: Outcome) -> None:
        if not job.delivery.owned:  # a rebalance took the partition: its new owner redoes it
            job.delivery.abandon()
            return
        try:
            outcome.value  # noqa: B018 - encode here, on a work thread, where a failure is this record's
        except (ValueError, UnicodeError, TypeError) as e:
            outcome = self._compact(job, outcome, f"its outcome is not standard JSON: {describe(e)}", "unencodable")
        self._send(job, outcome, _Sending(time.monotonic()))

    def _compact(self, job: _Job, outcome: Outcome, why: str, reason: str) -> DeadLetter:
        """The record's outcome cannot be written as it is: a compact dead letter instead."""
        metrics.COMPACT_DEAD_LETTERS.labels(reason).inc()
        code = outcome.code if isinstance(outcome, DeadLetter) else ErrorCode.INVALID_MESSAGE
        d = job.delivery
        log.warning("compact dead letter for %s: %s", d.source, why, extra=job.log_extra)
        compact = compact_dead_letter(code, why, value=d.value, key=d.key, source=d.source)
        if isinstance(outcome, DeadLetter) and outcome.key == compact.key and not outcome.headers:
            # Already as compact as it gets but for its echo: drop the echo and the key too.
            compact = compact_dead_letter(code, why, value=None, key=None, source=d.source)
        return compact

    def _send(self, job: _Job, outcome: Outcome, sending: _Sending) -> None:
        self.sink.send(outcome, lambda error: self._on_ack(job, outcome, sending, error))

    def _on_ack(self, job: _Job, outcome: Outcome, sending: _Sending, error: Exception | None) -> None:
        """On the producer's I/O thread: bookkeeping only; a re-send goes back to a work thread."""
        if error is None:
            job.delivery.settle()
            if isinstance(outcome, Result):
                metrics.RESULTS.labels(self.settings.kafka.output_topic).inc()
            else:
                metrics.DEAD_LETTERS.labels(str(outcome.code)).inc()
            return
        if is_record_error(error) and sending.fallbacks < 2:
            # This record can never be written as it is (too large, invalid): the error is the
            # record's, not the system's, so it becomes a smaller outcome instead of a stop.
            metrics.PRODUCE_ERRORS.labels("record").inc()
            compact = self._compact(job, outcome, f"its outcome was refused: {describe(error)}", "refused")
            self._submit(self._send, job, compact, sending.fallback())
            return
        metrics.PRODUCE_ERRORS.labels("transport").inc()
        waited = time.monotonic() - sending.first_try
        if waited < self.settings.worker.produce_deadline_s:
            delay = sending.next_delay()
            log.warning(
                "outcome of %s not acknowledged (%s); re-sending in %.1f s",
                job.delivery.source,
                describe(error),
                delay,
                extra=job.log_extra,
            )
            self._loop.call_soon_threadsafe(
                self._loop.call_later, delay, self._submit, self._send, job, outcome, sending
            )
            return
        log.error(
            "broker did not acknowledge the outcome of %s for %.0f s (worker.produce_deadline_s): %s; stopping, "
            "exit code %d: nothing past it is committed, so the next start delivers it again",
            job.delivery.source,
            waited,
            describe(error),
            EXIT_BROKER_UNAVAILABLE,
            extra=job.log_extra,
        )
        self.exit_code = EXIT_BROKER_UNAVAILABLE
        self.failed.set()
        self._stop.set()
        job.delivery.abandon()


@dataclass
class _Sending:
    """One outcome's sends: when the first was tried, how many re-sends and fallbacks so far."""

    first_try: float
    resends: int = 0
    fallbacks: int = 0

    def next_delay(self) -> float:
        self.resends += 1
        return backoff_s(self.resends)

    def fallback(self) -> _Sending:
        return _Sending(self.first_try, self.resends, self.fallbacks + 1)


def is_record_error(error: BaseException) -> bool:
    """Whether a produce error is the record's own (it will fail however often it is sent)."""
    if isinstance(error, (TypeError, ValueError, UnicodeError)):
        return True
    return type(error).__name__ in _RECORD_ERRORS


# kafka-python's errors for a record the broker or the client will never take as it is.
_RECORD_ERRORS = frozenset(
    {
        "MessageSizeTooLargeError",
        "RecordListTooLargeError",
        "InvalidRecordError",
        "CorruptRecordError",
        "UnsupportedForMessageFormatError",
    }
)

# `captioner run`'s exit code when the broker would not take outcomes for produce_deadline_s.
EXIT_BROKER_UNAVAILABLE = 3
