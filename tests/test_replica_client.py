"""ReplicaClient against a fake deployment handle: micro-batches, retries, in-band errors."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from workers.params import GenerationParams
from workers.replica_api import InferenceError, ReplicaAnswer
from workers.replica_client import ReplicaCallFailed, ReplicaClient

PARAMS = GenerationParams()


class FakeHandle:
    """`handle.caption_many.remote(items)` like a Serve handle; each call waits for `release`."""

    def __init__(self, failures: int = 0, bad_marker: int | None = None):
        self.calls: list[int] = []
        self.failures = failures
        self.bad_marker = bad_marker
        self.release = asyncio.Event()
        self.caption_many = self

    def remote(self, items: list[tuple[np.ndarray, GenerationParams]]) -> Any:
        return self._answer(items)

    async def _answer(self, items: list[tuple[np.ndarray, GenerationParams]]) -> list[ReplicaAnswer]:
        self.calls.append(len(items))
        await self.release.wait()
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("replica died")
        return [
            ReplicaAnswer([], None, len(items), 1.0, error="CUDA OOM")
            if int(pixels[0, 0, 0]) == self.bad_marker
            else ReplicaAnswer([f"caption {int(pixels[0, 0, 0])}"], None, len(items), 1.0)
            for pixels, _ in items
        ]


def image(marker: int) -> np.ndarray:
    return np.full((2, 2, 3), marker, dtype=np.uint8)


async def wait_until(condition: Any, timeout: float = 5) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), timeout)


def test_idle_client_sends_at_once_then_groups_while_a_call_is_in_flight() -> None:
    async def scenario() -> None:
        handle = FakeHandle()
        client = ReplicaClient(handle, max_batch_size=4, wait_s=5.0, retry_budget_s=0, call_timeout_s=30)
        first = asyncio.ensure_future(client.caption(image(0), PARAMS))
        await wait_until(lambda: handle.calls == [1])  # idle: no waiting for a batch to fill
        rest = [asyncio.ensure_future(client.caption(image(i), PARAMS)) for i in range(1, 9)]
        await wait_until(lambda: sum(handle.calls) == 9)
        handle.release.set()
        answers = await asyncio.gather(first, *rest)
        assert [a.captions[0] for a in answers] == [f"caption {i}" for i in range(9)]
        assert handle.calls == [1, 4, 4], "one image at once, then full micro-batches while one is in flight"
        await client.close()

    asyncio.run(scenario())


def test_with_every_call_slot_taken_the_next_call_fills_up_instead_of_going_small() -> None:
    async def scenario() -> None:
        handle = FakeHandle()
        client = ReplicaClient(handle, max_batch_size=4, wait_s=0.0, retry_budget_s=0, call_timeout_s=30, max_calls=2)
        futures = [asyncio.ensure_future(client.caption(image(0), PARAMS))]
        await wait_until(lambda: handle.calls == [1])
        futures.append(asyncio.ensure_future(client.caption(image(1), PARAMS)))
        await wait_until(lambda: handle.calls == [1, 1])  # a free slot: sent at once
        futures += [asyncio.ensure_future(client.caption(image(i), PARAMS)) for i in range(2, 8)]
        assert client._queue is not None
        await wait_until(lambda: client._queue.qsize() == 2)  # four held in the next call, two queued
        assert handle.calls == [1, 1], "no third call while both slots are taken"
        handle.release.set()
        answers = await asyncio.gather(*futures)
        assert [a.captions[0] for a in answers] == [f"caption {i}" for i in range(8)]
        assert handle.calls == [1, 1, 4, 2], "the held call went out full once a slot freed"
        await client.close()

    asyncio.run(scenario())


def test_a_failed_call_is_retried_then_fails_every_image_of_it() -> None:
    async def scenario() -> None:
        retries: list[int] = []
        handle = FakeHandle(failures=5)
        handle.release.set()
        client = ReplicaClient(
            handle,
            max_batch_size=4,
            wait_s=0.0,
            retry_budget_s=30,
            call_timeout_s=30,
            max_attempts=2,
            on_retry=lambda n, _e: retries.append(n),
        )
        with pytest.raises(ReplicaCallFailed, match="ConnectionError: replica died"):
            await client.caption(image(1), PARAMS)
        assert handle.calls == [1, 1] and retries == [1]
        handle.failures = 1
        answer = await client.caption(image(2), PARAMS)  # one failure, then the retry succeeds
        assert answer.captions == ["caption 2"]
        await client.close()

    asyncio.run(scenario())


def test_a_failed_group_fails_its_own_image_only() -> None:
    async def scenario() -> None:
        handle = FakeHandle(bad_marker=3)
        client = ReplicaClient(handle, max_batch_size=2, wait_s=5.0, retry_budget_s=30, call_timeout_s=30)
        first = asyncio.ensure_future(client.caption(image(0), PARAMS))
        await wait_until(lambda: handle.calls == [1])
        bad = asyncio.ensure_future(client.caption(image(3), PARAMS))
        good = asyncio.ensure_future(client.caption(image(4), PARAMS))
        await wait_until(lambda: len(handle.calls) == 2)
        handle.release.set()
        assert (await first).captions == ["caption 0"]
        assert (await good).captions == ["caption 4"]
        with pytest.raises(InferenceError, match="CUDA OOM"):
            await bad
        assert len(handle.calls) == 2, "an in-band error is not retried"
        await client.close()

    asyncio.run(scenario())


def test_unavailable_replicas_are_retried_with_backoff_until_the_budget_is_spent() -> None:
    async def scenario() -> None:
        handle = FakeHandle(failures=4)  # e.g. replicas restarting during an upgrade
        handle.release.set()
        retries: list[int] = []
        client = ReplicaClient(
            handle,
            max_batch_size=4,
            wait_s=0.0,
            retry_budget_s=30,
            call_timeout_s=30,
            on_retry=lambda n, _e: retries.append(n),
        )
        answer = await client.caption(image(5), PARAMS)
        assert answer.captions == ["caption 5"], "a transient outage is not the image's failure"
        assert retries == [1, 2, 3, 4]
        handle.failures = 1000
        start = asyncio.get_running_loop().time()
        with pytest.raises(ReplicaCallFailed):
            await ReplicaClient(handle, max_batch_size=4, wait_s=0.0, retry_budget_s=0.5, call_timeout_s=30).caption(
                image(6), PARAMS
            )
        assert asyncio.get_running_loop().time() - start < 5, "gives up once the budget is spent"
        await client.close()

    asyncio.run(scenario())


def test_a_hung_call_is_cancelled_at_its_deadline_and_retried() -> None:
    async def scenario() -> None:
        handle = FakeHandle()  # never answers until released
        timeouts: list[int] = []

        def on_timeout() -> None:
            timeouts.append(1)
            handle.release.set()  # the replica comes back after the first hung call

        client = ReplicaClient(
            handle, max_batch_size=4, wait_s=0.0, retry_budget_s=30, call_timeout_s=0.2, on_timeout=on_timeout
        )
        answer = await asyncio.wait_for(client.caption(image(7), PARAMS), 10)
        assert answer.captions == ["caption 7"]
        assert timeouts == [1] and handle.calls == [1, 1]
        await client.close()

    asyncio.run(scenario())


def test_out_of_memory_splits_the_batch_before_failing_one_image() -> None:
    from workers.model.core import CaptionOutput
    from workers.replicas import run_splitting

    calls: list[int] = []

    def caption(pixels: np.ndarray, params: GenerationParams) -> list[CaptionOutput]:
        calls.append(len(pixels))
        if len(pixels) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(int(p[0, 0, 0]) == 3 for p in pixels) and len(pixels) > 1:
            raise RuntimeError("CUDA out of memory (image 3 is huge)")
        if any(int(p[0, 0, 0]) == 3 for p in pixels):
            raise RuntimeError("CUDA out of memory even alone")
        return [CaptionOutput([f"c{int(p[0, 0, 0])}"], [0], None) for p in pixels]

    answers = run_splitting(caption, [image(i) for i in range(8)], PARAMS, 8)
    assert [a.captions for a in answers] == [[f"c{i}"] for i in range(8) if i != 3][:3] + [[]] + [
        [f"c{i}"] for i in range(4, 8)
    ]
    assert answers[3].error is not None and "out of memory" in answers[3].error
    assert calls[0] == 8 and min(calls) == 1, calls
    not_oom = run_splitting(lambda *_: (_ for _ in ()).throw(ValueError("bad params")), [image(1), image(2)], PARAMS, 2)
    assert [a.error for a in not_oom] == ["ValueError: bad params"] * 2, "a real failure is not split"


def test_an_unavailable_tier_is_retried_past_the_budget_never_failing_the_images() -> None:
    from workers.replica_api import ReplicasUnavailable

    class Unavailable(FakeHandle):
        async def _answer(self, items: list[tuple[np.ndarray, GenerationParams]]) -> list[ReplicaAnswer]:
            self.calls.append(len(items))
            if len(self.calls) <= 6:
                raise ReplicasUnavailable("connection refused")
            return [ReplicaAnswer(["back"], None, len(items), 1.0) for _ in items]

    async def scenario() -> None:
        handle = Unavailable()
        client = ReplicaClient(
            handle, max_batch_size=4, wait_s=0.0, retry_budget_s=0.0, call_timeout_s=30, max_attempts=2
        )
        answer = await asyncio.wait_for(client.caption(image(1), PARAMS), 30)
        assert answer.captions == ["back"] and len(handle.calls) == 7, "neither the budget nor max_attempts ended it"
        await client.close()

    asyncio.run(scenario())
