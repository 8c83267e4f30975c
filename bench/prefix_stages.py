"""Where the image encoder's training time goes: FLOPs and wall time of each encoder stage under ``lora``.

    python bench/prefix_stages.py [--model litemedsam] [--batch 4] [--repeats 3]

For every stage of :meth:`~sam_core.modeling.family.SegmentationModel.encoder_stages` (LiteMedSAM's TinyViT:
patch_embed, the full-resolution conv stage ``layers.0``, the three attention stages, the neck) it reports the
forward FLOPs (``torch.utils.flop_counter``) and the forward time at ``--batch`` images of the model's input
size (the best of ``--repeats``, in this process's CPU seconds: on a shared machine wall time swings with the
other processes' load), then one forward + backward of the whole encoder with ``lora`` injected (the
gradient stops at the first trained block: the frozen prefix costs its forward only) against the same step
starting from the prefix's activations. Writes ``bench/results/prefix_stages.{json,md}`` with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.speedparts.common import cpu_model_and_isa  # noqa: E402
from sam_core.adapters.artifact import adapted_net  # noqa: E402
from sam_core.modeling.registry import load_model  # noqa: E402
from sam_core.training.methods import MethodConfig, train_mode  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    return str(cpu_model_and_isa().get("cpu_model") or platform.processor() or "unknown")


def write_results(out: Path, name: str, result: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """Record the machine in ``result``, write ``<out>/<name>.json`` and ``.md`` and print the markdown."""
    result.update(cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(render(result))
    print(render(result))


def best_of(repeats: int, fn: Any) -> float:
    """The least process CPU seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def measure(model_name: str, batch: int, repeats: int) -> dict[str, Any]:
    model = load_model(model_name)
    torch.manual_seed(0)
    net = adapted_net(model, MethodConfig(method="lora"))
    train_mode(net)
    size = model.spec.img_size
    x = torch.randn(batch, 3, size, size)
    stages: list[dict[str, Any]] = []
    act = x
    with torch.no_grad():
        for name, stage in net.encoder_stages():
            with FlopCounterMode(display=False) as counter:
                out = stage(act)
            seconds = best_of(repeats, lambda s=stage, a=act: s(a))
            stages.append({"stage": name, "gflops_fwd": counter.get_total_flops() / 1e9, "seconds_fwd": seconds,
                           "out_shape": list(out.shape)})
            act = out
    total_flops = sum(s["gflops_fwd"] for s in stages)
    total_time = sum(s["seconds_fwd"] for s in stages)
    for s in stages:
        s["flop_share"], s["time_share"] = s["gflops_fwd"] / total_flops, s["seconds_fwd"] / total_time
    cut = net.encoder_prefix(net.attention_sites()[0].name)
    assert cut is not None
    with torch.no_grad():
        acts = cut.prefix(x)

    def whole() -> None:
        feats = net.encode(x)
        sum(f.float().pow(2).mean() for f in feats.values()).backward()

    def suffix() -> None:
        feats = cut.suffix(acts)
        sum(f.float().pow(2).mean() for f in feats.values()).backward()

    return {"model": model_name, "batch": batch, "img_size": size, "cut": cut.cut, "stages": stages,
            "encoder_fwd_bwd_seconds": best_of(repeats, whole), "suffix_fwd_bwd_seconds": best_of(repeats, suffix),
            "prefix_fwd_seconds": best_of(repeats, lambda: cut.prefix(x).detach())}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Encoder stages under lora: {result['model']}, {result['img_size']} px, batch {result['batch']}",
             "", f"CPU: {result['cpu']}, torch {result['torch']}, {result['threads']} threads.", "",
             "Times are process CPU seconds (all threads), the best of the repeats.", "",
             "| stage | output | GFLOP fwd | FLOP share | fwd CPU s | time share |", "|---|---|---|---|---|---|"]
    for s in result["stages"]:
        lines.append(f"| {s['stage']} | {'x'.join(map(str, s['out_shape']))} | {s['gflops_fwd']:.2f} | "
                     f"{s['flop_share']:.1%} | {s['seconds_fwd']:.3f} | {s['time_share']:.1%} |")
    whole, suffix = result["encoder_fwd_bwd_seconds"], result["suffix_fwd_bwd_seconds"]
    lines += ["", f"lora freezes everything before `{result['cut']}` (the first attention block).", "",
              f"- encoder forward + backward with lora, from images: {whole:.3f} s",
              f"- the same from cached prefix activations: {suffix:.3f} s (ratio {whole / suffix:.2f}x)",
              f"- the frozen prefix's forward alone: {result['prefix_fwd_seconds']:.3f} s", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    write_results(Path(args.out), "prefix_stages", measure(args.model, args.batch, args.repeats), markdown)


if __name__ == "__main__":
    main()
