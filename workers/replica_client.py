"""The worker's side of the replicas: prepared images become `caption_many` micro-batches.

Runs in the worker process (not in a replica): one `ReplicaClient` per pipeline, used from its
inference event loop. See the class for the batching and retry semantics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

from workers.contract import describe
from workers.params import GenerationParams
from workers.replica_api import InferenceError, ReplicaAnswer

_Pending = tuple[np.ndarray, GenerationParams, "asyncio.Future[ReplicaAnswer]"]


class ReplicaCallFailed(RuntimeError):
    """The replicas did not answer a micro-batch after every attempt (e.g. replicas killed)."""


class ReplicaClient:
    """The caller's side of the replicas: images become `caption_many` micro-batches.

    While a call is in flight, images submitted within `wait_s` of the first one (up to
    `max_batch_size`) share the next call; when none is in flight the replicas are idle and an
    image goes at once (waiting would only add latency). Calls are not awaited one by one, so
    several can be in flight and the replicas' @serve.batch merges them. A call that fails as a
    whole (a replica died under it) is retried up to `attempts` times; a failed generate comes back in-band as that image's error and is
    not retried (the same params would fail again). Use from one asyncio loop.
    """

    def __init__(
        self,
        handle: Any,
        *,
        max_batch_size: int,
        wait_s: float,
        attempts: int,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ):
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.attempts = attempts
        self.on_retry = on_retry
        self._queue: asyncio.Queue[_Pending] | None = None
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

    async def _call(self, batch: list[_Pending]) -> None:
        self._in_flight += 1
        try:
            await self._call_with_retries(batch)
        finally:
            self._in_flight -= 1

    async def _call_with_retries(
        self, batch: list[_Pending]
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
