"""Model replicas: a Ray Serve deployment holding one CaptionModel each, batching with @serve.batch.

Semantics (see ray/serve/batching.py): concurrent calls on one replica are queued and handed to
`_caption_batch` as one list once they hold `max_batch_size` images (`batch_size_fn` counts
images, not calls: `caption` brings one, `caption_many` — the pipeline's micro-batches — many) or
`batch_wait_timeout_s` has passed since the first. `max_ongoing_requests` must be at least the
batch size or batches can never fill (we default it to twice the batch size, so the next batch
queues while one generates). Requests in one batch with different params are run as one
`generate` call per distinct params: the model core is batch-invariant, so grouping does not
change a caption.

The device comes from the GPUs Ray assigned to the actor (`ray.get_gpu_ids()`; Ray also sets
CUDA_VISIBLE_DEVICES for it), else the CPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from workers.config import ModelConfig, ReplicasConfig, S3Config
from workers.contract import describe
from workers.model.params import GenerationParams

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "CaptionReplica"


@dataclass(frozen=True)
class ReplicaAnswer:
    """What a replica returns per image: plain data, cheap to serialise."""

    captions: list[str]
    scores: list[float] | None
    batch_size: int
    inference_ms: float
    error: str | None = None  # why this image's group failed; raised to its caller alone


def _images_in(calls: list[list[Any]]) -> int:
    """@serve.batch's size of a batch: images, whatever calls brought them."""
    return sum(len(call) for call in calls)


class InferenceError(RuntimeError):
    """generate failed for this request's params group."""


@serve.deployment(name=DEPLOYMENT_NAME)
class CaptionReplica:
    def __init__(
        self,
        model: dict[str, Any],
        s3: dict[str, Any] | None,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        import ray

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.model_cfg = ModelConfig(**model)
        if self.model_cfg.torch_threads is None:
            # Ray sets OMP_NUM_THREADS from the actor's CPU reservation (1 when it reserves 0 or
            # 1), which would leave a CPU replica on one thread; use what it reserved, at least 1.
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            self.model_cfg = self.model_cfg.model_copy(update={"torch_threads": max(1, round(cpus))})
        device = self.model_cfg.device
        if device == "auto":
            device = "cuda" if self.gpu_ids and _cuda_available() else "cpu"
        self.device = device
        self.model: Any = None
        self.load_error: BaseException | None = None
        self._loaded = threading.Event()
        self._caption_batch.set_max_batch_size(max_batch_size)
        self._caption_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self._gauges: dict[str, Any] | None = None
        # Load off the constructor so the replica answers health and readiness checks while a
        # large checkpoint is still being read: /readyz says "not yet" instead of timing out.
        threading.Thread(target=self._load, args=(s3,), name="model-load", daemon=True).start()

    def _load(self, s3: dict[str, Any] | None) -> None:
        from workers.model import load_model

        try:
            self.model = load_model(self.model_cfg, S3Config(**s3) if s3 else None, device=self.device)
            log.info("replica ready: model=%s device=%s gpus=%s", self.model_cfg.source, self.device, self.gpu_ids)
        except BaseException as e:  # surfaced by check_health, which makes Serve replace us
            self.load_error = e
            log.exception("model load failed")
        finally:
            self._loaded.set()

    async def _wait_loaded(self) -> None:
        if not self._loaded.is_set():
            await asyncio.to_thread(self._loaded.wait)
        self.check_health()

    def check_health(self) -> None:
        """Serve's health check; also what a caller gets when the model failed to load."""
        if self.load_error is not None:
            raise RuntimeError(f"model failed to load: {self.load_error}")

    def ready(self) -> bool:
        return self.model is not None

    async def caption(self, pixels: np.ndarray, params: GenerationParams) -> ReplicaAnswer:
        """One image (the HTTP ingress); a failed generate raises InferenceError."""
        (answer,) = await self.caption_many([(pixels, params)])
        if answer.error is not None:
            raise InferenceError(answer.error)
        return answer

    async def caption_many(self, items: list[tuple[np.ndarray, GenerationParams]]) -> list[ReplicaAnswer]:
        """Several images in one call, answers in order; a failed generate is an answer's `error`.

        The streaming pipeline sends its images this way: one request through Serve's router
        per micro-batch instead of per image. Per-image requests starve under load — while a
        CPU replica generates, its event loop gets too little of the GIL to take requests in,
        and batches shrink to one image (measured with `captioner bench --mode pipeline`).
        """
        await self._wait_loaded()
        return await self._caption_batch(list(items))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def _caption_batch(
        self, calls: list[list[tuple[np.ndarray, GenerationParams]]]
    ) -> list[list[ReplicaAnswer]]:
        items = [item for call in calls for item in call]
        self.batch_sizes.append(len(items))
        # Generation is CPU/GPU-bound; run it off the event loop so health checks stay answered.
        answers = await asyncio.to_thread(self._run_groups, items)
        self._export_backend_metrics()
        out, start = [], 0
        for call in calls:
            out.append(answers[start : start + len(call)])
            start += len(call)
        return out

    def _run_groups(self, items: list[tuple[np.ndarray, GenerationParams]]) -> list[ReplicaAnswer]:
        import time

        groups: dict[GenerationParams, list[int]] = defaultdict(list)
        for i, (_, params) in enumerate(items):
            groups[params].append(i)
        answers: list[ReplicaAnswer | None] = [None] * len(items)
        for params, indices in groups.items():
            start = time.perf_counter()
            try:
                outputs = self.model.caption(np.stack([items[i][0] for i in indices]), params)
            except Exception as e:
                # @serve.batch fails every caller of a batch when the function raises; one bad
                # params group must not take down the requests batched beside it.
                log.warning("generate failed for %d image(s): %s: %s", len(indices), type(e).__name__, e)
                for i in indices:
                    answers[i] = ReplicaAnswer([], None, len(items), 0.0, error=f"{type(e).__name__}: {e}")
                continue
            elapsed_ms = (time.perf_counter() - start) * 1000
            for i, out in zip(indices, outputs, strict=True):
                answers[i] = ReplicaAnswer(out.captions, out.scores, len(items), elapsed_ms)
        return [a for a in answers if a is not None]

    async def info(self) -> dict[str, Any]:
        """Model identity, input spec and placement (waits for the model): the pipeline sizes images from it."""
        await self._wait_loaded()
        spec = self.model.info.spec
        return {
            "model": self.model.info.as_record(),
            "height": spec.height,
            "width": spec.width,
            "resample": int(spec.resample),
            "device": self.device,
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
        }

    def stats(self) -> dict[str, Any]:
        """Batch sizes this replica ran, and its backend's counters (TF: compiles, shape cache)."""
        backend_stats = getattr(getattr(self.model, "backend", None), "stats", None)
        return {"batch_sizes": list(self.batch_sizes), "backend": backend_stats() if backend_stats else {}}

    def _export_backend_metrics(self) -> None:
        """Backend counters as Ray metrics (scraped from each node's metrics agent, port 8080):
        replicas live in their own processes, out of reach of the driver's /metrics."""
        backend_stats = getattr(getattr(self.model, "backend", None), "stats", None)
        if backend_stats is None:
            return
        if self._gauges is None:
            from ray.util.metrics import Gauge

            self._gauges = {
                name: Gauge(f"captioner_backend_{name}", f"backend counter {name} of this replica")
                for name in backend_stats()
            }
        for name, value in backend_stats().items():
            if name in self._gauges:
                self._gauges[name].set(float(value))


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # a TF-only image
        return False


def replica_app(model: ModelConfig, s3: S3Config | None, replicas: ReplicasConfig) -> serve.Application:
    """The bound replica deployment, sized and placed from config."""
    actor_options: dict[str, Any] = {"num_gpus": replicas.num_gpus, "num_cpus": replicas.num_cpus}
    if model.backend == "tf":
        from workers.model.tf_backend import TF_ONLY_ENVIRONMENT

        # Before transformers is imported in the replica, or it imports torch too.
        actor_options["runtime_env"] = {"env_vars": dict(TF_ONLY_ENVIRONMENT)}
    options: dict[str, Any] = {"ray_actor_options": actor_options, "max_ongoing_requests": replicas.ongoing_requests}
    if replicas.autoscaling is not None:
        options["autoscaling_config"] = replicas.autoscaling.model_dump()
    else:
        options["num_replicas"] = replicas.num_replicas
    return CaptionReplica.options(**options).bind(
        model.model_dump(mode="json"),
        s3.model_dump(mode="json") if s3 else None,
        replicas.max_batch_size,
        replicas.batch_wait_timeout_s,
    )


class ReplicaCallFailed(RuntimeError):
    """The replicas did not answer a micro-batch after every attempt (e.g. replicas killed)."""


class ReplicaClient:
    """The caller's side of the replicas: images become `caption_many` micro-batches.

    While a call is in flight, images submitted within `wait_s` of the first one (up to
    `max_batch_size`) share the next call; when none is in flight the replicas are idle and an
    image goes at once (waiting would only add latency). Calls are not awaited one by one, so
    several can be in flight and the replicas' @serve.batch merges them. A call that fails as a whole (a replica died under it) is retried
    up to `attempts` times; a failed generate comes back in-band as that image's error and is
    not retried (the same params would fail again). Use from one asyncio loop.
    """

    def __init__(
        self,
        handle: Any,
        *,
        max_batch_size: int,
        wait_s: float,
        attempts: int,
        on_retry: Any = None,
    ):
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.attempts = attempts
        self.on_retry = on_retry
        self._queue: asyncio.Queue[tuple[np.ndarray, GenerationParams, asyncio.Future[ReplicaAnswer]]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0

    async def close(self) -> None:
        """Cancel the batch former and outstanding calls (their callers get CancelledError)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def caption(self, pixels: np.ndarray, params: GenerationParams) -> ReplicaAnswer:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._spawn(self._form_batches())
        future: asyncio.Future[ReplicaAnswer] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((pixels, params, future))
        answer = await future
        if answer.error is not None:
            raise InferenceError(answer.error)
        return answer

    async def _form_batches(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + (self.wait_s if self._in_flight else 0.0)
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(remaining, 0)))
                except asyncio.TimeoutError:
                    break
            self._spawn(self._call(batch))

    async def _call(self, batch: list[tuple[np.ndarray, GenerationParams, asyncio.Future[ReplicaAnswer]]]) -> None:
        self._in_flight += 1
        try:
            await self._call_with_retries(batch)
        finally:
            self._in_flight -= 1

    async def _call_with_retries(
        self, batch: list[tuple[np.ndarray, GenerationParams, asyncio.Future[ReplicaAnswer]]]
    ) -> None:
        items = [(pixels, params) for pixels, params, _ in batch]
        error: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                answers: list[ReplicaAnswer] = await self.handle.caption_many.remote(items)
            except Exception as e:  # the replica died or Serve could not reach one
                error = e
                if attempt < self.attempts and self.on_retry is not None:
                    self.on_retry(attempt, e)
                continue
            for (_, _, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
            return
        failure = ReplicaCallFailed(describe(error) if error else "no attempt made")
        for _, _, future in batch:
            if not future.done():
                future.set_exception(failure)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)  # keep a reference: the loop holds tasks only weakly
        task.add_done_callback(self._tasks.discard)
