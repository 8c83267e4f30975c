"""How OpenMP's wait policy changes torch on a shared CPU: unset, ACTIVE (spin), PASSIVE (yield), one invocation.

    python bench/omp_wait_policy.py [--models tiny_sam2 litemedsam] [--processes 1 3] [--seconds 20]

For each model, process count and policy, ``--processes`` child processes start together with
``OMP_WAIT_POLICY`` set or unset (OpenMP reads it when torch loads; unset is libgomp's default, spinning a
while before sleeping) and 2 torch threads each; every child encodes one
batch of 2 images in a loop for ``--seconds`` and reports its median seconds per encode. One process is
the quiet case (the policy's own cost); three is what the test suite does to two cores (pytest, a service
and a training worker). The cells run interleaved by policy so machine load changes hit both alike.

Writes ``bench/results/omp_wait_policy.{json,md}`` with the CPU named and the machine's load average before and
after (other work on the machine inflates every figure; the ratio within a row is what to read).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prefix_stages import write_results  # noqa: E402

POLICIES = ("unset", "ACTIVE", "PASSIVE")


def child(model_name: str, seconds: float) -> None:
    """The child's loop: print the median seconds of one encode of a 2-image batch (2 torch threads)."""
    import torch

    from sam_core.modeling.registry import load_model

    torch.set_num_threads(2)
    model = load_model(model_name)
    x = torch.randn(2, 3, model.spec.img_size, model.spec.img_size)
    times: list[float] = []
    with torch.no_grad():
        model.net.encode(x)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            model.net.encode(x)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "encodes": len(times)}))


def cell(model_name: str, processes: int, policy: str, seconds: float) -> dict[str, Any]:
    """Start ``processes`` children together; the median over children of their median encode time."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, __file__, "--child", model_name, "--seconds", str(seconds)]
    children = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)  # nosec B603  # our own script
                for _ in range(processes)]
    reports = []
    for proc in children:
        out, _ = proc.communicate(timeout=seconds * 20 + 300)
        if proc.returncode != 0:
            raise RuntimeError(f"child for {model_name} ({policy}) exited {proc.returncode}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return {"model": model_name, "processes": processes, "policy": policy,
            "median_s": statistics.median(r["median_s"] for r in reports),
            "encodes": sum(r["encodes"] for r in reports)}


def render(result: dict[str, Any]) -> str:
    lines = ["# OpenMP wait policy: unset (libgomp's default), ACTIVE (spin), PASSIVE (yield)", "",
             f"CPU: {result['cpu']}, torch {result['torch']}, 2 threads per process. Load average before "
             f"{result['load_before']}, after {result['load_after']}.", "",
             "| model | processes | unset s/encode | ACTIVE s/encode | PASSIVE s/encode | unset / PASSIVE "
             "| ACTIVE / PASSIVE |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['processes']} | {row['unset']:.4f} | {row['ACTIVE']:.4f} | "
                     f"{row['PASSIVE']:.4f} | {row['unset'] / row['PASSIVE']:.2f}x | "
                     f"{row['ACTIVE'] / row['PASSIVE']:.2f}x |")
    lines += ["", "(median seconds per encode of a 2-image batch; with several processes, the median over them)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny_sam2", "litemedsam"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.seconds)
        return 0
    result: dict[str, Any] = {"load_before": os.getloadavg(), "rows": []}
    for model_name in args.models:
        for processes in args.processes:
            row: dict[str, Any] = {"model": model_name, "processes": processes}
            for policy in POLICIES:
                row[policy] = cell(model_name, processes, policy, args.seconds)["median_s"]
            result["rows"].append(row)
    result["load_after"] = os.getloadavg()
    write_results(args.out, "omp_wait_policy", result, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
