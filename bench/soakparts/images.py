"""Distinct images and the prompts sent about each, reproducible from a seed.

``ImageSource(kind, seed)`` yields JPEG bytes for image number ``index`` (0, 1, 2, ...). Every image a source
hands out is distinct (the source remembers the SHA-256 of each and re-draws a collision), so in a soak the
encoder's cache never hits and must evict to stay within its budget:

* ``real``: the images of ``../shared/data`` (every ``*/images/*`` file), taken in a seeded order and each
  time with a different crop (75-100% of each side at a seeded offset), mirror and brightness shift;
* ``generated``: a noise background with bright ellipses, sizes 480x640, 512x512 or 600x800 (a fresh clone
  has no ``../shared/data``; the tests use this kind);
* ``auto``: ``real`` when ``../shared/data`` holds images, else ``generated``.

``session_plan(seed, index, ...)`` is what a user does with image ``index``: 1 to 3 Segment calls of 1 to
``max_prompts`` prompts each (a box; a box with a foreground point inside it; or a foreground and a background
point), and a SegmentEverything call with probability ``everything_probability``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
GENERATED_SIZES = ((480, 640), (512, 512), (600, 800))
JPEG_QUALITY = 90
MAX_SEGMENT_CALLS = 3
KINDS = ("auto", "real", "generated")


def real_files(data: Path = DATA) -> list[Path]:
    """Every image file under ``data/*/images``, sorted; [] when the folder is absent."""
    if not data.is_dir():
        return []
    return sorted(p for p in data.glob("*/images/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def generated_image(rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 uint8: a blurred noise background with 3 to 8 bright ellipses."""
    import cv2

    height, width = GENERATED_SIZES[int(rng.integers(len(GENERATED_SIZES)))]
    image = cv2.GaussianBlur(rng.normal(rng.uniform(40, 100), 20, (height, width)), (0, 0), 2)
    for _ in range(int(rng.integers(3, 9))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(8, width // 6)), int(rng.integers(8, height // 6)))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(150, 250)), -1)
    gray = image.clip(0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def varied_real_image(path: Path, rng: np.random.Generator) -> np.ndarray:
    """The image at ``path`` (RGB), cropped to 75-100% of each side, maybe mirrored, brightness shifted."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read {path}")
    height, width = image.shape[:2]
    h, w = int(height * rng.uniform(0.75, 1.0)), int(width * rng.uniform(0.75, 1.0))
    y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    crop = image[y0:y0 + h, x0:x0 + w, ::-1]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    shifted = crop.astype(np.int16) + int(rng.integers(-12, 13))
    return np.ascontiguousarray(shifted.clip(0, 255).astype(np.uint8))


@dataclass
class ImageSource:
    """Distinct JPEG images by index (see the module docstring); ``sent`` counts the images handed out and
    ``redrawn`` the collisions replaced by a fresh draw."""

    kind: str
    seed: int
    data: Path = DATA
    files: list[Path] = field(init=False)
    sent: int = field(default=0, init=False)
    redrawn: int = field(default=0, init=False)
    _seen: set[bytes] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"image kind must be one of {KINDS}, not {self.kind!r}")
        self.files = real_files(self.data) if self.kind != "generated" else []
        if self.kind == "real" and not self.files:
            raise FileNotFoundError(f"no images under {self.data}/*/images")
        self.kind = "real" if self.files else "generated"
        self._order = np.random.default_rng(self.seed).permutation(len(self.files))

    def image(self, index: int, attempt: int = 0) -> np.ndarray:
        """Image ``index`` as an H x W x 3 uint8 RGB array (``attempt`` > 0: a re-draw after a collision)."""
        rng = np.random.default_rng((self.seed, index, attempt))
        if self.files:
            return varied_real_image(self.files[int(self._order[index % len(self.files)])], rng)
        return generated_image(rng)

    def encoded(self, index: int) -> tuple[bytes, int, int]:
        """Image ``index`` as (JPEG bytes, height, width), never equal to an image this source handed out."""
        import cv2

        for attempt in range(100):
            image = self.image(index, attempt)
            data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
            digest = hashlib.sha256(data).digest()
            if digest not in self._seen:
                self._seen.add(digest)
                self.sent += 1
                return data, image.shape[0], image.shape[1]
            self.redrawn += 1
        raise RuntimeError(f"no distinct draw of image {index} in 100 attempts")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt in image pixels: an optional box (x0, y0, x1, y1) and points (x, y, label 1/0)."""

    box: tuple[float, float, float, float] | None
    points: tuple[tuple[float, float, int], ...] = ()


@dataclass(frozen=True)
class SessionPlan:
    """What a user does with one image: the prompts of each Segment call, and whether to SegmentEverything."""

    segments: tuple[tuple[PromptSpec, ...], ...]
    everything: bool


def random_prompt(rng: np.random.Generator, height: int, width: int) -> PromptSpec:
    """A box (sides 5-40% of the image), a box with a foreground point in it, or two points (fg, bg)."""
    x0, y0 = rng.uniform(0, 0.6 * width), rng.uniform(0, 0.6 * height)
    x1, y1 = x0 + rng.uniform(0.05, 0.4) * width, y0 + rng.uniform(0.05, 0.4) * height
    kind = rng.random()
    if kind < 0.6:
        return PromptSpec((x0, y0, x1, y1))
    inside = (float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)), 1)
    if kind < 0.85:
        return PromptSpec((x0, y0, x1, y1), (inside,))
    outside = (float(rng.uniform(0, width)), float(rng.uniform(0, height)), 0)
    return PromptSpec(None, (inside, outside))


def session_plan(seed: int, index: int, height: int, width: int, *, max_prompts: int,
                 everything_probability: float) -> SessionPlan:
    """The Segment calls (1 to 3, each of 1 to ``max_prompts`` prompts) and the SegmentEverything draw."""
    rng = np.random.default_rng((seed, index, 1 << 20))
    calls = int(rng.integers(1, MAX_SEGMENT_CALLS + 1))
    segments = tuple(tuple(random_prompt(rng, height, width) for _ in range(int(rng.integers(1, max_prompts + 1))))
                     for _ in range(calls))
    return SessionPlan(segments, bool(rng.random() < everything_probability))
