"""Model replicas: a Ray Serve deployment holding one CaptionModel each.

With the decoding engine (`model.engine: true`, the default for torch), every image of every
call goes straight into the engine's queue as it arrives and its answer leaves the moment it
finishes (continuous batching, `workers/model/engine/`); the engine keeps many images in flight
and refills a finished image's slot between decode steps. What the engine does not decode itself
(sampling; the TF backend; `engine: false`) takes the static path below.

Static batches (see ray/serve/batching.py): concurrent calls on one replica are queued and handed to
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
import time
from collections import defaultdict
from typing import Any

import numpy as np
from ray import serve

from workers.config import ModelConfig, ReplicasConfig, S3Config
from workers.contract import describe
from workers.params import GenerationParams
from workers.replica_api import InferenceError, ReplicaAnswer, ReplicaInfo

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "CaptionReplica"


def _images_in(calls: list[list[Any]]) -> int:
    """@serve.batch's size of a batch: images, whatever calls brought them."""
    return sum(len(call) for call in calls)


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
        start = time.perf_counter()
        # The engine takes each image as it arrives and answers it as it finishes (continuous
        # batching); what it does not decode itself (sampling) takes @serve.batch's static batches.
        futures = [self.model.submit(pixels, params) for pixels, params in items]
        static = [item for item, future in zip(items, futures, strict=True) if future is None]
        static_answers = iter(await self._caption_batch(static) if static else [])
        if len(static) < len(items):
            self.batch_sizes.append(len(items) - len(static))
        answers = []
        for future in futures:
            if future is None:
                answers.append(next(static_answers))
                continue
            try:
                out = await asyncio.wrap_future(future)
            except Exception as e:  # the engine failed this image: its error, in-band
                answers.append(ReplicaAnswer([], None, len(items), 0.0, error=describe(e)))
                continue
            answers.append(ReplicaAnswer(out.captions, out.scores, len(items), (time.perf_counter() - start) * 1000))
        return answers

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def _caption_batch(self, calls: list[list[tuple[np.ndarray, GenerationParams]]]) -> list[list[ReplicaAnswer]]:
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
        groups: dict[GenerationParams, list[int]] = defaultdict(list)
        for i, (_, params) in enumerate(items):
            groups[params].append(i)
        answers: list[ReplicaAnswer | None] = [None] * len(items)
        for params, indices in groups.items():
            pixels = [items[i][0] for i in indices]
            for i, answer in zip(indices, run_splitting(self.model.caption, pixels, params, len(items)), strict=True):
                answers[i] = answer
        return [a for a in answers if a is not None]

    async def info(self) -> ReplicaInfo:
        """Model identity, input spec and placement (waits for the model): callers size images from it."""
        await self._wait_loaded()
        spec = self.model.info.spec
        return ReplicaInfo(
            model=self.model.info.as_record(),
            height=spec.height,
            width=spec.width,
            resample=int(spec.resample),
            device=self.device,
            gpu_ids=self.gpu_ids,
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            replica_id=serve.get_replica_context().replica_id.unique_id,
            pid=os.getpid(),
        )

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


def run_splitting(
    caption: Any, pixels: list[np.ndarray], params: GenerationParams, batch_size: int
) -> list[ReplicaAnswer]:
    """One params group's answers, in order; a failure is each image's in-band error.

    @serve.batch fails every caller of a batch when the function raises, so one bad params group
    must not take down the requests batched beside it. An out-of-memory error says the batch
    was too big, not that its images are bad: the batch is split in halves and each half tried
    again, down to single images; only an image that fails alone gets the error.
    """
    start = time.perf_counter()
    try:
        outputs = caption(np.stack(pixels), params)
    except Exception as e:
        if is_out_of_memory(e) and len(pixels) > 1:
            half = len(pixels) // 2
            log.warning("out of memory on %d image(s); retrying as %d + %d", len(pixels), half, len(pixels) - half)
            _release_device_memory()
            return run_splitting(caption, pixels[:half], params, batch_size) + run_splitting(
                caption, pixels[half:], params, batch_size
            )
        log.warning("generate failed for %d image(s): %s", len(pixels), describe(e))
        return [ReplicaAnswer([], None, batch_size, 0.0, error=describe(e)) for _ in pixels]
    elapsed_ms = (time.perf_counter() - start) * 1000
    return [ReplicaAnswer(out.captions, out.scores, batch_size, elapsed_ms) for out in outputs]


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or any framework's "out of memory" (CPU allocators, TF's OOM)."""
    names = {type(c).__name__ for c in type(error).__mro__}
    return bool(names & {"OutOfMemoryError", "ResourceExhaustedError"}) or "out of memory" in str(error).lower()


def _release_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # a TF-only image
        pass


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
    if replicas.max_queued_requests is not None:
        # Overload comes back to the caller as BackPressureError (HTTP 503): the ingest pauses.
        options["max_queued_requests"] = replicas.max_queued_requests
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
