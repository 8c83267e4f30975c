"""The ``samforge`` command line.

``samforge predict`` runs the predictor in-process (no services needed). Heavy imports happen inside
the sub-command so ``samforge --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sam_core.errors import InvalidInput, SamforgeError
from services.cli_data import add_data_args
from services.cli_finetune import add_train_args
from services.stack import add_up_args

if TYPE_CHECKING:
    from sam_core.inference.prompts import Prompt
    from sam_core.modeling.registry import LoadedModel


def _floats(text: str, count: int | tuple[int, ...], what: str) -> list[float]:
    counts = (count,) if isinstance(count, int) else count
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(values) not in counts:
        raise argparse.ArgumentTypeError(f"{what} needs {' or '.join(map(str, counts))} numbers, got {text!r}")
    return values


def _box(text: str) -> list[float]:
    return _floats(text, 4, "--box x0,y0,x1,y1")


def _point(text: str) -> list[float]:
    values = _floats(text, (2, 3), "--point x,y[,label]")
    return values if len(values) == 3 else [*values, 1.0]


def build_prompts(boxes: Sequence[Sequence[float]], points: Sequence[Sequence[float]]) -> list[Prompt]:
    """CLI prompt rules: each --box is one prompt; all --point's form one prompt; with exactly one
    --box and some --point's, they combine into a single box+points prompt."""
    import numpy as np

    from sam_core.inference.prompts import Prompt

    coords = np.array([p[:2] for p in points], dtype=np.float64) if points else None
    labels = np.array([int(p[2]) for p in points]) if points else None
    if len(boxes) == 1 and points:
        return [Prompt(box=np.asarray(boxes[0], dtype=np.float64), point_coords=coords, point_labels=labels)]
    prompts = [Prompt.from_box(b) for b in boxes]
    if points:
        prompts.append(Prompt(point_coords=coords, point_labels=labels))
    return prompts


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from sam_core.inference.predictor import Predictor
    from sam_core.inference.tiling import decode_tiled, encode_tiled
    from sam_core.io.images import load_image
    from sam_core.io.masks import encode_png, mask_bbox
    from sam_core.modeling.registry import load_model

    if not args.box and not args.point:
        raise SystemExit("samforge predict: give at least one --box or --point")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.checkpoint)
    predictor = Predictor(loaded)
    t1 = time.perf_counter()
    image = load_image(args.image)
    prompts = build_prompts(args.box or [], args.point or [])
    t2 = time.perf_counter()
    if args.tile:
        tiled = encode_tiled(predictor, image, overlap=args.overlap)
        t3 = time.perf_counter()
        result = decode_tiled(predictor, tiled, prompts, multimask=args.multimask)
    else:
        embedding = predictor.encode_one(image)
        t3 = time.perf_counter()
        result = predictor.decode(embedding, prompts, multimask=args.multimask)
    t4 = time.perf_counter()
    best = result.iou_scores.argmax(axis=1)
    masks = result.masks[np.arange(len(prompts)), best]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_png(masks.any(axis=0)))
    files = [str(out)]
    if len(prompts) > 1:
        for i, mask in enumerate(masks):
            path = out.with_name(f"{out.stem}_{i}{out.suffix}")
            path.write_bytes(encode_png(mask))
            files.append(str(path))
    summary = {
        "model_id": loaded.model_id,
        "image": str(args.image),
        "image_size": list(image.shape[:2]),
        "tiled": bool(args.tile),
        "prompts": [
            {"index": i, "iou_score": round(float(result.iou_scores[i, best[i]]), 4),
             "stability_score": round(float(result.stability_scores[i, best[i]]), 4),
             "area": int(masks[i].sum()), "bbox": mask_bbox(masks[i])}
            for i in range(len(prompts))
        ],
        "timing_ms": {"load_model": round(1e3 * (t1 - t0), 1), "read_image": round(1e3 * (t2 - t1), 1),
                      "encode": round(1e3 * (t3 - t2), 1), "decode": round(1e3 * (t4 - t3), 1)},
        "outputs": files,
    }
    print(json.dumps(summary, indent=2, default=lambda v: v if not hasattr(v, "tolist") else v.tolist()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    summary = run_demo(out_dir=args.out, model=args.model, image_path=args.image)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export the encoder or decoder graph; with --check-image, compare it with PyTorch on that image."""
    from sam_core.export.onnx_decoder import export_decoder_onnx
    from sam_core.export.onnx_encoder import export_encoder_onnx
    from sam_core.modeling.registry import load_model

    loaded = load_model(args.model, args.checkpoint)
    t0 = time.perf_counter()
    export = export_encoder_onnx if args.part == "encoder" else export_decoder_onnx
    path = export(loaded, args.out)
    summary: dict[str, Any] = {"part": args.part, "model_id": loaded.model_id, "path": str(path),
                               "bytes": path.stat().st_size, "export_s": round(time.perf_counter() - t0, 2)}
    if args.check_image:
        summary.update(_onnx_check(loaded, args.part, path, args.check_image))
    print(json.dumps(summary, indent=2))
    return 0


def _onnx_check(loaded: LoadedModel, part: str, path: Path, image_path: str) -> dict[str, Any]:
    """The exported ``part`` vs PyTorch on one image and three box prompts: per-level max |feature
    difference| (encoder), low-res logit and IoU max |difference| and the masks' minimum IoU (both parts),
    and each runtime's time for the compared step (``timing_ms``: encode or decode)."""
    import numpy as np

    from sam_core.export.onnx_decoder import make_onnx_predictor
    from sam_core.export.onnx_encoder import OnnxEncoder
    from sam_core.inference.predictor import Predictor
    from sam_core.inference.prompts import Prompt
    from sam_core.inference.types import Embedding
    from sam_core.io.images import load_image
    from sam_core.modeling.preprocess import preprocess

    image = load_image(image_path)
    torch_predictor = Predictor(loaded, optimize_encoder=False, fast_decoder=False)
    ref = torch_predictor.encode_one(image)
    h, w = image.shape[:2]
    prompts = [Prompt(box=np.array([w * a, h * a, w * (1 - a), h * (1 - a)], np.float32)) for a in (0.1, 0.25, 0.4)]
    report: dict[str, Any] = {}
    if part == "encoder":
        batch = preprocess(image, loaded.spec)[0]
        started = time.perf_counter()
        torch_predictor.encode_tensor(batch)
        torch_s = time.perf_counter() - started
        started = time.perf_counter()
        features = loaded.net.features_from_encoder(OnnxEncoder(path)(batch))
        onnx_s = time.perf_counter() - started
        ours = Embedding(features, ref.original_size, ref.input_size, ref.model_id, ref.preprocess_version,
                         ref.encoder_adapter)
        report["max_abs_error"] = {name: float((features[name] - level).abs().max())
                                   for name, level in ref.features.items()}
        report["embedding_max_abs_error"] = max(report["max_abs_error"].values())
        a, b = torch_predictor.decode(ref, prompts), torch_predictor.decode(ours, prompts)
    else:
        onnx_predictor = make_onnx_predictor(loaded, onnx_path=path)
        started = time.perf_counter()
        b = onnx_predictor.decode(ref, prompts)
        onnx_s = time.perf_counter() - started
        started = time.perf_counter()
        a = torch_predictor.decode(ref, prompts)
        torch_s = time.perf_counter() - started
    assert a.low_res_logits is not None and b.low_res_logits is not None  # untiled decodes keep them
    report["low_res_max_abs_error"] = float(np.abs(a.low_res_logits - b.low_res_logits).max())
    report["iou_max_abs_error"] = float(np.abs(a.iou_scores - b.iou_scores).max())
    ious = [float(np.logical_and(x, y).sum() / max(1, np.logical_or(x, y).sum()))
            for x, y in zip(a.masks, b.masks, strict=True)]
    report["mask_iou_min"] = round(min(ious), 6)
    report["timing_ms"] = {"torch": round(1e3 * torch_s, 2), "onnx": round(1e3 * onnx_s, 2)}
    return report


def cmd_registry_sweep(args: argparse.Namespace) -> int:
    from sam_core.adapters.s3 import S3AdapterStore

    if args.older_than_hours < 0:
        raise InvalidInput(f"must be >= 0, got {args.older_than_hours}", field="older_than_hours")
    store = S3AdapterStore(args.registry_url, endpoint_url=args.endpoint_url or None)
    removed = store.sweep_uploads(args.older_than_hours * 3600, dry_run=args.dry_run)
    print(json.dumps({"dry_run": args.dry_run, "orphaned_uploads": list(removed)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samforge", description="Fine-tune and serve Segment Anything.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment an image with box/point prompts (in-process)")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, TIFF, BMP; 8/16-bit; EXIF honoured)")
    p.add_argument("--box", type=_box, action="append", help="x0,y0,x1,y1 in pixels; repeat for more prompts")
    p.add_argument("--point", type=_point, action="append",
                   help="x,y[,label] (label 1 = foreground (default), 0 = background); all points form one prompt")
    p.add_argument("--model", default="litemedsam",
                   help="litemedsam (default, bundled), vit_b, vit_l, vit_h, sam2.1_hiera_t|s|b+|l, sam2_hiera_*, tiny")
    p.add_argument("--checkpoint", help="weights file for vit_*/sam2*_hiera_* (or to override litemedsam)")
    p.add_argument("--tile", action="store_true", help="embed overlapping native-resolution tiles (small objects)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (with --tile)")
    p.add_argument("--multimask", action="store_true", help="predict 3 masks per prompt, keep the best scored")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--out", required=True, help="output PNG (union of masks; per-prompt files beside it)")
    p.set_defaults(func=cmd_predict)
    d = sub.add_parser("demo", help="run the predictor demo on a generated scene (default model)")
    d.add_argument("--model", default="litemedsam")
    d.add_argument("--image", help="segment this image instead of the generated scene")
    d.add_argument("--out", default="out/demo", help="folder for masks and summary.json")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("export-onnx", help="export the image encoder or the prompt decoder to ONNX")
    e.add_argument("--part", choices=("encoder", "decoder"), required=True)
    e.add_argument("--model", default="litemedsam")
    e.add_argument("--checkpoint", help="weights file for vit_*/sam2*_hiera_* (or to override litemedsam)")
    e.add_argument("--out", required=True, help="output .onnx file (written atomically)")
    e.add_argument("--check-image", help="compare with PyTorch on this image: per-level feature error, logit and "
                   "IoU error, mask IoU, timings")
    e.set_defaults(func=cmd_export_onnx)
    r = sub.add_parser("registry-sweep", help="delete orphaned uploads (a publisher killed mid-upload) from an "
                       "s3:// adapter registry")
    r.add_argument("--registry-url", required=True, help="s3://bucket/prefix (SAMFORGE_REGISTRY_URL)")
    r.add_argument("--endpoint-url", default="", help="S3-compatible server (SAMFORGE_S3_ENDPOINT_URL)")
    r.add_argument("--older-than-hours", type=float, default=24.0,
                   help="grace period: uploads younger than this may still reach the index (default 24)")
    r.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    r.set_defaults(func=cmd_registry_sweep)
    add_train_args(sub)
    add_data_args(sub)
    add_up_args(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except SamforgeError as exc:
        print(f"samforge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
