"""Encoding ahead of the decode loop, on its own thread and its own share of the CPU's cores.

On a CPU a decode step over a few images uses its cores badly (bf16, 8 rows: 59 ms on two
threads, 74 ms on one), while the ViT encoder scales with cores; run in line, every newcomer's
encoder pass stops all the images in flight for its whole length. This stage takes submitted
images, runs the encoder and the cross-attention K/V projections on its share of the intra-op
threads while the decode loop goes on with the rest, and hands the prepared images to the
scheduler, which then only copies their K/V into free slots. Measured on 2 cores (bf16, full-size
model): 20 decode steps and 6 encoder passes took 1.6 s side by side and 2.0 s one after the
other. When one side is idle, the other takes every thread.

Only where tokens need not match `generate` bit for bit: MKL's and SDPA's results depend on the
thread count, so the fp32 reference keeps the whole pool for its decode step and encodes in line
(`CaptionEngine(overlap_encoder=None)` decides).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.model.engine.decoder import FastDecoder
from workers.model.engine.scheduler import Request, Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadShares:
    """Intra-op threads for the encoder stage and the decode loop while both are busy."""

    total: int

    @property
    def encoder(self) -> int:
        return max(1, self.total // 2)

    @property
    def decoder(self) -> int:
        return max(1, self.total - self.encoder)


def use_threads(count: int) -> None:
    """Set this thread's intra-op threads (OpenMP and MKL keep the count per calling thread)."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


class EncoderStage:
    """A thread that prepares submitted images (encoder + cross K/V) for `scheduler`."""

    def __init__(
        self,
        decoder: FastDecoder,
        scheduler: Scheduler,
        shares: ThreadShares,
        on_ready: Callable[[], None],
        max_batch: int = 2,
    ):
        self.decoder, self.scheduler, self.shares = decoder, scheduler, shares
        self.on_ready = on_ready  # wakes the decode loop
        # Small batches: an image is ready when its batch is, and the ViT gains little from
        # batching on a CPU (bf16, 2 cores: 146 ms per image alone, 134 in fours). One pair of
        # runs at 70% load (shared machine, noisy) gave a p50 of 1.64 s with batches of 2 and
        # 2.51 s with batches of up to 8.
        self.max_batch = max_batch
        self.busy = False  # encoding now: the decode loop keeps to its share of the threads
        self.prepared = 0  # images encoded here, off the decode loop
        self._inbox: deque[Request] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="caption-engine-encoder", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> list[Request]:
        """Stop the thread; returns the images it had not prepared (the caller re-queues them)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._wake:
            left, self._inbox = list(self._inbox), deque()
        return left

    def submit(self, request: Request) -> None:
        with self._wake:
            self._inbox.append(request)
            self._wake.notify()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._inbox:
                        self._wake.wait(timeout=1.0)
                    if self._stopping:
                        return
                    batch = [self._inbox.popleft() for _ in range(min(self.max_batch, len(self._inbox)))]
                    self.busy = True
                try:
                    self._prepare(batch)
                finally:
                    self.busy = False
                self.on_ready()

    def _prepare(self, batch: list[Request]) -> None:
        alone = not self.scheduler.in_flight()
        use_threads(self.shares.total if alone else self.shares.encoder)
        try:
            pixels = torch.stack([r.pixels for r in batch]).to(self.decoder.device)
            cross_k, cross_v = self.decoder.cross_kv(self.decoder.encode(pixels))
        except Exception as e:  # noqa: BLE001 - a bad batch fails its own requests, not the stage
            log.warning("encoder stage failed a batch of %d: %s", len(batch), e)
            for request in batch:
                request.future.set_exception(e)
            return
        for i, request in enumerate(batch):
            request.cross = (cross_k[:, i], cross_v[:, i])
            self.scheduler.submit(request)
        self.prepared += len(batch)
