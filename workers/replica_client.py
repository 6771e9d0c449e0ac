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
from workers.replica_api import InferenceError, ReplicaAnswer, ReplicasUnavailable
from workers.retry import backoff_s

_Pending = tuple[np.ndarray, GenerationParams, "asyncio.Future[ReplicaAnswer]"]


class ReplicaCallFailed(RuntimeError):
    """The replicas did not answer a micro-batch within the retry budget (e.g. all unavailable)."""


class ReplicaClient:
    """The caller's side of the replicas: images become `caption_many` micro-batches.

    While a call is in flight, images submitted within `wait_s` of the first one (up to
    `max_batch_size`) share the next call; when none is in flight the replicas are idle and an
    image goes at once (waiting would only add latency). Calls are not awaited one by one, so
    several can be in flight and the replicas' @serve.batch merges them. With `max_calls` set,
    at most that many are in flight: while every slot is taken the next call keeps filling (up
    to `max_batch_size`) until one returns, so a busy tier gets full calls instead of a spray of
    small ones (each costs a proxy hop and an ingress slot, and a replica cannot merge two
    calls past its batch size). Use from one asyncio loop.

    Failures, and what they become:
    - the inference tier is unavailable (nothing reached a replica: connection refused, Serve's
      backpressure, no replica up during an upgade — `ReplicasUnavailable` and Serve's own
      equivalents): retried with backoff and jitter for as long as it lasts, never a dead
      letter. The images' records stay in flight, so the window fills and the source pauses;
    - a call that failed after reaching a replica (it died under the call, or the call ran past
      `call_timeout_s` and was cancelled) says nothing about its images either: it is retried
      with backoff until `retry_budget_s` is spent (or `max_attempts`, when set), and only then
      do its images fail (ReplicaCallFailed → inference_failed);
    - a failed generate comes back in-band as that image's error (InferenceError) and is not
      retried: the same params would fail again.
    """

    def __init__(
        self,
        handle: Any,
        *,
        max_batch_size: int,
        wait_s: float,
        retry_budget_s: float,
        call_timeout_s: float,
        max_attempts: int | None = None,
        max_calls: int | None = None,
        on_retry: Callable[[int, BaseException], None] | None = None,
        on_timeout: Callable[[], None] | None = None,
    ):
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.retry_budget_s = retry_budget_s
        self.call_timeout_s = call_timeout_s
        self.max_attempts = max_attempts
        self.max_calls = max_calls
        self.on_retry = on_retry
        self.on_timeout = on_timeout
        self._queue: asyncio.Queue[_Pending] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._wake: asyncio.Event | None = None  # set when an image arrives or a call returns

    async def close(self) -> None:
        """Cancel the batch former and outstanding calls (their callers get CancelledError)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def caption(self, pixels: np.ndarray, params: GenerationParams) -> ReplicaAnswer:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._wake = asyncio.Event()
            self._spawn(self._form_batches())
        future: asyncio.Future[ReplicaAnswer] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((pixels, params, future))
        self._wake_former()
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
                if not self._queue.empty():  # queued images join at once, deadline or not
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._fill_while_saturated(batch)
            self._in_flight += 1  # counted here: the former may spawn again before the task runs
            self._spawn(self._call(batch))

    async def _fill_while_saturated(self, batch: list[_Pending]) -> None:
        """Every call slot is taken: wait for one to free, filling this call meanwhile (up to full)."""
        assert self._queue is not None and self._wake is not None
        while self.max_calls is not None and self._in_flight >= self.max_calls:
            if len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            self._wake.clear()
            await self._wake.wait()

    def _wake_former(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _call(self, batch: list[_Pending]) -> None:
        try:
            await self._call_with_retries(batch)
        finally:
            self._in_flight -= 1
            self._wake_former()

    async def _call_with_retries(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        items = [(pixels, params) for pixels, params, _ in batch]
        budget_ends = loop.time() + self.retry_budget_s
        attempt = 0
        while True:
            attempt += 1
            try:
                answers = await self._call_once(items)
            except Exception as e:  # the replica died, none is reachable, or the call hung
                delay = backoff_s(attempt)
                unavailable = is_unavailable(e)
                out_of_tries = self.max_attempts is not None and attempt >= self.max_attempts
                if not unavailable and (out_of_tries or loop.time() + delay > budget_ends):
                    failure = ReplicaCallFailed(f"after {attempt} attempt(s): {describe(e)}")
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                    return
                if self.on_retry is not None:
                    self.on_retry(attempt, e)
                await asyncio.sleep(delay)
                continue
            for (_, _, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
            return

    async def _call_once(self, items: list[tuple[np.ndarray, GenerationParams]]) -> list[ReplicaAnswer]:
        response = self.handle.caption_many.remote(items)
        try:
            return await asyncio.wait_for(_awaited(response), self.call_timeout_s)
        except TimeoutError:
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()  # a Serve DeploymentResponse: stop the replica's work on it too
            if self.on_timeout is not None:
                self.on_timeout()
            raise ReplicaCallTimedOut(f"no answer within replicas.call_timeout_s ({self.call_timeout_s} s)") from None

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)  # keep a reference: the loop holds tasks only weakly
        task.add_done_callback(self._tasks.discard)


def is_unavailable(error: BaseException) -> bool:
    """Nothing reached a replica: the tier is down, restarting or pushing back (never the images' fault)."""
    if isinstance(error, ReplicasUnavailable):
        return True
    # Serve's own: its router found no replica to take the call, or max_queued_requests is full.
    return type(error).__name__ in {"BackPressureError", "DeploymentUnavailableError"}


class ReplicaCallTimedOut(TimeoutError):
    """A replica call ran past its deadline and was cancelled."""


async def _awaited(response: Any) -> Any:
    return await response
