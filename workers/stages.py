"""The stage chain every caller shares: parse → fetch → decode/resize.

The streaming pipeline, the HTTP ingress and `captioner caption` turn their input into
model-ready pixels through one `Stages` object, so a rule (the allow-list, a size or pixel limit,
which error code a failure gets) is decided in one place:

    request = stages.parse(value, key=…, headers=…, source=…)    # Rejected(invalid_message)
    fetched = stages.fetch(request.image, timings)                # Rejected(forbidden_reference, object_*,
                                                                  #   fetch_failed, access_denied)
    prepared = stages.decode(fetched.data, timings)               # Rejected(invalid_image, image_too_large)

Decoding holds the image's estimated peak memory from a process-wide `MemoryBudget`
(`worker.memory_budget_bytes`) between the header check and the resize.

Each step raises `Rejected` with its stage's code (an exception the step did not classify gets
that stage's code too), records its wall time in `timings` (milliseconds, the results'
`timings_ms`) and in the `captioner_stage_seconds` histogram. Blocking and thread-safe: async
callers run steps with `asyncio.to_thread`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from workers import images, metrics
from workers.budget import MemoryBudget, shared_budget
from workers.config import Settings
from workers.contract import ErrorCode, Headers, Rejected, Request, Source, parse_request, run_stage
from workers.fetch import Fetched, Fetcher
from workers.images import InputSize

T = TypeVar("T")


class Stages:
    """parse → fetch → decode/resize under one settings tree.

    `input_size` may be unknown at first (the HTTP ingress learns it from a replica once a model
    has loaded): parse and fetch work without it; `sized()` gives the chain that can decode.
    """

    def __init__(
        self,
        settings: Settings,
        fetcher: Fetcher | None,
        input_size: InputSize | None = None,
        budget: MemoryBudget | None = None,
    ):
        self.settings = settings
        self.fetcher = fetcher
        self.input_size = input_size
        # Default: the process's budget of the configured size, shared by every Stages in it.
        self.budget = budget or shared_budget(settings.worker.memory_budget_bytes)

    def sized(self, input_size: InputSize) -> Stages:
        return Stages(self.settings, self.fetcher, input_size, self.budget)

    def parse(
        self,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        source: Source | None = None,
    ) -> Request:
        """A message value (JSON or a bare reference) → Request, or Rejected(invalid_message)."""
        return parse_request(
            value,
            defaults=self.settings.generation,
            limits=self.settings.limits,
            key=key,
            headers=list(headers or []),
            source=source,
        )

    def fetch(self, uri: str, timings: dict[str, float] | None = None) -> Fetched:
        """An s3:// reference → its bytes (allow-list, size limit before download, retries)."""
        if self.fetcher is None:
            raise Rejected(ErrorCode.FORBIDDEN_REFERENCE, "s3:// references are not enabled here")
        with timed("fetch", timings):
            return run_stage(ErrorCode.FETCH_FAILED, self.fetcher.fetch, uri)

    def decode(
        self, data: bytes, timings: dict[str, float] | None = None, *, cancel: threading.Event | None = None
    ) -> images.Prepared:
        """Image bytes → uint8 pixels at the model's size, with the original width and height.

        The header is read first; the decode's estimated peak memory is then held from the
        memory budget (blocking this thread until it fits) until the image is resized. Setting
        `cancel` ends a wait with BudgetCancelled (not a Rejected: the request is not at fault)."""
        if self.input_size is None:
            raise RuntimeError("Stages.decode needs the model's input size: use sized()")
        size = self.input_size
        max_pixels = self.settings.limits.max_image_pixels
        with timed("decode", timings):
            image = run_stage(ErrorCode.INVALID_IMAGE, images.open_header, data, max_pixels=max_pixels)
            plan = images.plan(image, len(data), (size.height, size.width))
            with self.budget.reserve(plan.cost_bytes, cancel=cancel):
                return run_stage(ErrorCode.INVALID_IMAGE, images.finish, image, plan, size, max_pixels=max_pixels)

    def read(self, reader: Callable[[], T], timings: dict[str, float] | None = None) -> T:
        """A caller's own byte source (a local file) as the fetch stage: timed, codes kept."""
        with timed("fetch", timings):
            return run_stage(ErrorCode.FETCH_FAILED, reader)


@contextmanager
def timed(stage: str, timings: dict[str, float] | None) -> Iterator[None]:
    """Record a stage's wall time, whether it succeeded or raised."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        if timings is not None:
            timings[stage] = elapsed * 1000
        metrics.STAGE_LATENCY.labels(stage).observe(elapsed)


def elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000
