"""The one place that knows the whole way: source → fetch → decode → replicas → sink → commit.

Threads, and why:
- one poll loop per consumer (`KafkaSource.run`): polls, hands records over, commits;
- a work pool (`worker.fetch_concurrency` threads): parse, fetch, cache lookup, decode/resize;
- one asyncio loop: awaits the replicas through the Serve handle, so thousands of images can
  wait on inference without a thread each;
- the producer's I/O thread: calls back when the broker acknowledged an outcome, which is what
  frees a window slot and moves the partition's watermark.

Every record ends as exactly one outcome (result or dead letter) per delivery; a failure at any
stage becomes a dead letter with that stage's code. A record whose outcome the broker will not
acknowledge (after `worker.produce_attempts`) stops the worker without committing it, so the
next start delivers it again: nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from workers import images, metrics
from workers.cache import CachedCaption, CaptionCache
from workers.config import Settings
from workers.contract import (
    ErrorCode,
    Rejected,
    Request,
    Source,
    dead_letter_record,
    describe,
    parse_request,
    result_record,
    run_stage,
)
from workers.fetch import Fetcher, make_s3_client
from workers.replicas import InferenceError, ReplicaAnswer, ReplicaCallFailed, ReplicaClient
from workers.sink import Sink
from workers.source import InFlightWindow, KafkaSource

log = logging.getLogger(__name__)


@dataclass
class _Job:
    source: KafkaSource
    record: ConsumerRecord
    started: float = field(default_factory=time.perf_counter)
    timings_ms: dict[str, float] = field(default_factory=dict)
    request: Request | None = None
    attempts: int = 1

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)

    @property
    def coordinates(self) -> Source:
        return Source(self.record.topic, self.record.partition, self.record.offset)


class Pipeline:
    """A worker's consumers and stages around a handle to the replica deployment."""

    def __init__(self, settings: Settings, replicas: Any, *, name: str = "worker"):
        """`replicas` is a Serve DeploymentHandle to CaptionReplica."""
        self.settings = settings
        self.name = name
        info = replicas.info.remote().result()
        self.model_record: dict[str, Any] = info["model"]
        self._size = (info["height"], info["width"])
        self._resample = info["resample"]
        worker = settings.worker
        self.window = InFlightWindow(worker.max_in_flight, worker.low_watermark)
        self.cache = CaptionCache(worker.cache_size)
        self.fetcher = Fetcher(make_s3_client(settings.s3), settings.s3, settings.limits)
        self.sink = Sink(settings.kafka, settings.limits)
        self.sources = [
            KafkaSource(settings.kafka, settings.limits, worker, self.window, self._on_record, name=f"{name}-{i}")
            for i in range(settings.kafka.consumers)
        ]
        self.failed = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(worker.fetch_concurrency, thread_name_prefix=f"{name}-work")
        self._loop = asyncio.new_event_loop()
        self.replica_client = ReplicaClient(
            replicas,
            max_batch_size=settings.replicas.max_batch_size,
            wait_s=settings.replicas.batch_wait_timeout_s,
            attempts=worker.inference_attempts,
            on_retry=self._on_inference_retry,
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

    # -- stages -------------------------------------------------------------------------------

    def _on_record(self, source: KafkaSource, record: ConsumerRecord) -> None:
        """Called on the poll thread: must return at once."""
        self._pool.submit(self._prepare, _Job(source, record))

    def _prepare(self, job: _Job) -> None:
        """Parse, fetch, cache lookup, decode: the CPU side, on the work pool."""
        try:
            self._prepare_stages(job)
        except Exception as e:  # a bug in our own code must still end as an outcome
            log.exception("unexpected error at %s", job.coordinates)
            code = ErrorCode.INVALID_MESSAGE if job.request is None else ErrorCode.FETCH_FAILED
            self._publish_dead_letter(job, Rejected(code, describe(e)))

    def _prepare_stages(self, job: _Job) -> None:
        settings = self.settings
        record = job.record
        try:
            job.request = parse_request(
                record.value,
                defaults=settings.generation,
                limits=settings.limits,
                key=record.key,
                headers=list(record.headers or []),
                source=job.coordinates,
            )
            if not self._still_ours(job):
                return
            with _timed(job, "fetch"):
                fetched = run_stage(ErrorCode.FETCH_FAILED, self.fetcher.fetch, job.request.image)
            job.attempts = fetched.attempts
            key = self.cache.key(fetched.data, job.request.params)
            hit = self.cache.get(key)
            if hit is not None:
                metrics.CACHE_HITS.inc()
                self._publish_result(job, hit, cached=True)
                return
            metrics.CACHE_MISSES.inc()
            with _timed(job, "decode"):
                prepared = run_stage(
                    ErrorCode.INVALID_IMAGE,
                    images.prepare,
                    fetched.data,
                    size=self._size,
                    resample=self._resample,
                    max_pixels=settings.limits.max_image_pixels,
                )
        except Rejected as e:
            job.attempts = max(job.attempts, e.attempts)
            self._publish_dead_letter(job, e)
            return
        future = asyncio.run_coroutine_threadsafe(self._infer(job, prepared.pixels), self._loop)
        future.add_done_callback(lambda f: self._after_inference(job, key, prepared, f))

    async def _infer(self, job: _Job, pixels: Any) -> ReplicaAnswer:
        assert job.request is not None
        start = time.perf_counter()
        try:
            answer = await self.replica_client.caption(pixels, job.request.params)
        except (InferenceError, ReplicaCallFailed) as e:
            raise Rejected(ErrorCode.INFERENCE_FAILED, str(e)) from None
        job.timings_ms["inference"] = answer.inference_ms
        job.timings_ms["queue"] = max(0.0, (time.perf_counter() - start) * 1000 - answer.inference_ms)
        return answer

    def _after_inference(self, job: _Job, key: Any, prepared: images.Prepared, future: Any) -> None:
        try:
            answer: ReplicaAnswer = future.result()
        except Rejected as e:
            self._publish_dead_letter(job, e)
            return
        except Exception as e:  # a bug in our own code must still end as an outcome
            self._publish_dead_letter(job, Rejected(ErrorCode.INFERENCE_FAILED, f"{type(e).__name__}: {e}"))
            return
        metrics.BATCH_SIZE.observe(answer.batch_size)
        metrics.STAGE_LATENCY.labels("inference").observe(answer.inference_ms / 1000)
        value = CachedCaption(answer.captions, answer.scores, prepared.width, prepared.height)
        self.cache.put(key, value)
        self._publish_result(job, value, cached=False)

    @staticmethod
    def _on_inference_retry(attempt: int, error: BaseException) -> None:
        metrics.INFERENCE_RETRIES.inc()
        log.warning("replica call attempt %d failed (%s); retrying", attempt, type(error).__name__)

    # -- outcomes -----------------------------------------------------------------------------

    def _publish_result(self, job: _Job, caption: CachedCaption, *, cached: bool) -> None:
        assert job.request is not None
        if not self._still_ours(job):
            return
        job.timings_ms["total"] = (time.perf_counter() - job.started) * 1000
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
        self._send(job, lambda on_ack: self.sink.send_result(job.request, record, on_ack), "result")

    def _publish_dead_letter(self, job: _Job, error: Rejected) -> None:
        if not self._still_ours(job):
            return
        record = dead_letter_record(
            code=error.code,
            message=error.message,
            value=job.record.value,
            source=job.coordinates,
            attempts=job.attempts,
            request_id=job.request.id if job.request else None,
        )
        key = job.record.key or (job.request.id.encode() if job.request else None)
        headers = list(job.record.headers or [])
        log.info("dead letter %s at %s: %s", error.code, job.coordinates, error.message)
        self._send(
            job,
            lambda on_ack: self.sink.send_dead_letter(record, key=key, headers=headers, on_ack=on_ack),
            f"dead_letter:{error.code}",
        )

    def _send(self, job: _Job, send: Any, kind: str, attempt: int = 1) -> None:
        def on_ack(error: Exception | None) -> None:
            if error is None:
                self._acked(job, kind)
            elif attempt < self.settings.worker.produce_attempts:
                metrics.PRODUCE_ERRORS.inc()
                self._send(job, send, kind, attempt + 1)
            else:
                metrics.PRODUCE_ERRORS.inc()
                log.error("broker did not acknowledge %s at %s: %s; stopping", kind, job.coordinates, error)
                self.failed.set()
                self._stop.set()
                self.window.release()

        send(on_ack)

    def _acked(self, job: _Job, kind: str) -> None:
        job.source.tracker.done(job.tp, job.record.offset)
        self.window.release()
        if kind == "result":
            metrics.RESULTS.labels(self.settings.kafka.output_topic).inc()
        else:
            metrics.DEAD_LETTERS.labels(kind.split(":", 1)[1]).inc()

    def _still_ours(self, job: _Job) -> bool:
        """After a rebalance took the partition, skip the rest: its new owner redoes it."""
        if job.source.tracker.owns(job.tp, job.record.offset):
            return True
        self.window.release()
        return False


class _timed:
    def __init__(self, job: _Job, stage: str):
        self.job, self.stage = job, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        self.job.timings_ms[self.stage] = elapsed * 1000
        metrics.STAGE_LATENCY.labels(self.stage).observe(elapsed)
