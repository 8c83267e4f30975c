"""One ``lora`` epoch with and without the frozen-prefix activation cache, same data, one invocation.

    python bench/prefix_cache_speed.py [--data DIR] [--images 8] [--batch 2] [--repeats 2] [--method lora]
                                       [--model litemedsam]

Data: the first ``--images`` images of ``--data`` (default ``../shared/data/ph2_skin_lesions``, one lesion per
image; synthetic blob images when absent). The two variants run interleaved (uncached, cached, uncached, ...)
``--repeats`` times, each a fresh run folder of one epoch with no validation split, so machine load changes
hit both alike; the best repeat of each is kept. Per variant:

- ``epoch_s``: wall time of ``train()`` (a fresh run: the cached variant includes filling its cache);
- ``step_s``: mean time of the steps after the first (what every further epoch costs per step);
- ``fill_s``: the cached variant's prefix-cache fill (time to its last ``embedding`` event).

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

from bench.prefix_stages import cpu_name  # noqa: E402
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
    stamps: list[tuple[str, float, float | None]] = []

    def record(event: ProgressEvent) -> None:
        stamps.append((event.state.value, time.perf_counter(), event.loss))

    t0 = time.perf_counter()
    train(model, ds, None, cfg, out, callback=record)
    total = time.perf_counter() - t0
    steps = [(t, loss) for state, t, loss in stamps if state == "training" and loss is not None]
    fills = [t for state, t, _ in stamps if state == "embedding"]
    gaps = np.diff([t for t, _ in steps])
    return {"epoch_s": total, "step_s": float(gaps.mean()) if len(gaps) else None,
            "fill_s": fills[-1] - t0 if fills else 0.0, "losses": [loss for _, loss in steps]}


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
    step_best = {v: min(x["step_s"] for x in rs if x["step_s"] is not None) for v, rs in runs.items()}
    worst_gap = max(abs(a - b) for a, b in zip(best["uncached"]["losses"], best["cached"]["losses"], strict=True))
    return {"model": args.model, "method": args.method, "data": source, "images": len(ds), "instances": n_instances,
            "batch": args.batch, "repeats": args.repeats, "runs": runs,
            "epoch_ratio": best["uncached"]["epoch_s"] / best["cached"]["epoch_s"],
            "step_ratio": step_best["uncached"] / step_best["cached"], "best_step_s": step_best,
            "max_loss_difference": worst_gap}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# `{result['method']}` epoch with and without the frozen-prefix cache ({result['model']})", "",
             f"CPU: {result['cpu']}, torch {result['torch']}, {result['threads']} threads. Data: {result['data']}, "
             f"{result['images']} images, {result['instances']} instances, batch {result['batch']}, "
             f"{result['repeats']} interleaved repeats (best kept).", "",
             "| variant | repeat | epoch s | cache fill s | s per step (after the first) |", "|---|---|---|---|---|"]
    for variant, runs in result["runs"].items():
        for r, run in enumerate(runs):
            step = f"{run['step_s']:.2f}" if run["step_s"] is not None else "-"
            lines.append(f"| {variant} | {r} | {run['epoch_s']:.1f} | {run['fill_s']:.1f} | {step} |")
    lines += ["", f"- epoch ratio (fresh run, cache fill included): {result['epoch_ratio']:.2f}x",
              f"- step ratio (every later epoch): {result['step_ratio']:.2f}x",
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
    import torch

    result = measure(args)
    result.update(cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "prefix_cache_speed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
