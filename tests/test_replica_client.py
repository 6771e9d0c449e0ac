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
        client = ReplicaClient(handle, max_batch_size=4, wait_s=5.0, attempts=1)
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


def test_a_failed_call_is_retried_then_fails_every_image_of_it() -> None:
    async def scenario() -> None:
        retries: list[int] = []
        handle = FakeHandle(failures=5)
        handle.release.set()
        client = ReplicaClient(handle, max_batch_size=4, wait_s=0.0, attempts=2, on_retry=lambda n, _e: retries.append(n))
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
        client = ReplicaClient(handle, max_batch_size=2, wait_s=5.0, attempts=3)
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
