"""What a CreateJob request may ask for, and how it becomes a :class:`~sam_core.training.finetune.FinetuneSpec`.

Every check runs before a job is queued (INVALID_ARGUMENT / NOT_FOUND at CreateJob, never a FAILED job for a
bad request), and :func:`build_spec` is deterministic: a job rebuilt from its job.json after a restart gets
the same TrainConfig, so ``sam_core.training.loop`` accepts the checkpoints in its folder and resumes.

Hyper-parameters use 0 / "" for "the default" (proto3 scalars cannot be unset).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from sam_core.adapters.store import tenant_dir, validate_name
from sam_core.data.prompt_sim import PromptKind, prompt_config
from sam_core.errors import InvalidInput, NotFound
from sam_core.evaluation.evaluate import EvalConfig
from sam_core.training.config import TrainConfig
from sam_core.training.finetune import FinetuneSpec, SplitSpec
from sam_core.training.methods import MethodConfig, get_method

PROMPT_KINDS: tuple[PromptKind, ...] = ("box", "point", "box+point")
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_PERSAM_STEPS = 200
MAX_DATASET_REF = 1024


@dataclass(frozen=True)
class Hyperparameters:
    """Mirror of ``sam.v1.Hyperparameters``; 0 / "" / False = default."""

    epochs: int = 0
    max_steps: int = 0
    batch_size: int = 0
    lr: float = 0.0
    rank: int = 0
    prompt: str = ""
    val_fraction: float = 0.0
    seed: int = 0
    bf16: bool = False
    patience: int = 0
    crop: int = 0
    warmup_steps: int = 0
    checkpoint_every: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Hyperparameters:
        known = {f.name for f in fields(Hyperparameters)}
        return Hyperparameters(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class JobRequest:
    """A CreateJob request in plain types (``tenant`` as requested; the manager resolves it)."""

    tenant: str
    dataset: str
    method: str
    adapter_name: str
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    promote_to: str = ""


def _bad(name: str, message: str) -> InvalidInput:
    return InvalidInput(message, field=f"hyperparameters.{name}")


def check_hyperparameters(hp: Hyperparameters) -> None:
    """Ranges the proto types do not express (negative counts, NaN rates, unknown prompt kinds)."""
    for name in ("epochs", "max_steps", "batch_size", "rank", "seed", "patience", "crop", "warmup_steps",
                 "checkpoint_every"):
        if getattr(hp, name) < 0:
            raise _bad(name, f"must be >= 0 (0 = default), got {getattr(hp, name)}")
    if not math.isfinite(hp.lr) or hp.lr < 0:
        raise _bad("lr", f"must be a finite number >= 0 (0 = default), got {hp.lr}")
    if not math.isfinite(hp.val_fraction) or not 0 <= hp.val_fraction < 1:
        raise _bad("val_fraction", f"must be in [0, 1) (0 = default {DEFAULT_VAL_FRACTION}), got {hp.val_fraction}")
    prompt_kind(hp.prompt)


def prompt_kind(value: str) -> PromptKind:
    """The prompt kind ``value`` names ("" = box); InvalidInput naming ``hyperparameters.prompt`` otherwise."""
    if not value:
        return "box"
    for kind in PROMPT_KINDS:
        if value == kind:
            return kind
    raise _bad("prompt", f"must be one of {', '.join(PROMPT_KINDS)} (empty = box), got {value!r}")


def check_request(request: JobRequest) -> None:
    """Method, adapter name, alias and hyper-parameters (InvalidInput naming the field)."""
    get_method(request.method)
    validate_name("adapter_name", request.adapter_name)
    if request.promote_to:
        validate_name("promote_to", request.promote_to)
    check_hyperparameters(request.hyperparameters)


def tenant_root(data_dir: str | Path, tenant: str) -> Path:
    """``<data_dir>/<tenant>`` (the name validated), symlinks resolved."""
    return tenant_dir(data_dir, tenant).resolve()


def resolve_dataset(data_dir: str | Path, tenant: str, ref: str) -> Path:
    """The data set ``ref`` names inside the tenant's data folder.

    ``ref`` is a relative path (``blobs``, ``coco/train.json``) or an upload id (``uploads/<id>``). Absolute
    paths, ``..`` and anything that resolves outside ``<data_dir>/<tenant>`` (symlinks included) are
    InvalidInput(field="dataset"); a path that does not exist is NotFound(field="dataset").
    """
    if not ref:
        raise InvalidInput("required: a path relative to the tenant's data folder or an upload id", field="dataset")
    if len(ref) > MAX_DATASET_REF or "\x00" in ref:
        raise InvalidInput("is not a usable path", field="dataset")
    path = PurePosixPath(ref)
    if path.is_absolute() or ref.startswith("\\"):
        raise InvalidInput(f"{ref!r} must be relative to the tenant's data folder, not absolute", field="dataset")
    if ".." in path.parts:
        raise InvalidInput(f"{ref!r} must not contain '..'", field="dataset")
    root = tenant_root(data_dir, tenant)
    target = (root / path).resolve()
    if target != root and root not in target.parents:
        raise InvalidInput(f"{ref!r} resolves outside the tenant's data folder", field="dataset")
    if not target.exists():
        raise NotFound(f"data set {ref!r} not found", field="dataset")
    return target


def train_config(method: str, hp: Hyperparameters) -> TrainConfig:
    """Hyper-parameters -> TrainConfig (0 = the TrainConfig / MethodConfig default)."""
    base, base_method = TrainConfig(), MethodConfig()
    rank = hp.rank or base_method.rank
    kind = prompt_kind(hp.prompt)
    try:
        return TrainConfig(
            method=MethodConfig(method, rank=rank, alpha=float(rank)),
            epochs=hp.epochs or base.epochs, max_steps=hp.max_steps or None,
            batch_size=hp.batch_size or base.batch_size, lr=hp.lr or base.lr,
            warmup_steps=hp.warmup_steps or base.warmup_steps, bf16=hp.bf16, seed=hp.seed,
            checkpoint_every=hp.checkpoint_every or base.checkpoint_every, patience=hp.patience,
            prompt=prompt_config(kind, 0.1), eval_prompt=prompt_config(kind, 0.0), crop=hp.crop or None,
        )
    except InvalidInput as exc:
        if exc.field == "method":
            raise
        raise _bad(exc.field or "?", exc.detail) from exc


def build_spec(request: JobRequest, data: Path, out_dir: Path) -> FinetuneSpec:
    """The whole job for ``run_finetune`` (``persam`` uses ``max_steps`` as its fitting steps)."""
    hp = request.hyperparameters
    cfg = train_config(request.method, hp)
    val_fraction = hp.val_fraction or DEFAULT_VAL_FRACTION
    return FinetuneSpec(
        data=str(data), out_dir=str(out_dir), train=cfg,
        split=SplitSpec(val_fraction=val_fraction, seed=hp.seed),
        eval=EvalConfig(prompt=cfg.eval_prompt, seed=hp.seed),
        adapter_name=request.adapter_name, persam_steps=hp.max_steps or DEFAULT_PERSAM_STEPS,
    )
