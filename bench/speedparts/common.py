"""Shared helpers of the speed benchmark: paths, machine facts, timing, benchmark images and boxes, child
processes, and the mask agreement of two encoders.

``run_child(args, tcmalloc=...)`` runs ``bench/speed.py --child *args`` in a fresh interpreter (with
tcmalloc preloaded when asked and installed, else glibc malloc) and returns the JSON object the child printed
on its last stdout line; a child that exits non-zero raises ``RuntimeError`` with the tail of its stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from sam_core.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
SPEED_SCRIPT = ROOT / "bench" / "speed.py"
TCMALLOC_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/local/lib/libtcmalloc_minimal.so.4")
DATASETS = ("hrsid_sar_ships", "isbi2012_em_cells", "ph2_skin_lesions")
MAX_BOXES_PER_IMAGE = 20

BenchImage = tuple[str, np.ndarray, list[np.ndarray]]
"""(name, H x W x 3 uint8 image, ground-truth boxes as float32 [x0, y0, x1, y1])."""
Box = tuple[float, float, float, float]


def cpu_model_and_isa() -> dict[str, Any]:
    """The CPU's model name and the matmul ISA extensions it reports: absolute figures depend on them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"cpu_model": model, "isa": [f for f in wanted if f in flags]}


def tcmalloc_path() -> str | None:
    """The first installed tcmalloc library of ``TCMALLOC_CANDIDATES``, or None."""
    return next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sample_images(n: int = 4) -> list[BenchImage]:
    """The first ``n`` images of each real data set with up to 20 ground-truth boxes each, or [] when absent."""
    from sam_core.data.dataset import load_dataset

    out = []
    for name in DATASETS:
        if not (DATA / name).is_dir():
            continue
        ds = load_dataset(DATA / name)
        for sample in [ds[i] for i in range(min(n, len(ds)))]:
            boxes = []
            for inst in sample.instances[:MAX_BOXES_PER_IMAGE]:
                ys, xs = np.nonzero(inst.mask)
                boxes.append(np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32))
            out.append((f"{name}/{sample.image_id}", sample.load_image(), boxes))
    return out


def synthetic_image(size: int = 256, seed: int = 0) -> np.ndarray:
    """A ``size`` x ``size`` x 3 uint8 image: dark noise with six bright squares."""
    rng = np.random.default_rng(seed)
    image = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    for _ in range(6):
        y, x, r = rng.integers(20, size - 20, 2).tolist() + [int(rng.integers(8, 20))]
        image[max(0, y - r):y + r, max(0, x - r):x + r] = rng.integers(120, 255, 3)
    return image


def benchmark_image() -> np.ndarray:
    """The image the single-image parts time: the first real one (hrsid, 800 x 800) or a synthetic one."""
    return sample_images(1)[0][1] if DATA.is_dir() else synthetic_image()


def random_boxes(n: int, height: int, width: int, seed: int) -> list[Box]:
    """``n`` boxes (x0, y0, x1, y1) with a corner in the image's first 70% and sides of 8 px to 30% of it."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, 0.7 * width), rng.uniform(0, 0.7 * height)
        boxes.append((x0, y0, x0 + rng.uniform(8, 0.3 * width), y0 + rng.uniform(8, 0.3 * height)))
    return boxes


def child_command(args: list[str]) -> list[str]:
    """The command line that runs ``bench/speed.py --child *args`` with this interpreter."""
    return [sys.executable, str(SPEED_SCRIPT), "--child", *args]


def child_env(*, tcmalloc: bool) -> dict[str, str]:
    """This process's environment with LD_PRELOAD set to tcmalloc (when asked and installed) or removed."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    lib = tcmalloc_path()
    if tcmalloc and lib:
        env["LD_PRELOAD"] = lib
    return env


def run_child(args: list[str], *, tcmalloc: bool) -> dict[str, Any]:
    """Run one ``--child`` variant in its own process; its result is the JSON object on its last stdout line."""
    proc = subprocess.run(child_command(args), env=child_env(tcmalloc=tcmalloc), capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mask_agreement(reference: Predictor, images: list[BenchImage],
                   encode_other: Callable[[np.ndarray], torch.Tensor]) -> dict[str, Any]:
    """Masks decoded (by ``reference``'s decoder, ground-truth boxes) from ``encode_other(image)``'s features (SAM 1:
    its one level) vs from ``reference``'s own embedding: mask IoU min / mean over every instance, embedding
    relative error."""
    from sam_core.inference.prompts import Prompt

    ious, rel = [], []
    for _, image, boxes in images:
        prompts = [Prompt(box=b) for b in boxes]
        ref = reference.encode_one(image)
        other = dataclasses.replace(ref, features=reference.net.features_from_encoder(encode_other(image)))
        mine, theirs = other.image_embedding.to(ref.image_embedding.dtype), ref.image_embedding
        rel.append(float((mine - theirs).norm() / theirs.norm()))
        m_ref = reference.decode(ref, prompts).masks[:, 0]
        m_other = reference.decode(other, prompts).masks[:, 0]
        ious += [mask_iou(a, b) for a, b in zip(m_ref, m_other, strict=True)]
    return {"mask_iou_min": round(min(ious), 4), "mask_iou_mean": round(float(np.mean(ious)), 4),
            "mask_iou_n": len(ious), "images": len(images), "embedding_rel_error_mean": round(float(np.mean(rel)), 4)}
