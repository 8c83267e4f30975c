"""Soak benchmark: the local stack under N locust users for M minutes, with RSS of every service sampled against
the memory budget it declares.

    python bench/soak.py                          # 8 users x 10 min; bench/results/soak-<date>-<cpu>.json
    python bench/soak.py --users 2 --minutes 1 --images generated --out /tmp/soak

What it does, in order:
1. starts the stack as ``samforge up`` does (``services.stack.start_stack``: trainer, encoder, decoder processes
   on loopback ports) on ``--model`` with small cache budgets, so that the bound is exercised:
   SAMFORGE_CACHE_BYTES = ``--encoder-cache-bytes`` (64 MiB), SAMFORGE_DECODER_CACHE_BYTES =
   ``--decoder-cache-bytes`` (32 MiB), tcmalloc preloaded as in the images (``--allocator``);
2. scrapes each service's /metrics for ``samforge_memory_budget_bytes``, the bytes it may hold above its idle
   base; without the gauge the budget is the service's cache setting, and the output says so;
3. warms up with ``--warmup-sessions`` sessions (the first includes SegmentEverything when the mix has it,
   the others none), then takes each service's base RSS;
4. runs ``--users`` locust users (locust as a library, no web UI) for ``--minutes``; each user repeats a
   session on a never-repeated image: Embed, 1-3 Segment calls of box / point prompts by embedding key, and a
   SegmentEverything (grid ``--everything-points`` per side) with probability ``--everything-probability``
   (bench/soakparts/workload.py), with a
   think time uniform in [0, ``--think-seconds``]; while RSS of each service tree is sampled every
   ``--sample-seconds`` (bench/soakparts/memory.py);
5. stops the users gracefully (the call in flight finishes), then the stack; writes
   ``<out>/soak-<YYYY-MM-DD>-<cpu slug>.json`` and ``.md`` and prints the markdown.

The JSON holds ``machine``, ``versions``, ``settings``, ``images``, ``duration_s``, ``requests`` (per RPC and in
total: requests, failures, req/s, p50 / p99 / mean ms; errors by RPC and gRPC code; ``unexpected_errors``:
every code but RESOURCE_EXHAUSTED), ``harness_exceptions``, ``max_calls_in_flight`` (above 1: the users'
calls overlapped), ``memory`` (per service: base, peak,
peak - base, budget and its source, ``within_budget``, the plateau verdict, the RSS series as [seconds,
bytes]; seconds count from the stack's start, the load window is ``load_window_s``), ``caches`` (the cache
metrics at the end) and ``exit_codes``. Plateau: the highest RSS of the last third of the load window is at
most ``--plateau-tolerance`` above the highest of the middle third. Exit status 1 when a service died.

The load generator shares the machine with the services; on a small VM its CPU use is part of the picture.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import locust  # noqa: F401  (monkey-patches the standard library for gevent; before any gRPC object)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bench, sam_core and services before any installed copy

from bench.soakparts import report  # noqa: E402
from bench.soakparts.images import KINDS, ImageSource  # noqa: E402
from bench.soakparts.memory import (  # noqa: E402
    Sampler,
    cache_bytes,
    declared_budget,
    scrape,
    service_memory,
    tree_rss_bytes,
)
from bench.soakparts.workload import Load, Stubs, next_session, run_session, user_class  # noqa: E402

if TYPE_CHECKING:
    from services.stack import Stack

MIB = 1 << 20
CACHE_SETTINGS = {"encoder": "SAMFORGE_CACHE_BYTES", "decoder": "SAMFORGE_DECODER_CACHE_BYTES"}
CACHE_METRIC_PREFIXES = ("samforge_cache_", "samforge_encodes")
PROGRESS_SECONDS = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--encoder-cache-bytes", type=int, default=64 * MIB)
    parser.add_argument("--decoder-cache-bytes", type=int, default=32 * MIB)
    parser.add_argument("--images", choices=KINDS, default="auto",
                        help="real: ../shared/data, varied per use; generated: synthetic scenes; auto: real if present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--think-seconds", type=float, default=1.0, help="think time per user: uniform in [0, this]")
    parser.add_argument("--deadline", type=float, default=60.0, help="deadline of every call, seconds")
    parser.add_argument("--everything-probability", type=float, default=0.1)
    parser.add_argument("--everything-points", type=int, default=8,
                        help="SegmentEverything grid points per side (the service default 16 is 4x the work)")
    parser.add_argument("--max-prompts", type=int, default=4, help="most prompts per Segment call")
    parser.add_argument("--warmup-sessions", type=int, default=2)
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="RSS sampling interval")
    parser.add_argument("--plateau-tolerance", type=float, default=0.05)
    parser.add_argument("--allocator", choices=("tcmalloc", "glibc"), default="tcmalloc",
                        help="the services' malloc (tcmalloc as in deploy/docker, when installed)")
    parser.add_argument("--var", help="the stack's state folder and logs (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return parser


def cache_bytes_asked(args: argparse.Namespace) -> dict[str, int]:
    """The cache budget of each service with a cache (keys of ``CACHE_SETTINGS``), from the command line."""
    return {"encoder": args.encoder_cache_bytes, "decoder": args.decoder_cache_bytes}


def stack_env(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """The services' extra environment (cache budgets, LD_PRELOAD) and the allocator they really get."""
    from bench.speedparts.common import tcmalloc_path

    env = {CACHE_SETTINGS[name]: str(value) for name, value in cache_bytes_asked(args).items()}
    env["LD_PRELOAD"] = ""
    lib = tcmalloc_path() if args.allocator == "tcmalloc" else None
    if lib:
        env["LD_PRELOAD"] = lib
    return env, "tcmalloc" if lib else "glibc"


def budgets(metrics_ports: dict[str, int], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each service's declared memory budget (the gauge, else its cache setting, else none)."""
    fallbacks = cache_bytes_asked(args)
    found = {}
    for name, port in metrics_ports.items():
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        found[name] = declared_budget(samples, fallbacks.get(name), CACHE_SETTINGS.get(name, ""))
    return found


def warm_up(load: Load, sessions: int) -> None:
    """``sessions`` sessions in this greenlet (the first with SegmentEverything unless the mix has none); any
    failure aborts the soak."""
    import dataclasses

    failures: list[str] = []

    def record(name: str, ms: float, length: int, code: str | None) -> None:
        if code is not None:
            failures.append(f"{name}: {code}")

    stubs = Stubs(load.encoder, load.decoder)
    try:
        for i in range(sessions):
            image, plan = next_session(load)
            everything = i == 0 and load.everything_probability > 0
            run_session(stubs, image, dataclasses.replace(plan, everything=everything), record, load)
    finally:
        stubs.close()
    if failures:
        raise RuntimeError(f"warm-up failed: {failures}")


def progress_line(env: Any, sampler: Sampler, elapsed: float) -> str:
    """One line of the run's state so far: requests, failures, the latest RSS of each service."""
    latest = {name: series[-1][1] // MIB for name, series in sampler.series.items() if series}
    return (f"[soak] {elapsed:.0f}s: {env.stats.total.num_requests} requests, {env.stats.total.num_failures} "
            f"failures; RSS MiB {latest}")


def run_load(load: Load, args: argparse.Namespace, sampler: Sampler, alive: Any) -> tuple[Any, float, str | None]:
    """The locust users for ``args.minutes`` (stopped early when ``alive()`` turns false; a progress line on
    stderr every ``PROGRESS_SECONDS``); the environment, the seconds the load lasted and why it stopped early
    (None when it did not)."""
    from locust.env import Environment

    env = Environment(user_classes=[user_class(load)], stop_timeout=load.deadline_s + 5)
    runner = env.create_local_runner()
    t0 = time.monotonic()
    runner.start(args.users, spawn_rate=args.users)
    aborted, reported = None, t0
    while time.monotonic() - t0 < 60 * args.minutes:
        time.sleep(min(1.0, max(0.0, 60 * args.minutes - (time.monotonic() - t0))))
        if not alive():
            aborted = "a service exited during the load"
            break
        if time.monotonic() - reported >= PROGRESS_SECONDS:
            reported = time.monotonic()
            print(progress_line(env, sampler, reported - t0), file=sys.stderr, flush=True)
    runner.stop()
    seconds = time.monotonic() - t0
    runner.quit()
    return env, seconds, aborted


def cache_metrics(metrics_ports: dict[str, int]) -> dict[str, Any]:
    """The cache and encode counters of the encoder and decoder at the end of the run."""
    found: dict[str, Any] = {}
    for name in ("encoder", "decoder"):
        samples = scrape(f"http://127.0.0.1:{metrics_ports[name]}/metrics")
        found[name] = {key: [{"labels": labels, "value": v} for labels, v in values]
                       for key, values in samples.items()
                       if key.startswith(CACHE_METRIC_PREFIXES) and not key.endswith("_created")}
    return found


def settings_record(args: argparse.Namespace) -> dict[str, Any]:
    return {"users": args.users, "minutes": args.minutes, "model": args.model, "seed": args.seed,
            "encoder_cache_bytes": args.encoder_cache_bytes, "decoder_cache_bytes": args.decoder_cache_bytes,
            "think_seconds": args.think_seconds, "deadline_s": args.deadline,
            "everything_probability": args.everything_probability, "everything_points": args.everything_points,
            "max_prompts": args.max_prompts,
            "warmup_sessions": args.warmup_sessions, "sample_seconds": args.sample_seconds,
            "plateau_tolerance": args.plateau_tolerance, "images_requested": args.images}


def samplers(stack: Stack) -> tuple[Sampler, Sampler]:
    """The RSS sampler of every service's process tree and the cache-bytes sampler of encoder and decoder."""
    rss = Sampler({name: (lambda pid=proc.pid: tree_rss_bytes(pid)) for name, proc in stack.processes.items()})
    caches = Sampler({name: (lambda port=stack.metrics[name]: cache_bytes(port)) for name in CACHE_SETTINGS},
                     t0=rss.t0)
    return rss, caches


def alive_now(stack: Stack) -> dict[str, bool]:
    return {name: proc.poll() is None for name, proc in stack.processes.items()}


def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """Steps 2-4 of the module docstring on a running stack: budgets, warm-up and base, the load with sampling."""
    rss, caches = samplers(stack)
    declared = budgets(stack.metrics, args)
    images = ImageSource(args.images, args.seed)
    load = Load(stack.addresses["encoder"], stack.addresses["decoder"], images, args.seed, args.deadline,
                args.think_seconds, args.max_prompts, args.everything_probability, args.everything_points)
    warm_up(load, args.warmup_sessions)
    base = rss.sample()
    print(f"[soak] {rss.now():.0f}s: warmed up; base RSS MiB { {k: v // MIB for k, v in base.items()} }",
          file=sys.stderr, flush=True)
    caches.sample()
    stop = threading.Event()
    for sampler in (rss, caches):
        threading.Thread(target=sampler.run, args=(args.sample_seconds, stop), daemon=True).start()
    start = rss.now()
    try:
        env, seconds, aborted = run_load(load, args, rss, lambda: all(alive_now(stack).values()))
    finally:
        stop.set()
    end = rss.now()
    rss.sample()
    alive = alive_now(stack)
    cache_settings = cache_bytes_asked(args)
    return {"aborted": aborted,
            "images": {"kind": images.kind, "files": len(images.files), "sent": images.sent,
                       "redrawn_duplicates": images.redrawn},
            "duration_s": round(seconds, 1), "load_window_s": [round(start, 2), round(end, 2)],
            "requests": report.requests_summary(env.stats, seconds),
            "harness_exceptions": sum(row["count"] for row in env.runner.exceptions.values()),
            "max_calls_in_flight": load.max_in_flight,
            "memory": {name: service_memory(rss.series[name], base[name], declared[name], start, end,
                                            args.plateau_tolerance, caches.series.get(name), cache_settings.get(name))
                       for name in stack.processes},
            "caches": cache_metrics(stack.metrics) if all(alive.values()) else {}, "alive_at_end": alive}


def soak(args: argparse.Namespace, var: Path) -> dict[str, Any]:
    """Steps 1-5 of the module docstring against a stack in ``var``; the result (not yet written)."""
    from services.stack import start_stack

    extra_env, allocator = stack_env(args)
    stack = start_stack(var, model=args.model, extra_env=extra_env)
    try:
        measured = measure(stack, args)
    finally:
        exit_codes = stack.stop()
    return {"kind": "soak", "date": datetime.date.today().isoformat(), "machine": report.machine(allocator),
            "versions": report.versions(), "settings": settings_record(args), **measured, "exit_codes": exit_codes}


def main() -> int:
    args = build_parser().parse_args()
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()  # before any channel: blocking calls then yield to the other users
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = soak(args, Path(args.var) if args.var else Path(tmp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = report.result_path(out, result["date"], result["machine"].get("cpu_model", ""))
    path.write_text(json.dumps(result, indent=2))
    text = report.markdown(result)
    path.with_suffix(".md").write_text(text)
    print(text, flush=True)
    print(f"written: {path}", flush=True)
    return 0 if all(result["alive_at_end"].values()) and not result["aborted"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
