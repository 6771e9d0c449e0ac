"""workers.budget: the process-wide byte budget for images being decoded (pure logic, threads)."""

from __future__ import annotations

import threading
import time

import pytest

from workers.budget import BudgetCancelled, BudgetTimeout, MemoryBudget, shared_budget
from workers.embedded import wait_until


def _holder(budget: MemoryBudget, nbytes: int, release: threading.Event, granted: list[int]) -> threading.Thread:
    def run() -> None:
        with budget.reserve(nbytes) as got:
            granted.append(got)
            release.wait(10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_concurrent_holders_never_exceed_the_capacity() -> None:
    budget = MemoryBudget(100)
    inside, most = [0], [0]
    lock = threading.Lock()

    def work(nbytes: int) -> None:
        for _ in range(50):
            with budget.reserve(nbytes):
                with lock:
                    inside[0] += nbytes
                    most[0] = max(most[0], inside[0])
                assert budget.in_use <= budget.capacity
                time.sleep(0)  # let another thread try to get in while this one holds
                with lock:
                    inside[0] -= nbytes

    threads = [threading.Thread(target=work, args=(n,)) for n in (10, 30, 40, 60, 70, 90, 25, 35)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert budget.in_use == 0 and most[0] <= 100 and budget.peak <= 100
    assert most[0] > 90  # holders did overlap: the budget is shared, not a mutex


def test_a_waiter_blocks_until_bytes_are_released() -> None:
    budget = MemoryBudget(100)
    release, granted = threading.Event(), []
    holder = _holder(budget, 80, release, granted)
    wait_until(lambda: granted == [80], timeout_s=5, what="first holder")
    with pytest.raises(BudgetTimeout, match="80 of 100 in use"):
        budget.acquire(30, timeout_s=0.05)
    assert budget.in_use == 80  # the timed-out waiter took nothing
    release.set()
    holder.join(5)
    assert budget.acquire(30, timeout_s=5) == 30
    budget.release(30)
    assert budget.in_use == 0


def test_a_request_larger_than_the_budget_waits_for_all_of_it_and_holds_it_alone() -> None:
    budget = MemoryBudget(100)
    release, granted = threading.Event(), []
    holder = _holder(budget, 10, release, granted)
    wait_until(lambda: granted == [10], timeout_s=5, what="small holder")
    big_got: list[int] = []
    big = threading.Thread(target=lambda: big_got.append(budget.acquire(10_000)), daemon=True)
    big.start()
    wait_until(lambda: len(budget._queue) == 1, timeout_s=5, what="big waiting")
    assert big_got == []  # 10 bytes are held: the clamped 100 does not fit yet
    release.set()
    holder.join(5)
    big.join(5)
    assert big_got == [100] and budget.in_use == 100
    # While the oversized request holds everything, even 1 byte waits.
    with pytest.raises(BudgetTimeout):
        budget.acquire(1, timeout_s=0.05)
    budget.release(100)
    assert budget.in_use == 0


def test_waiters_are_served_in_arrival_order_so_a_large_one_is_not_starved() -> None:
    budget = MemoryBudget(100)
    release, granted = threading.Event(), []
    _holder(budget, 60, release, granted)
    wait_until(lambda: granted == [60], timeout_s=5, what="holder")
    order: list[str] = []
    big = threading.Thread(target=lambda: (budget.acquire(90), order.append("big")), daemon=True)
    big.start()
    wait_until(lambda: len(budget._queue) == 1, timeout_s=5, what="big waiting")
    # 30 bytes would fit beside the holder, but the big waiter came first.
    with pytest.raises(BudgetTimeout):
        budget.acquire(30, timeout_s=0.1)
    small = threading.Thread(target=lambda: (budget.acquire(10), order.append("small")), daemon=True)
    small.start()
    wait_until(lambda: len(budget._queue) == 2, timeout_s=5, what="small waiting")
    release.set()
    big.join(5)
    wait_until(lambda: order == ["big", "small"], timeout_s=5, what="both granted in order")
    small.join(5)
    assert budget.in_use == 100
    budget.release(90)
    budget.release(10)


def test_cancel_ends_a_wait_and_releases_nothing_it_did_not_get() -> None:
    budget = MemoryBudget(100)
    release, granted = threading.Event(), []
    holder = _holder(budget, 100, release, granted)
    wait_until(lambda: granted == [100], timeout_s=5, what="holder")
    cancel = threading.Event()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            budget.acquire(50, cancel=cancel)
        except BudgetCancelled as e:
            errors.append(e)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    wait_until(lambda: len(budget._queue) == 1, timeout_s=5, what="waiter queued")
    cancel.set()
    waiter.join(5)
    assert len(errors) == 1 and not budget._queue
    release.set()
    holder.join(5)
    assert budget.in_use == 0


def test_reserve_releases_on_exception() -> None:
    budget = MemoryBudget(100)
    with pytest.raises(ZeroDivisionError):
        with budget.reserve(70):
            assert budget.in_use == 70
            _ = 1 / 0
    assert budget.in_use == 0


def test_the_gauge_follows_the_bytes_held() -> None:
    from workers import metrics

    before = metrics.MEMORY_BUDGET_IN_USE._value.get()
    budget = MemoryBudget(1000)
    with budget.reserve(400):
        assert metrics.MEMORY_BUDGET_IN_USE._value.get() == before + 400
    assert metrics.MEMORY_BUDGET_IN_USE._value.get() == before


def test_shared_budget_is_one_object_per_capacity_and_rejects_nonsense() -> None:
    assert shared_budget(12345) is shared_budget(12345)
    assert shared_budget(12345) is not shared_budget(54321)
    with pytest.raises(ValueError):
        MemoryBudget(0)
