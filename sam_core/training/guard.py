"""Guarded publishing: a signed held-out split per adapter name and the champion/challenger verdict.

**The split** (:class:`HeldoutSplit`). The first job of an adapter name draws it from its data: a seeded
fraction of the images (ordered by sha256 over the seed and each image's content hash, so neither file names
nor listing order matter), disjoint from the training images and from the model-selection validation split
(both are drawn from the rest). It records, per image, the id and the sha256 of the image file and of its
labels, plus everything else that changes the score: the data set's ``min_area`` and the evaluation settings
(prompt kind and jitter, prompt seed, tiling, multimask, instances per image). :attr:`HeldoutSplit.signature`
is a sha256 over all of it; a split whose stored signature does not match its content is refused.

The split is stored in the adapter's own ``adapter_config.json`` (key ``heldout_split``), so it travels with
every version in any adapter store and is covered by the version's content digest. Every later job of the
name reads it from its baseline (the champion) and reuses it: its images are found in the new data by image
content hash (a renamed file is found; it is scored under its recorded id, so prompts stay identical) and
excluded from training and validation, duplicates included. An image of the split that is missing from the
new data, or whose labels changed, fails the job with :class:`InvalidInput` (field ``heldout_split``): the
scores would no longer be comparable. A champion without a stored split (published before guarding) gets a
fresh split; it may have trained on those images, which can only make it harder to beat.

**The verdict** (:class:`Verdict`). Candidate and baseline are scored on the split with the split's own
evaluation settings: mean Dice over the resolvable instances, or over all instances when none is resolvable
(:func:`guard_score`). The candidate is accepted iff ``candidate >= baseline + min_improvement`` or
``allow_regression``. The default margin is :data:`DEFAULT_MIN_IMPROVEMENT` = 0: the guard refuses a
regression, and a retrain that merely matches its champion is still published; raise the margin to demand
an improvement (a negative one tolerates a bounded regression).

**Stored metrics** (:func:`stored_metrics`): ``heldout_dice``, ``heldout_baseline_dice`` and
``heldout_signature`` in the adapter's metrics, so every version in a registry carries its score on the split;
:func:`promotion_refusal` compares two versions by them (what the registry's Promote guard asks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sam_core.data.dataset import SegmentationDataset
from sam_core.data.fingerprint import record_hashes
from sam_core.data.prompt_sim import PromptConfig
from sam_core.data.samples import Record
from sam_core.errors import InvalidInput
from sam_core.evaluation.evaluate import EvalConfig, EvalReport

SPLIT_FORMAT = "samforge-heldout-v1"
SPLIT_KEY = "heldout_split"  # the key in adapter_config.json
DEFAULT_HELDOUT_FRACTION = 0.2
DEFAULT_MIN_IMPROVEMENT = 0.0
MIN_IMAGES = 3  # one held out, one to train on, one to validate on
SCORE_METRIC, BASELINE_METRIC, SIGNATURE_METRIC = "heldout_dice", "heldout_baseline_dice", "heldout_signature"
_UNSCORED_EVAL_FIELDS = ("keep_worst",)  # EvalConfig fields that do not change a Dice score

Scorer = Callable[[SegmentationDataset, EvalConfig, str], EvalReport]
"""``scorer(data set, eval config, label) -> report``: one model evaluated (candidate or baseline)."""


@dataclass(frozen=True)
class GuardOptions:
    """``baseline``: the champion's adapter folder (None: the base model). ``heldout_fraction``: the share of
    the images a new split holds out (only used when the baseline carries no split)."""

    baseline: str | None = None
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT
    allow_regression: bool = False
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_improvement) and -1.0 <= self.min_improvement <= 1.0):
            raise InvalidInput(f"must be a number in [-1, 1], got {self.min_improvement}", field="min_improvement")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise InvalidInput(f"must be in (0, 1), got {self.heldout_fraction}", field="heldout_fraction")


@dataclass(frozen=True)
class HeldoutImage:
    image_id: str
    image_sha256: str
    labels_sha256: str


def _signature(images: tuple[HeldoutImage, ...], min_area: int, eval_settings: dict[str, Any]) -> str:
    body = {"format": SPLIT_FORMAT, "images": [dataclasses.asdict(i) for i in images], "min_area": min_area,
            "eval": eval_settings}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _eval_settings(cfg: EvalConfig) -> dict[str, Any]:
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return {k: v for k, v in data.items() if k not in _UNSCORED_EVAL_FIELDS}


@dataclass(frozen=True)
class HeldoutSplit:
    """Images (sorted by id) + the settings that change their score, signed (see the module docstring)."""

    images: tuple[HeldoutImage, ...]
    min_area: int
    eval: dict[str, Any]
    signature: str

    @staticmethod
    def create(ds: SegmentationDataset, *, fraction: float, seed: int, min_area: int,
               eval_cfg: EvalConfig) -> HeldoutSplit:
        """Hold out round(n * fraction) images (at least 1, leaving at least 2) of ``ds``, chosen by content."""
        hashed = {rec.image_id: record_hashes(rec) for rec in ds.records}
        distinct = sorted({h[0] for h in hashed.values()})
        if len(distinct) < MIN_IMAGES:
            raise InvalidInput(f"guarded publishing holds images out of training: needs at least {MIN_IMAGES} "
                               f"distinct images, got {len(distinct)}", field="data")
        n = min(max(1, round(len(distinct) * fraction)), len(distinct) - 2)
        chosen = set(sorted(distinct, key=lambda h: hashlib.sha256(f"heldout\0{seed}\0{h}".encode()).hexdigest())[:n])
        first: dict[str, HeldoutImage] = {}
        for image_id in sorted(hashed):
            image_hash, labels_hash = hashed[image_id]
            if image_hash in chosen and image_hash not in first:
                first[image_hash] = HeldoutImage(image_id, image_hash, labels_hash)
        images = tuple(sorted(first.values(), key=lambda i: i.image_id))
        settings = _eval_settings(eval_cfg)
        return HeldoutSplit(images, min_area, settings, _signature(images, min_area, settings))

    def to_json(self) -> dict[str, Any]:
        return {"format": SPLIT_FORMAT, "images": [dataclasses.asdict(i) for i in self.images],
                "min_area": self.min_area, "eval": self.eval, "signature": self.signature}

    @staticmethod
    def from_json(data: object, source: str) -> HeldoutSplit:
        """Parse a stored split; a malformed one, or one whose signature does not match, is InvalidInput."""
        if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
            raise InvalidInput(f"{source}: not a {SPLIT_FORMAT} held-out split", field=SPLIT_KEY)
        try:
            images = tuple(HeldoutImage(str(i["image_id"]), str(i["image_sha256"]), str(i["labels_sha256"]))
                           for i in data["images"])
            split = HeldoutSplit(images, int(data["min_area"]), dict(data["eval"]), str(data["signature"]))
            split.eval_config()
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{source}: not a {SPLIT_FORMAT} held-out split ({exc!r})", field=SPLIT_KEY) from exc
        if not images or _signature(images, split.min_area, split.eval) != split.signature:
            raise InvalidInput(f"{source}: the held-out split's signature does not match its content", field=SPLIT_KEY)
        return split

    def with_eval(self, cfg: EvalConfig) -> HeldoutSplit:
        """The same images and ``min_area`` scored with ``cfg``'s settings: another split, signed anew."""
        settings = _eval_settings(cfg)
        return HeldoutSplit(self.images, self.min_area, settings, _signature(self.images, self.min_area, settings))

    def eval_config(self) -> EvalConfig:
        """The evaluation settings the split is scored with (whatever the current job's are)."""
        values = dict(self.eval)
        values["prompt"] = PromptConfig(**values["prompt"])
        return EvalConfig(**values)

    def select(self, ds: SegmentationDataset) -> tuple[SegmentationDataset, SegmentationDataset]:
        """(held-out images of ``ds`` under their recorded ids, the rest of ``ds``).

        The rest excludes every image whose content is in the split. A split image missing from ``ds``, or
        with other labels, is InvalidInput(field="heldout_split").
        """
        by_image: dict[str, list[tuple[Record, str]]] = {}
        for rec in ds.records:
            image_hash, labels_hash = record_hashes(rec)
            by_image.setdefault(image_hash, []).append((rec, labels_hash))
        kept, problems = [], []
        for image in self.images:
            found = by_image.get(image.image_sha256, [])
            match = next((rec for rec, labels in found if labels == image.labels_sha256), None)
            if match is None:
                problems.append(f"{image.image_id} ({'labels changed' if found else 'image missing'})")
            else:
                kept.append(dataclasses.replace(match, image_id=image.image_id))
        if problems:
            raise InvalidInput(
                f"the adapter's held-out split {self.signature[:12]} needs its {len(self.images)} images in the data "
                f"with unchanged labels; not found: {', '.join(problems[:5])}"
                + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""), field=SPLIT_KEY)
        held = {i.image_sha256 for i in self.images}
        rest = [rec.image_id for rec in ds.records if record_hashes(rec)[0] not in held]
        heldout = SegmentationDataset(kept, root=ds.root, fmt=ds.format, report=ds.report)
        return heldout, ds.subset(rest)


def guard_score(report: EvalReport) -> tuple[float, str]:
    """(score, metric name): resolvable Dice if any instance is resolvable, else Dice over all instances."""
    if report.summary.get("n_resolvable", 0) > 0:
        return float(report.summary["dice_resolvable_mean"]), "dice_resolvable_mean"
    return float(report.summary["dice_mean"]), "dice_mean"


@dataclass(frozen=True)
class Verdict:
    """The guard's decision on one candidate (scores on the split named by ``signature``)."""

    accepted: bool
    candidate: float
    baseline: float
    baseline_label: str  # "base model" or the champion's adapter identity
    metric: str
    min_improvement: float
    allow_regression: bool
    signature: str
    n_images: int

    @property
    def reason(self) -> str:
        scores = (f"candidate {self.metric} {self.candidate:.4f} vs baseline ({self.baseline_label}) "
                  f"{self.baseline:.4f} on held-out split {self.signature[:12]} ({self.n_images} images)")
        if self.candidate >= self.baseline + self.min_improvement:
            return f"accepted: {scores}, margin {self.min_improvement:g}"
        if self.allow_regression:
            return f"accepted (regression allowed): {scores}, margin {self.min_improvement:g}"
        return f"rejected: {scores} does not reach baseline + margin {self.min_improvement:g}"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reason": self.reason}


def judge(candidate: EvalReport, baseline: EvalReport, baseline_label: str, split: HeldoutSplit,
          options: GuardOptions) -> Verdict:
    """Compare the two reports of the same split (same instances, so the same metric applies to both)."""
    cand, metric = guard_score(candidate)
    base, _ = guard_score(baseline)
    if not (math.isfinite(cand) and math.isfinite(base)):
        raise InvalidInput(f"the held-out split {split.signature[:12]} has no instance to score", field=SPLIT_KEY)
    accepted = cand >= base + options.min_improvement or options.allow_regression
    return Verdict(accepted, cand, base, baseline_label, metric, options.min_improvement, options.allow_regression,
                   split.signature, len(split.images))


def stored_metrics(verdict: Verdict) -> dict[str, Any]:
    """What a version records about the split (the registry's Promote guard compares these)."""
    return {SCORE_METRIC: verdict.candidate, BASELINE_METRIC: verdict.baseline, SIGNATURE_METRIC: verdict.signature}


def promotion_refusal(candidate_ref: str, candidate: dict[str, Any], current_ref: str,
                      current: dict[str, Any]) -> str | None:
    """Why promoting ``candidate`` over the alias's ``current`` version would be unsafe, or None.

    Refused: a candidate scoring lower than the current version on the same split, and versions that cannot be
    compared (different splits, or one without a score). Two versions without scores (published before
    guarding) are not compared.
    """
    signatures = (candidate.get(SIGNATURE_METRIC), current.get(SIGNATURE_METRIC))
    if signatures == (None, None):
        return None
    if None in signatures or signatures[0] != signatures[1]:
        shown = [str(s)[:12] if s else "none" for s in signatures]
        return (f"{candidate_ref} (held-out split {shown[0]}) and {current_ref} (split {shown[1]}) were not scored "
                "on the same held-out split, so they cannot be compared; use force to promote anyway")
    cand, cur = float(candidate[SCORE_METRIC]), float(current[SCORE_METRIC])
    if cand < cur:
        return (f"{candidate_ref} scores {cand:.4f} on held-out split {str(signatures[0])[:12]}, worse than "
                f"{current_ref} ({cur:.4f}); use force to promote anyway")
    return None
