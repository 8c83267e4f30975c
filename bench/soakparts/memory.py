"""Memory of the service processes during a soak: RSS and cache samples, the budget each service declares, the
verdicts.

* ``tree_rss_bytes(pid)``: VmRSS (``/proc/<pid>/status``) of the process plus all its descendants (found by
  parent pid in ``/proc/*/stat``); 0 once the process is gone. ``cache_bytes(port)``: the sum of a service's
  ``samforge_cache_bytes`` gauge on its /metrics (None when the page cannot be read).
* ``Sampler(probes)``: ``sample()`` appends (seconds since the sampler's start, value) per named probe (a
  probe returning None adds nothing); ``run(interval, stop)`` samples until ``stop`` (a
  ``threading.Event``) is set. Under ``bench/soak.py`` the standard library is monkey-patched, so the thread
  is a greenlet and ``Event.wait`` yields to the locust users.
* ``scrape(url)`` reads a Prometheus text page into {sample name: [(labels, value)]}; ``declared_budget``
  takes the gauge ``samforge_memory_budget_bytes`` (the bytes a service may hold above its idle base; the
  sum of its samples when it has labels) and otherwise the fallback given (the service's cache budget
  setting), saying which it used.
* ``plateau(series, start, end, tolerance, cache)``: the run [start, end] is cut into thirds by time; the
  verdict is ``plateau`` when the highest RSS of the last third is at most ``tolerance`` (a fraction) above the
  highest of the middle third, else ``growing``. The first third holds the ramp-up and is not judged. When
  the service's cache held less than ``CACHE_FULL_FRACTION`` of its setting at the start of the middle third,
  RSS was still rising by design and the verdict is ``inconclusive`` (the run was too short to fill it).
  Also reported: the least-squares slope of RSS over the last two thirds in MiB per minute.
* ``service_memory(...)``: base (RSS after the warm-up), peak, peak - base against the budget, the plateau,
  the RSS and cache series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BUDGET_GAUGE = "samforge_memory_budget_bytes"
CACHE_GAUGE = "samforge_cache_bytes"
CACHE_FULL_FRACTION = 0.9
MIB = 1 << 20
Series = list[tuple[float, int]]


def process_rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes; 0 when it is gone or has no memory (a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def descendants(pid: int) -> list[int]:
    """The pids of every process below ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and all its descendants, in bytes."""
    return sum(process_rss_bytes(p) for p in [pid, *descendants(pid)])


@dataclass
class Sampler:
    """Time series of named probes, timed from ``t0`` (default: the sampler's creation)."""

    probes: dict[str, Callable[[], int | None]]
    t0: float = field(default_factory=time.monotonic)
    series: dict[str, Series] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sample(self) -> dict[str, int]:
        """One sample of every probe (those answering None are left out), appended to its series and returned."""
        t = round(self.now(), 2)
        values = {name: probe() for name, probe in self.probes.items()}
        found = {name: value for name, value in values.items() if value is not None}
        for name, value in found.items():
            self.series.setdefault(name, []).append((t, value))
        return found

    def run(self, interval: float, stop: threading.Event) -> None:
        """Sample every ``interval`` seconds until ``stop`` is set."""
        while not stop.wait(interval):
            self.sample()


def scrape(url: str, timeout: float = 10.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A Prometheus text page as {sample name: [(labels, value), ...]}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as reply:  # nosec B310  # a loopback http URL built by the caller
        text = reply.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return samples


def cache_bytes(port: int) -> int | None:
    """The sum of the ``samforge_cache_bytes`` samples on the /metrics page at ``port``; None when unreadable."""
    try:
        samples = scrape(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    except OSError:
        return None
    return int(sum(v for _, v in samples.get(CACHE_GAUGE, [])))


def declared_budget(samples: dict[str, list[tuple[dict[str, str], float]]],
                    fallback: int | None, fallback_name: str) -> dict[str, Any]:
    """{bytes, source, samples}: the budget gauge's value (summed over its labels), else ``fallback``."""
    gauge = samples.get(BUDGET_GAUGE)
    if gauge:
        return {"bytes": int(sum(v for _, v in gauge)), "source": f"gauge {BUDGET_GAUGE}",
                "samples": [{"labels": labels, "value": v} for labels, v in gauge]}
    if fallback is None:
        return {"bytes": None, "source": f"none (no {BUDGET_GAUGE} gauge and no cache setting)"}
    return {"bytes": fallback, "source": f"fallback: {fallback_name} (no {BUDGET_GAUGE} gauge on /metrics)"}


def window(series: Series, start: float, end: float) -> Series:
    """The samples with start <= t <= end."""
    return [(t, v) for t, v in series if start <= t <= end]


def cache_filling(cache: Series | None, setting: int | None, at: float) -> bool:
    """Whether the cache held less than ``CACHE_FULL_FRACTION`` of ``setting`` at time ``at`` (the last sample
    before it); False when there is no cache series or setting."""
    if not cache or not setting:
        return False
    before = [v for t, v in cache if t <= at] or [cache[0][1]]
    return before[-1] < CACHE_FULL_FRACTION * setting


def plateau(series: Series, start: float, end: float, tolerance: float, cache: Series | None = None,
            cache_setting: int | None = None) -> dict[str, Any]:
    """The plateau verdict of the module docstring over the samples in [start, end]."""
    third = (end - start) / 3
    middle = [v for _, v in window(series, start + third, start + 2 * third)]
    last = [v for _, v in window(series, start + 2 * third, end)]
    tail = window(series, start + third, end)
    if not middle or not last:
        return {"verdict": None, "reason": "too few samples in the middle or last third"}
    growth = max(last) / max(middle) - 1 if max(middle) else 0.0
    slope = None
    if len(tail) >= 2 and tail[-1][0] > tail[0][0]:
        times, values = np.array([t for t, _ in tail]), np.array([v for _, v in tail], dtype=float)
        slope = round(float(np.polyfit(times, values, 1)[0]) * 60 / MIB, 2)
    verdict = "plateau" if growth <= tolerance else "growing"
    filling = cache_filling(cache, cache_setting, start + third)
    return {"verdict": "inconclusive" if filling else verdict, "tolerance": tolerance,
            "cache_still_filling_at_middle_third": filling,
            "middle_third_max_bytes": max(middle), "last_third_max_bytes": max(last),
            "last_over_middle": round(growth, 4), "slope_mib_per_min_last_two_thirds": slope,
            "samples": {"middle": len(middle), "last": len(last)}}


def service_memory(series: Series, base: int, budget: dict[str, Any], start: float, end: float,
                   tolerance: float, cache: Series | None = None, cache_setting: int | None = None) -> dict[str, Any]:
    """Base, peak (in [start, end]), peak - base against the budget, the plateau verdict, the series."""
    values = [v for _, v in window(series, start, end)] or [base]
    peak = max(values)
    limit = budget["bytes"]
    return {"base_bytes": base, "peak_bytes": peak, "peak_minus_base_bytes": peak - base, "budget": budget,
            "within_budget": None if limit is None else peak - base <= limit,
            "plateau": plateau(series, start, end, tolerance, cache, cache_setting),
            "series": [[t, v] for t, v in series], "cache_series": [[t, v] for t, v in cache or []]}
