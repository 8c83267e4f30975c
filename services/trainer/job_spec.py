"""What a CreateJob request may ask for, and how it becomes a :class:`~sam_core.training.finetune.FinetuneSpec`.

Every check runs before a job is queued (INVALID_ARGUMENT / NOT_FOUND at CreateJob, never a FAILED job for a
bad request), and :func:`build_spec` is deterministic: a job rebuilt from its job.json after a restart gets
the same TrainConfig, so ``sam_core.training.loop`` accepts the checkpoints in its folder and resumes.

Hyper-parameters use 0 / "" for "the default" (proto3 scalars cannot be unset). Every numeric one has a row in
:data:`HYPERPARAMETER_BOUNDS` (the one table of accepted ranges, justified there and shown in deploy/README.md);
a value outside is InvalidInput naming ``hyperparameters.<field>`` and stating the bound.

:class:`Resources` (nodes x processes per node, GPUs per process; 0 = 1 / none) are checked against the
trainer's limits (:class:`ResourceLimits`, from SAMFORGE_MAX_NODES / _PROCESSES_PER_NODE / _GPUS_PER_PROCESS):
InvalidInput naming ``resources.<field>``; the global batch must split evenly over the ranks. What an executor
itself can run (the process executor: one node, GPUs only where CUDA is) it checks in its own ``check``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from sam_core.adapters.store import tenant_dir, validate_name
from sam_core.data.prompt_sim import PromptKind, prompt_config
from sam_core.errors import InvalidInput, NotFound
from sam_core.evaluation.evaluate import EvalConfig
from sam_core.training.auto import AUTO_METHOD, DEFAULT_TIME_BUDGET, MAX_TIME_BUDGET
from sam_core.training.config import TrainConfig
from sam_core.training.finetune import FinetuneSpec, SplitSpec
from sam_core.training.guard import DEFAULT_MIN_IMPROVEMENT, GuardOptions
from sam_core.training.methods import DEFAULT_METHOD, MethodConfig, get_method, method_names

PROMPT_KINDS: tuple[PromptKind, ...] = ("box", "point", "box+point")
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_PERSAM_STEPS = 200
MAX_DATASET_REF = 1024
AUTO_CHOOSES = ("lr", "rank", "crop")  # hyper-parameters each recipe of method auto sets itself


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
    time_budget_seconds: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Hyperparameters:
        known = {f.name for f in fields(Hyperparameters)}
        return Hyperparameters(**{k: v for k, v in data.items() if k in known})


RESOURCE_FIELDS = ("nodes", "processes_per_node", "gpus_per_process")


@dataclass(frozen=True)
class Resources:
    """Mirror of ``sam.v1.Resources`` (services.trainer.convert maps the wire); 0 = the default (1 node,
    1 process, no GPU). A request keeps its 0s (job.json, the Job message); :meth:`resolved` is what runs."""

    nodes: int = 0
    processes_per_node: int = 0
    gpus_per_process: int = 0

    def resolved(self) -> Resources:
        """The defaults filled in (nodes and processes_per_node >= 1); a negative field is InvalidInput
        naming ``resources.<field>`` (the one place that rejects them)."""
        for name in RESOURCE_FIELDS:
            if getattr(self, name) < 0:
                raise InvalidInput(f"must be 0 (the default) or more, got {getattr(self, name)}",
                                   field=f"resources.{name}")
        return Resources(max(1, self.nodes), max(1, self.processes_per_node), self.gpus_per_process)

    @property
    def world_size(self) -> int:
        """Ranks of a torchrun job (1 = one plain process)."""
        resolved = self.resolved()
        return resolved.nodes * resolved.processes_per_node

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Resources:
        known = {f.name for f in fields(Resources)}
        return Resources(**{k: int(v) for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ResourceLimits:
    """The largest accepted :class:`Resources` (the trainer's settings)."""

    nodes: int
    processes_per_node: int
    gpus_per_process: int


def check_resources(resources: Resources, limits: ResourceLimits, hp: Hyperparameters) -> None:
    """Each field 0 or within ``1 .. limit``; the global batch divisible by the ranks (InvalidInput naming
    ``resources.<field>``)."""
    resources.resolved()  # negative fields
    for name in RESOURCE_FIELDS:
        value, limit = getattr(resources, name), getattr(limits, name)
        if value > limit:
            setting = f"SAMFORGE_MAX_{name.upper()}"
            raise InvalidInput(f"must be 0 (the default) or 1 to {limit} ({setting}), got {value}",
                               field=f"resources.{name}")
    batch = hp.batch_size or TrainConfig().batch_size
    if batch % resources.world_size:
        raise InvalidInput(f"the global batch ({batch}) must divide evenly over the {resources.world_size} "
                           "ranks (nodes x processes_per_node)", field="resources.processes_per_node")


@dataclass(frozen=True)
class JobRequest:
    """A CreateJob request in plain types (``tenant`` as requested; the manager resolves it)."""

    tenant: str
    dataset: str
    method: str
    adapter_name: str
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    promote_to: str = ""
    resources: Resources = field(default_factory=Resources)
    allow_regression: bool = False  # publish even if the champion scores higher on the held-out split
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT  # candidate >= champion + this to publish


def _bad(name: str, message: str) -> InvalidInput:
    return InvalidInput(message, field=f"hyperparameters.{name}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Bound:
    """The accepted values of one hyper-parameter: 0 (= the default) or ``low <= value <= high``
    (``value > low`` when ``low_open``). ``one_shot``: the row applies to one-shot methods (PerSAM) only and
    replaces the general row of the same field for them. ``auto_only``: the field applies to method ``auto`` only
    (other methods must leave it 0). ``why`` justifies the bound (the README shows it)."""

    field: str
    low: float
    high: float
    why: str
    low_open: bool = False
    one_shot: bool = False
    auto_only: bool = False

    def describe(self) -> str:
        return f"{'>' if self.low_open else '>='} {_number(self.low)} and <= {_number(self.high)}"

    def accepts(self, value: float) -> bool:
        """0 (the default) or a value within the bound; NaN is never within it."""
        above = value > self.low if self.low_open else value >= self.low
        return value == 0 or (above and value <= self.high)


MAX_STEPS = 1_000_000
INT32_MAX = 2**31 - 1  # the proto fields are int32
# One table for every numeric hyper-parameter (prompt is checked against PROMPT_KINDS, bf16 is a flag). Upper
# bounds are far above what fine-tuning recipes use, so a demanding user is not refused, yet low enough that a
# value cannot allocate absurd tensors or run for weeks. ``tests/services/test_trainer_hyperparameters.py``
# checks that the extreme accepted values build a valid FinetuneSpec, and that deploy/README.md shows this table.
HYPERPARAMETER_BOUNDS: tuple[Bound, ...] = (
    Bound("epochs", 1, 10_000, "SAM fine-tuning recipes run 10-200 epochs; 10,000 leaves room for data sets of a "
          "few images (max_steps caps larger ones)"),
    Bound("max_steps", 1, MAX_STEPS, "recipes run 1e3-1e5 steps; 1e6 is about a day at 10 steps/s on a GPU"),
    Bound("max_steps", 1, 10_000, "fitting steps of a one-shot method; PerSAM-F fits 2 weights and its "
          "recipe uses 1,000 steps", one_shot=True),
    Bound("batch_size", 1, 64, "one step holds the whole batch: 64 x 1024 px RGB float32 inputs are 768 MiB before "
          "activations (64 x 4 MiB embeddings for the decoder); MedSAM trained with 8 images per GPU"),
    Bound("lr", 0, 1, "AdamW peak learning rate; recipes use 1e-5 to 1e-3, and an AdamW step moves each weight by "
          "about lr, so above 1 training diverges",
          low_open=True),
    Bound("rank", 1, 256, "LoRA rank; SAM recipes use 4-64 (SAMed: 4), beyond 256 a LoRA update is as large as "
          "the attention projections it adapts (ViT-B: 768 wide)"),
    Bound("val_fraction", 0, 0.95, "share of the images held out for validation (0 = 0.2); few-shot runs "
          "validate on most of the data (a split left empty fails the job with that message)", low_open=True),
    Bound("seed", 0, INT32_MAX, "any int32 (the proto type): seeds the split, prompts and weights"),
    Bound("patience", 1, 10_000, "validations without improvement before stopping early (0 = never); at most one "
          "validation per epoch, so beyond the epochs bound it never triggers"),
    Bound("crop", 32, 8192, "native-resolution crop side in pixels (0 = whole images); each crop is resized to "
          "the model input (256 px LiteMedSAM, 1024 px ViT SAMs): below 32 px (the encoder's smallest tile) "
          "an instance rarely fits, above 8x the largest input a crop is a whole image"),
    Bound("warmup_steps", 1, 100_000, "linear learning-rate warmup (0 = 10 steps); a few % of a run, at most "
          "10 % of the largest max_steps"),
    Bound("checkpoint_every", 1, MAX_STEPS, "steps between resumable checkpoints (0 = 50); beyond max_steps "
          "only the final state is kept"),
    Bound("time_budget_seconds", 60, MAX_TIME_BUDGET, "the recipe search's budget (0 = 20 min): it trains up to 8 "
          "candidates, each needing its embeddings and a few steps; a week caps a forgotten job", auto_only=True),
)


def applicable_bounds(method: str) -> list[Bound]:
    """One row per field for ``method`` (one-shot methods use their own rows where they have one)."""
    auto = method == AUTO_METHOD
    one_shot = not auto and get_method(method).one_shot
    rows = {b.field: b for b in HYPERPARAMETER_BOUNDS if not b.one_shot and (auto or not b.auto_only)}
    if one_shot:
        rows.update({b.field: b for b in HYPERPARAMETER_BOUNDS if b.one_shot})
    return list(rows.values())


def _one_shot_methods() -> list[str]:
    return [name for name in method_names() if get_method(name).one_shot]


def bounds_table_markdown() -> str:
    """The documented bounds (deploy/README.md embeds it; a test compares them)."""
    lines = ["| hyper-parameter | accepted besides 0 (= default) | why |", "|---|---|---|"]
    for b in HYPERPARAMETER_BOUNDS:
        name = f"`{b.field}`" + (f" ({', '.join(_one_shot_methods())})" if b.one_shot else "") + (
            f" ({AUTO_METHOD})" if b.auto_only else "")
        lines.append(f"| {name} | {b.describe()} | {b.why} |")
    return "\n".join(lines) + "\n"


def check_hyperparameters(hp: Hyperparameters, method: str) -> None:
    """Every numeric field within its :data:`HYPERPARAMETER_BOUNDS` row for ``method``, and a known prompt kind."""
    for bound in applicable_bounds(method):
        value = getattr(hp, bound.field)
        if not bound.accepts(value):
            raise _bad(bound.field, f"must be 0 (the default) or {bound.describe()}, got {_number(value)}")
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
    """Method (a plug-in or ``auto``), adapter name, alias and hyper-parameters (InvalidInput naming the field)."""
    if request.method == AUTO_METHOD:
        for name in AUTO_CHOOSES:
            if getattr(request.hyperparameters, name):
                raise _bad(name, f"method {AUTO_METHOD} chooses it per recipe; leave it 0")
    else:
        get_method(request.method)
        for bound in HYPERPARAMETER_BOUNDS:
            if bound.auto_only and getattr(request.hyperparameters, bound.field):
                raise _bad(bound.field, f"applies to method {AUTO_METHOD} only")
    validate_name("adapter_name", request.adapter_name)
    if request.promote_to:
        validate_name("promote_to", request.promote_to)
    check_hyperparameters(request.hyperparameters, request.method)


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
    method = DEFAULT_METHOD if method == AUTO_METHOD else method  # auto: each recipe sets its own method
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


def build_spec(request: JobRequest, data: Path, out_dir: Path, baseline: Path | None = None) -> FinetuneSpec:
    """The whole job for ``run_finetune`` (``persam`` uses ``max_steps`` as its fitting steps, ``auto`` gets a
    ``time_budget``); ``baseline``: the champion's adapter folder (None: the base model). A bad
    ``min_improvement`` is InvalidInput naming it."""
    hp = request.hyperparameters
    cfg = train_config(request.method, hp)
    val_fraction = hp.val_fraction or DEFAULT_VAL_FRACTION
    return FinetuneSpec(
        data=str(data), out_dir=str(out_dir), train=cfg,
        split=SplitSpec(val_fraction=val_fraction, seed=hp.seed),
        eval=EvalConfig(prompt=cfg.eval_prompt, seed=hp.seed, tiled=bool(cfg.crop)),  # as samforge train does
        adapter_name=request.adapter_name, persam_steps=hp.max_steps or DEFAULT_PERSAM_STEPS,
        guard=GuardOptions(baseline=None if baseline is None else str(baseline),
                           min_improvement=request.min_improvement, allow_regression=request.allow_regression),
        time_budget=float(hp.time_budget_seconds or DEFAULT_TIME_BUDGET) if request.method == AUTO_METHOD else None,
    )
