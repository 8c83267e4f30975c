"""One ``lora`` epoch with and without the frozen-prefix activation cache, same data, one invocation.

    python bench/prefix_cache_speed.py [--data DIR] [--images 8] [--batch 2] [--repeats 2] [--method lora]
                                       [--model litemedsam]

Data: the first ``--images`` images of ``--data`` (default ``../shared/data/ph2_skin_lesions``, one lesion per
image; synthetic blob images when absent). The two variants run interleaved (uncached, cached, uncached, ...)
``--repeats`` times, each a fresh run folder of one epoch with no validation split, so machine load changes
hit both alike; the best repeat of each is kept. Per variant, in wall seconds and in this process's CPU
seconds (``time.process_time``: less sensitive to other processes sharing the cores):

- ``epoch_s`` / ``epoch_cpu_s``: ``train()`` (a fresh run: the cached variant includes filling its cache);
- ``step_s`` / ``step_cpu_s``: mean of the steps after the first (what every further epoch costs per step);
- ``fill_s``: the cached variant's prefix-cache fill (wall time to its last ``embedding`` event).

Writes ``bench/results/prefix_cache_speed.{json,md}`` with the CPU named, the ratios and the per-step losses
of both variants (equal within 1e-6).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prefix_stages import write_results  # noqa: E402
from sam_core.data.dataset import SegmentationDataset, load_dataset  # noqa: E402
from sam_core.data.splits import split_first_last  # noqa: E402
from sam_core.modeling.registry import LoadedModel, load_model  # noqa: E402
from sam_core.training.config import ProgressEvent, TrainConfig  # noqa: E402
from sam_core.training.loop import train  # noqa: E402
from sam_core.training.methods import MethodConfig  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ph2_skin_lesions"


def dataset(data: Path, n_images: int, scratch: Path) -> tuple[SegmentationDataset, str]:
    if data.is_dir():
        return split_first_last(load_dataset(data), n_images, 0)[0], str(data)
    from tests.conftest import write_blob_dataset

    return load_dataset(write_blob_dataset(scratch / "blobs", n_images=n_images, height=480, width=640)), \
        "synthetic blobs 640x480"


def one_run(model: LoadedModel, ds: SegmentationDataset, cfg: TrainConfig, out: Path) -> dict[str, Any]:
    stamps: list[tuple[str, float, float, float | None]] = []

    def record(event: ProgressEvent) -> None:
        stamps.append((event.state.value, time.perf_counter(), time.process_time(), event.loss))

    t0, c0 = time.perf_counter(), time.process_time()
    train(model, ds, None, cfg, out, callback=record)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = [(t, c, loss) for state, t, c, loss in stamps if state == "training" and loss is not None]
    fills = [t for state, t, _, _ in stamps if state == "embedding"]
    gaps, cpu_gaps = np.diff([t for t, _, _ in steps]), np.diff([c for _, c, _ in steps])
    return {"epoch_s": total, "epoch_cpu_s": cpu, "step_s": float(gaps.mean()) if len(gaps) else None,
            "step_cpu_s": float(cpu_gaps.mean()) if len(cpu_gaps) else None,
            "fill_s": fills[-1] - t0 if fills else 0.0, "losses": [loss for _, _, loss in steps]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        ds, source = dataset(Path(args.data), args.images, Path(scratch))
        n_instances = sum(len(s.instances) for s in ds)
        runs: dict[str, list[dict[str, Any]]] = {"uncached": [], "cached": []}
        for r in range(args.repeats):
            for variant in runs:
                cfg = TrainConfig(method=MethodConfig(args.method), epochs=1, batch_size=args.batch,
                                  lr=3e-4, warmup_steps=1, checkpoint_every=10**6,
                                  prefix_cache=variant == "cached")
                result = one_run(model, ds, cfg, Path(scratch) / f"{variant}{r}")
                print(json.dumps({"variant": variant, "repeat": r, **result}), flush=True)
                runs[variant].append(result)
    best = {v: min(rs, key=lambda x: x["epoch_s"]) for v, rs in runs.items()}

    def least(key: str) -> dict[str, float]:
        return {v: min(x[key] for x in rs if x[key] is not None) for v, rs in runs.items()}

    epoch_cpu, step_best, step_cpu = least("epoch_cpu_s"), least("step_s"), least("step_cpu_s")
    worst_gap = max(abs(a - b) for a, b in zip(best["uncached"]["losses"], best["cached"]["losses"], strict=True))
    return {"model": args.model, "method": args.method, "data": source, "images": len(ds), "instances": n_instances,
            "batch": args.batch, "repeats": args.repeats, "runs": runs,
            "epoch_ratio": best["uncached"]["epoch_s"] / best["cached"]["epoch_s"],
            "step_ratio": step_best["uncached"] / step_best["cached"], "best_step_s": step_best,
            "epoch_cpu_ratio": epoch_cpu["uncached"] / epoch_cpu["cached"],
            "step_cpu_ratio": step_cpu["uncached"] / step_cpu["cached"], "best_step_cpu_s": step_cpu,
            "max_loss_difference": worst_gap}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# `{result['method']}` epoch with and without the frozen-prefix cache ({result['model']})", "",
             f"CPU: {result['cpu']}, torch {result['torch']}, {result['threads']} threads. Data: {result['data']}, "
             f"{result['images']} images, {result['instances']} instances, batch {result['batch']}, "
             f"{result['repeats']} interleaved repeats (best kept).", "",
             "| variant | repeat | epoch s | epoch CPU s | cache fill s | s per step | CPU s per step |",
             "|---|---|---|---|---|---|---|"]
    for variant, runs in result["runs"].items():
        for r, run in enumerate(runs):
            step, cpu = (f"{run[k]:.2f}" if run[k] is not None else "-" for k in ("step_s", "step_cpu_s"))
            lines.append(f"| {variant} | {r} | {run['epoch_s']:.1f} | {run['epoch_cpu_s']:.1f} | {run['fill_s']:.1f} "
                         f"| {step} | {cpu} |")
    lines += ["", "(per step: the mean of the steps after the first)", "",
              f"- epoch ratio (fresh run, cache fill included): {result['epoch_ratio']:.2f}x wall, "
              f"{result['epoch_cpu_ratio']:.2f}x CPU",
              f"- step ratio (every later epoch): {result['step_ratio']:.2f}x wall, "
              f"{result['step_cpu_ratio']:.2f}x CPU",
              f"- largest per-step loss difference: {result['max_loss_difference']:.2e}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    write_results(Path(args.out), "prefix_cache_speed", measure(args), markdown)


if __name__ == "__main__":
    main()
