"""services.common.byte_semaphore: bytes held at once, first-come-first-served waits, deadline-bounded refusal."""

from __future__ import annotations

import threading
import time

import pytest

from sam_core.errors import Overloaded
from services.common.byte_semaphore import ByteSemaphore
from services.common.status import Cancelled


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def hold_in_thread(budget: ByteSemaphore, weight: int, release: threading.Event) -> tuple[threading.Thread, list]:
    """Start a thread that holds ``weight`` bytes until ``release`` is set; its outcome lands in the list."""
    outcome: list = []

    def work() -> None:
        try:
            with budget.hold(weight, timeout=10.0):
                outcome.append("held")
                assert release.wait(10)
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            outcome.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    return thread, outcome


def test_a_hold_that_does_not_fit_in_time_is_overloaded_naming_the_setting_and_holds_nothing():
    budget = ByteSemaphore(100, setting="SAMFORGE_DECODE_BYTES")
    with budget.hold(70, timeout=1.0):
        assert budget.held == 70
        with pytest.raises(Overloaded, match=r"SAMFORGE_DECODE_BYTES=100.*retry after ~\d+ s"):
            with budget.hold(40, timeout=0.05):
                pytest.fail("must not enter")
        assert budget.held == 70 and budget.waiting == 0
        with budget.hold(30, timeout=0.0):  # what fits is granted at once, even with no time left
            assert budget.held == 100
    assert budget.held == 0 and budget.peak == 100


def test_a_waiter_gets_the_bytes_once_they_are_released():
    budget = ByteSemaphore(100, setting="SAMFORGE_DECODE_BYTES")
    release_first = threading.Event()
    first, first_outcome = hold_in_thread(budget, 80, release_first)
    wait_for(lambda: budget.held == 80)
    release_second = threading.Event()
    second, second_outcome = hold_in_thread(budget, 80, release_second)
    wait_for(lambda: budget.waiting == 1)
    assert second_outcome == [] and budget.held == 80
    release_first.set()
    wait_for(lambda: second_outcome == ["held"])
    release_second.set()
    for thread in (first, second):
        thread.join(15)
    assert first_outcome == ["held"] and second_outcome == ["held"]
    assert budget.held == 0 and budget.peak == 80  # never both at once


def test_waiters_are_served_in_arrival_order_so_a_large_one_is_not_starved():
    budget = ByteSemaphore(100, setting="SAMFORGE_DECODE_BYTES")
    release = threading.Event()
    holder, _ = hold_in_thread(budget, 60, release)
    wait_for(lambda: budget.held == 60)
    release_large = threading.Event()
    large, large_outcome = hold_in_thread(budget, 100, release_large)
    wait_for(lambda: budget.waiting == 1)
    # 30 bytes would fit now, but the large waiter came first
    with pytest.raises(Overloaded):
        with budget.hold(30, timeout=0.05):
            pytest.fail("must not overtake the earlier waiter")
    release.set()
    wait_for(lambda: large_outcome == ["held"])
    assert budget.held == 100
    release_large.set()
    holder.join(15)
    large.join(15)
    assert budget.held == 0


def test_a_weight_over_the_capacity_is_a_programming_error():
    budget = ByteSemaphore(100, setting="SAMFORGE_DECODE_BYTES")
    with pytest.raises(ValueError, match="1..100"):
        with budget.hold(101, timeout=None):
            pytest.fail("must not enter")
    with pytest.raises(ValueError):
        ByteSemaphore(0, setting="SAMFORGE_DECODE_BYTES")


def test_a_waiter_whose_caller_went_away_stops_waiting_and_holds_nothing():
    """No deadline, and the client disconnects while waiting: the worker thread must not wait forever."""
    budget = ByteSemaphore(100, setting="SAMFORGE_DECODE_BYTES")
    caller_there = threading.Event()
    caller_there.set()
    outcome: list = []

    def wait_without_deadline() -> None:
        try:
            with budget.hold(60, timeout=None, is_active=caller_there.is_set):
                outcome.append("held")
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            outcome.append(exc)

    with budget.hold(70, timeout=1.0):
        thread = threading.Thread(target=wait_without_deadline)
        thread.start()
        wait_for(lambda: budget.waiting == 1)
        caller_there.clear()
        thread.join(10)
        assert not thread.is_alive()
    assert isinstance(outcome[0], Cancelled) and "went away" in str(outcome[0])
    assert budget.held == 0 and budget.waiting == 0
