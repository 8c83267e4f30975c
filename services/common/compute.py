"""One thread for a service's model compute.

PyTorch's CPU kernels parallelise with OpenMP, and an OpenMP team belongs to the thread that calls in. When
the gRPC pool's worker threads take turns running the model, each keeps a team of its own, the process holds
more OpenMP threads than cores, and libgomp then stops spinning between parallel regions ("throttled" spin
count): each of the decoder's few hundred small ops per call pays a futex wake-up of its helper thread.
Measured on a 2-core VM, LiteMedSAM decoder, one box prompt: ~45 ms when one thread runs every call, ~62 ms
when two threads alternate, ~80 ms in the service with 8 gRPC workers. Funnelling the compute through one
thread keeps one team (its helpers spin a few ms, then sleep: an idle service uses no CPU) and serialises the
work, which two cores do anyway; the request threads keep the I/O (embedding fetch, encoding the reply).

A team, once made, stays for the life of its thread, so *every* thread that runs a parallel op counts, the
one that loaded the model included: a service builds its engine through :func:`shared` as well
(measured: one decode at 35 ms on the main thread alone, 43-53 ms once a second thread had its own team).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class ComputeThread:
    """``run(fn, ...)`` executes ``fn`` on the one compute thread and returns its result (or raises its error).

    A call made from the compute thread itself runs inline, so nested use cannot deadlock.
    """

    def __init__(self, name: str = "compute") -> None:
        self._ident: int | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self._remember)

    def _remember(self) -> None:
        self._ident = threading.get_ident()

    def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Finish the work in progress, drop queued work (its callers get CancelledError), stop the thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)


_shared: ComputeThread | None = None
_shared_lock = threading.Lock()


def shared() -> ComputeThread:
    """The process's compute thread (created on first use; lives until the interpreter exits)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ComputeThread("compute")
        return _shared
