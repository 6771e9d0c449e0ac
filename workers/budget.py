"""A process-wide memory budget: bytes of encoded images and decoded pixels in flight.

Record counts (`worker.max_in_flight`, the work pool's size) do not bound memory: one
50-megapixel PNG decodes to 200 MB inside PIL, a JPEG of the same size to a few MB once it is
decoded at reduced scale. So the decode step estimates what an image will cost from its header
(`workers.images.plan`) and takes that many bytes from a `MemoryBudget` before decoding; the bytes
go back when the decoded image has been resized to the model's input.

Semantics, decided here:
- **First come, first served.** Waiters are granted in arrival order, and a waiter that does not
  fit blocks the ones behind it, so a large image is never starved by a stream of small ones.
- **Bigger than the whole budget.** A request above the capacity is clamped to it: it waits until
  nothing else is held and then holds the whole budget alone. It is never refused for its size
  (the pixel limit, `limits.max_image_pixels`, is what refuses images), and never waits forever:
  every holder releases once its decode ends.
- **Waiting** blocks the calling thread (the work pool's, never the Kafka poll loop). It ends
  when the bytes are granted, when `timeout_s` passes (`BudgetTimeout`) or when `cancel` is set
  (`BudgetCancelled`); neither is the request's fault, so neither is a dead-letter code: the
  caller decides (retry, or abandon the record for redelivery).
- Release happens on leaving the `reserve()` block, exception or not.

The gauge `captioner_memory_budget_bytes_in_use` shows the bytes held (per process; with more
than one budget in a process, the sum).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from workers import metrics

# How often a waiter re-checks its cancel event: cancellation is rare, so a coarse poll is enough.
_CANCEL_POLL_S = 0.05


class BudgetUnavailable(Exception):
    """The bytes were not granted; the request itself is not at fault."""


class BudgetTimeout(BudgetUnavailable):
    pass


class BudgetCancelled(BudgetUnavailable):
    pass


class MemoryBudget:
    """A thread-safe, FIFO-fair byte budget with blocking acquisition."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self._in_use = 0
        self._peak = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # one token per waiter, in arrival order

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def peak(self) -> int:
        """The most bytes held at once since this budget was made."""
        return self._peak

    def acquire(self, nbytes: int, *, timeout_s: float | None = None, cancel: threading.Event | None = None) -> int:
        """Block until `nbytes` (clamped to the capacity) are granted; returns the bytes granted,
        which the caller must `release`. Prefer `reserve()`."""
        granted = min(max(int(nbytes), 0), self.capacity)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        token = object()
        with self._cond:
            self._queue.append(token)
            try:
                while self._queue[0] is not token or self._in_use + granted > self.capacity:
                    if cancel is not None and cancel.is_set():
                        raise BudgetCancelled(f"cancelled while waiting for {granted} bytes of memory budget")
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        raise BudgetTimeout(
                            f"waited {timeout_s:.1f} s for {granted} bytes of memory budget "
                            f"({self._in_use} of {self.capacity} in use)"
                        )
                    if cancel is not None:
                        wait = _CANCEL_POLL_S if wait is None else min(wait, _CANCEL_POLL_S)
                    self._cond.wait(wait)
                self._in_use += granted
                self._peak = max(self._peak, self._in_use)
            finally:
                self._queue.remove(token)
                # The head changed (granted or gone): the next waiter may fit now.
                self._cond.notify_all()
        metrics.MEMORY_BUDGET_IN_USE.inc(granted)
        return granted

    def release(self, granted: int) -> None:
        with self._cond:
            self._in_use -= granted
            self._cond.notify_all()
        metrics.MEMORY_BUDGET_IN_USE.dec(granted)

    @contextmanager
    def reserve(
        self, nbytes: int, *, timeout_s: float | None = None, cancel: threading.Event | None = None
    ) -> Iterator[int]:
        """Hold `nbytes` (clamped to the capacity) for the block; yields the bytes granted."""
        granted = self.acquire(nbytes, timeout_s=timeout_s, cancel=cancel)
        try:
            yield granted
        finally:
            self.release(granted)


_shared: dict[int, MemoryBudget] = {}
_shared_lock = threading.Lock()


def shared_budget(capacity_bytes: int) -> MemoryBudget:
    """The process's budget of this capacity: every `Stages` built from the same settings in one
    process (the pipeline's, the ingress's, `caption`'s) draws on the same bytes."""
    with _shared_lock:
        budget = _shared.get(capacity_bytes)
        if budget is None:
            budget = _shared[capacity_bytes] = MemoryBudget(capacity_bytes)
        return budget
