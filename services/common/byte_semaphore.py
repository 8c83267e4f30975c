"""A semaphore counted in bytes: at most ``capacity`` bytes held at once (the encoder's image-decoding budget).

Contract of :meth:`ByteSemaphore.hold` (a context manager):

- it waits until ``weight`` bytes are free *and* every earlier waiter has been served (first come, first served:
  a large request is not starved by a stream of small ones), holds them for the ``with`` block and releases
  them when the block ends, also when it raises;
- waiting ends after ``timeout`` seconds (None: no limit; the caller passes its remaining deadline). Bytes that
  are free at once are granted even with no time left. Past the timeout it raises
  :class:`~sam_core.errors.Overloaded` (RESOURCE_EXHAUSTED) naming the setting, with a retry hint (the mean
  time a hold has lasted, at least 1 s); the refused request holds nothing;
- a waiter whose caller went away (``is_active()`` false, checked at least every :data:`ACTIVE_POLL_S`) stops
  waiting with :class:`~services.common.status.Cancelled` and holds nothing, so a client that disconnects
  without a deadline never pins a worker thread;
- ``weight`` must be 1..capacity (callers guarantee it, e.g. by a settings check), else ValueError.

``held``, ``waiting`` and ``peak`` (the most bytes held at once since creation) are for metrics and tests.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sam_core.errors import Overloaded
from services.common.status import Cancelled

_MEAN_WEIGHT = 0.2
"""Weight of the newest hold in the running mean of hold durations (the retry hint)."""
ACTIVE_POLL_S = 0.5
"""Longest wait between two checks that the waiting caller is still there."""


def _always() -> bool:
    return True


class ByteSemaphore:
    """Bytes held at once, bounded by ``capacity`` (the value of the variable ``setting``); thread-safe."""

    def __init__(self, capacity: int, *, setting: str) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self.setting = setting
        self.held = 0
        self.peak = 0
        self._waiters: deque[object] = deque()
        self._changed = threading.Condition()
        self._mean_hold_s = 0.0

    @property
    def waiting(self) -> int:
        """Requests waiting for bytes now."""
        with self._changed:
            return len(self._waiters)

    @contextmanager
    def hold(self, weight: int, timeout: float | None, is_active: Callable[[], bool] = _always) -> Iterator[None]:
        """Hold ``weight`` bytes for the block (see the module docstring)."""
        self._acquire(weight, timeout, is_active)
        started = time.monotonic()
        try:
            yield
        finally:
            self._release(weight, time.monotonic() - started)

    def _acquire(self, weight: int, timeout: float | None, is_active: Callable[[], bool]) -> None:
        if not 0 < weight <= self.capacity:
            raise ValueError(f"weight must be 1..{self.capacity} bytes, got {weight}")
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = object()
        with self._changed:
            self._waiters.append(ticket)
            try:
                while self._waiters[0] is not ticket or self.held + weight > self.capacity:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise self._refusal(weight)
                    if not is_active():
                        raise Cancelled("the caller went away while waiting for image-decoding memory")
                    self._changed.wait(ACTIVE_POLL_S if remaining is None else min(remaining, ACTIVE_POLL_S))
            finally:
                self._waiters.remove(ticket)
                self._changed.notify_all()  # the next waiter may be first now
            self.held += weight
            self.peak = max(self.peak, self.held)

    def _release(self, weight: int, held_s: float) -> None:
        with self._changed:
            self.held -= weight
            self._mean_hold_s += _MEAN_WEIGHT * (held_s - self._mean_hold_s)
            self._changed.notify_all()

    def _refusal(self, weight: int) -> Overloaded:
        """Under the lock: the error for a request whose ``weight`` bytes were not granted in time."""
        hint = max(1, math.ceil(self._mean_hold_s * len(self._waiters)))
        return Overloaded(f"{weight} bytes of {self.setting}={self.capacity} not free before the request's "
                          f"deadline ({self.held} held, {len(self._waiters)} requests waiting); retry after ~{hint} s")
