"""The process's compute thread: one thread runs every call, results and errors come back, re-entry is inline."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common import compute
from services.common.compute import ComputeThread


def test_every_call_runs_on_one_thread_whatever_thread_submits_it():
    worker = ComputeThread("test-compute")
    try:
        with ThreadPoolExecutor(8) as callers:
            idents = set(callers.map(lambda _: worker.run(threading.get_ident), range(64)))
        assert len(idents) == 1
        assert idents != {threading.get_ident()}
    finally:
        worker.close()


def test_results_errors_and_nested_calls():
    worker = ComputeThread("test-compute")
    try:
        assert worker.run(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            worker.run(lambda: 1 / 0)
        assert worker.run(lambda: 7) == 7  # the thread survived the error
        # a call made from the compute thread itself runs inline (a queued call would wait for itself)
        assert worker.run(lambda: worker.run(threading.get_ident)) == worker.run(threading.get_ident)
    finally:
        worker.close()
    with pytest.raises(RuntimeError):
        worker.run(lambda: 0)  # closed: refused, not hung


def test_the_shared_thread_is_one_per_process():
    assert compute.shared() is compute.shared()
