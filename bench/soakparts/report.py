"""The soak's result: machine facts and versions, request figures from locust's stats, the file name, and the
markdown summary.

* ``machine()``: CPU model and matmul ISA flags (as bench/speed.py records them), cores, memory, allocator,
  load average.
* ``versions()``: Python and the packages the figures depend on, and the git commit of this checkout.
* ``requests_summary(stats, seconds)``: per RPC and in total the request count, failures, throughput
  (requests / ``seconds``, the measured load window), p50 / p99 / mean latency in ms over every request of
  that RPC (locust's percentiles, which keep response times to 2 significant digits above 100 ms), and the
  failures by gRPC status code.
* ``result_path(out, date, cpu_model)``: ``<out>/soak-<YYYY-MM-DD>-<cpu slug>.json``.
* ``markdown(result)``: the machine line, a table per RPC, a table per service's memory, the verdicts. Pure.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from bench.soakparts.memory import MIB
from bench.soakparts.workload import EXPECTED_CODES, RPCS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "numpy", "grpcio", "protobuf", "locust", "gevent", "onnxruntime")


def machine(allocator: str) -> dict[str, Any]:
    """CPU model and ISA flags, cores, total memory, the services' allocator, the load average (other work on
    the machine skews every figure)."""
    from bench.speedparts.common import cpu_model_and_isa

    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
    return {"cpu": platform.machine(), **cpu_model_and_isa(), "cores": os.cpu_count(),
            "memory_gib": round(mem_kib / (1 << 20), 1), "allocator": allocator,
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def versions() -> dict[str, Any]:
    """Python, the packages of ``PACKAGES`` that are installed, and the checkout's commit (+ "-dirty")."""
    from importlib import metadata

    found: dict[str, Any] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    git = ["git", "-C", str(ROOT)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        found["samforge_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        found["samforge_commit"] = None
    return found


def cpu_slug(cpu_model: str) -> str:
    """``AMD EPYC 7B13 64-Core Processor`` -> ``amd-epyc-7b13-64-core-processor`` (at most 48 characters)."""
    text = re.sub(r"\((r|tm)\)|@.*$", "", cpu_model.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:48].strip("-")
    return slug or platform.machine() or "unknown-cpu"


def result_path(out: Path, date: str, cpu_model: str) -> Path:
    return out / f"soak-{date}-{cpu_slug(cpu_model)}.json"


def entry_figures(entry: Any, seconds: float) -> dict[str, Any]:
    """One locust ``StatsEntry`` as counts, throughput and latency."""
    count = entry.num_requests
    return {"requests": count, "failures": entry.num_failures, "rps": round(count / seconds, 3) if seconds else None,
            "p50_ms": entry.get_response_time_percentile(0.5) if count else None,
            "p99_ms": entry.get_response_time_percentile(0.99) if count else None,
            "mean_ms": round(entry.avg_response_time, 1) if count else None}


def requests_summary(stats: Any, seconds: float) -> dict[str, Any]:
    """{rpcs: {name: figures}, total: figures, errors: {rpc: {code: n}}, unexpected_errors, expected_errors}."""
    rpcs = {name: entry_figures(stats.get(name, "grpc"), seconds) for name in RPCS}
    errors: dict[str, dict[str, int]] = {}
    for error in stats.errors.values():
        by_code = errors.setdefault(error.name, {})
        by_code[str(error.error)] = by_code.get(str(error.error), 0) + error.occurrences
    expected = sum(n for codes in errors.values() for code, n in codes.items() if code in EXPECTED_CODES)
    unexpected = sum(n for codes in errors.values() for code, n in codes.items() if code not in EXPECTED_CODES)
    return {"rpcs": rpcs, "total": entry_figures(stats.total, seconds), "errors": errors,
            "expected_codes": sorted(EXPECTED_CODES), "expected_errors": expected, "unexpected_errors": unexpected}


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def memory_rows(memory: dict[str, Any]) -> list[str]:
    """One markdown row per service: base, peak, peak - base, budget, verdicts."""
    rows = ["| service | base MiB | peak MiB | peak - base MiB | budget MiB (source) | within budget "
            "| last / middle third | plateau |", "|---|---|---|---|---|---|---|---|"]
    for name, m in memory.items():
        p = m["plateau"]
        growth = "n/a" if p["verdict"] is None else f"{p['last_over_middle']:+.1%}"
        source = "gauge" if m["budget"]["source"].startswith("gauge") else m["budget"]["source"].split(" (")[0]
        rows.append(f"| {name} | {mib(m['base_bytes'])} | {mib(m['peak_bytes'])} | {mib(m['peak_minus_base_bytes'])} "
                    f"| {mib(m['budget']['bytes'])} ({source}) | {m['within_budget']} | {growth} "
                    f"| {p['verdict']} |")
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The summary printed at the end of a soak (and written next to the JSON)."""
    s, req = result["settings"], result["requests"]
    lines = [f"Soak: {s['users']} users x {s['minutes']} min ({result['duration_s']} s of load), {s['model']}, "
             f"encoder cache {mib(s['encoder_cache_bytes'])} MiB, decoder cache {mib(s['decoder_cache_bytes'])} MiB, "
             f"{result['images']['kind']} images ({result['images']['sent']} sent, all distinct)",
             f"Machine: {result['machine']}", "",
             "| RPC | requests | failures | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name, r in [*req["rpcs"].items(), ("total", req["total"])]:
        lines.append(f"| {name} | {r['requests']} | {r['failures']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} |")
    lines += ["", f"Errors by code: {req['errors'] or 'none'}; unexpected: {req['unexpected_errors']} "
                  f"(expected codes: {', '.join(req['expected_codes'])}); harness exceptions: "
                  f"{result['harness_exceptions']}", ""]
    lines += memory_rows(result["memory"])
    lines += ["", f"Plateau: highest RSS of the last third at most {s['plateau_tolerance']:.0%} above the middle "
                  "third's (inconclusive: the cache was not yet full at the middle third); base = RSS after the "
                  "warm-up.", ""]
    return "\n".join(lines)
