"""The fine-tuning loop (nanoGPT-plain): AdamW, warmup + cosine ``get_lr``, clipping, bf16 autocast,
checkpoints that resume exactly, early stopping on validation Dice, DDP through ``torchrun``.

Determinism without hidden state: the instance order of epoch ``e`` is a permutation drawn from
``default_rng([seed, e])`` and every prompt of step ``s`` from ``default_rng([seed, s, item])``, so a run
resumed at step ``s`` sees exactly the batches an uninterrupted run sees. A checkpoint holds the
config, step, trainable tensors, optimizer state, RNG state, history and best-so-far weights, and is
written atomically (temp file + ``os.replace``).

``decoder`` trains on embeddings computed once and cached on disk in an :class:`EmbeddingStore`
signed by (model id, preprocessing version, data set fingerprint); encoder-side methods (``lora``,
``adapter``, ``full``) run the image encoder in every step. ``persam`` is not trained here (see
:mod:`sam_core.training.persam`).

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1), each rank takes an equal share of every
global batch and DDP averages the gradients, so N ranks compute the same update as one process
on the same global batch. Backend gloo on CPU, nccl on CUDA. Rank 0 evaluates, checkpoints, reports
progress and publishes the adapter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sam_core.adapters.artifact import adapted_model, adapted_sam, read_adapter_config, save_adapter
from sam_core.data.dataset import SegmentationDataset
from sam_core.data.fingerprint import dataset_fingerprint
from sam_core.data.prompt_sim import PromptConfig, simulate_prompt
from sam_core.errors import InvalidInput
from sam_core.inference.embedding_cache import embedding_key
from sam_core.inference.embedding_store import EmbeddingStore
from sam_core.inference.predictor import Embedding, Predictor
from sam_core.io.images import image_content_hash
from sam_core.modeling.fast_decoder import FastMaskDecoder
from sam_core.modeling.preprocess import preprocess, transform_boxes, transform_coords
from sam_core.modeling.registry import LoadedModel
from sam_core.training.losses import SegLossConfig, segmentation_loss
from sam_core.training.methods import MethodConfig, train_mode, trainable_state

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 4
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    prompt: PromptConfig = field(default_factory=PromptConfig)
    eval_prompt: PromptConfig = field(default_factory=lambda: PromptConfig(box_jitter=0.0, box_jitter_max_px=0))
    loss: SegLossConfig = field(default_factory=SegLossConfig)
    # Native-resolution crops (pixels) around each instance instead of the whole resized image: train
    # the way tiled inference sees small objects. None = whole images.
    crop: int | None = None
    # Wall-clock budget: stop (checkpointed, adapter published) once exceeded. Breaks exact
    # reproducibility, so it is for benchmarks and quick trials, not for resumable production jobs.
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidInput("must be >= 1", field=name)
        if self.lr <= 0:
            raise InvalidInput("must be > 0", field="lr")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @staticmethod
    def from_json(data: dict[str, Any]) -> TrainConfig:
        nested = {"method": MethodConfig, "prompt": PromptConfig, "eval_prompt": PromptConfig, "loss": SegLossConfig}
        values = {k: (nested[k](**v) if k in nested else v) for k, v in data.items()}
        return TrainConfig(**values)


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raise from a progress callback to stop a run: train() first checkpoints the current step (so the
    run resumes exactly from there), then re-raises."""


@dataclass
class ProgressEvent:
    """What a progress callback receives (the trainer service streams these)."""

    state: str  # "embedding" | "training" | "validating" | "done" | "stopped_early" | "evaluating" (finetune)
    step: int
    total_steps: int
    epoch: int
    loss: float | None = None
    lr: float | None = None
    val_dice: float | None = None
    best_val_dice: float | None = None
    eta_seconds: float | None = None
    message: str = ""


@dataclass
class TrainResult:
    """``model`` is the base model with the published adapter applied (rank 0; None on other ranks)."""

    adapter_dir: Path | None
    model: LoadedModel | None
    history: dict[str, list]
    best_val_dice: float | None
    zero_shot_val_dice: float | None
    steps: int
    seconds: float
    stopped_early: bool


def get_lr(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup for ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------ model step
def decode_per_item(sam: nn.Module, embeddings: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None,
                    boxes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """B prompts, each against its own embedding -> (B x 1 x L x L logits, B x 1 IoU predictions).

    The official ``MaskDecoder.predict_masks`` repeats one image embedding per prompt; here every
    prompt brings its own (B x C x h x w), so a batch mixes images. Same weights and math, computed by
    the re-associated :class:`~sam_core.modeling.fast_decoder.FastMaskDecoder` (fewer FLOPs forward and backward).
    """
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    return FastMaskDecoder(sam).forward(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)


class SamTrainModule(nn.Module):
    """forward(images or embeddings, prompts) -> (B x 1 x L x L logits, B x 1 IoU); what DDP wraps."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images: torch.Tensor | None, embeddings: torch.Tensor | None,
                points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None):
        if embeddings is None:
            embeddings = self.sam.image_encoder(images)
        return decode_per_item(self.sam, embeddings, points, boxes)


# ------------------------------------------------------------------------------------------ data
def low_res_target(mask: np.ndarray, img_size: int, low_res: int) -> np.ndarray:
    """H x W bool -> L x L float32 target in the decoder's low-res frame (resized like the image, padded)."""
    h, w = mask.shape
    scale = low_res / max(h, w)
    th, tw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    small = cv2.resize(mask.astype(np.float32), (tw, th), interpolation=cv2.INTER_AREA) >= 0.5
    out = np.zeros((low_res, low_res), np.float32)
    out[:th, :tw] = small
    return out


Window = tuple[int, int, int, int]  # y0, x0, y1, x1 in the original image


def crop_window(mask: np.ndarray, crop: int | None) -> Window:
    """A ``crop`` x ``crop`` native-resolution window centred on the instance, clipped to the image.

    The whole image when ``crop`` is None, the image is no larger than the crop, or the instance does
    not fit in one (those are trained at the whole-image scale).
    """
    h, w = mask.shape
    if crop is None or (h <= crop and w <= crop):
        return (0, 0, h, w)
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if ys[-1] - ys[0] + 1 > crop or xs[-1] - xs[0] + 1 > crop:
        return (0, 0, h, w)

    def start(lo: int, hi: int, length: int) -> int:
        if length <= crop:
            return 0
        return int(min(max((lo + hi + 1) // 2 - crop // 2, 0), length - crop))

    y0, x0 = start(ys[0], ys[-1], h), start(xs[0], xs[-1], w)
    return (y0, x0, min(h, y0 + crop), min(w, x0 + crop))


@dataclass(frozen=True)
class _Item:
    sample_index: int
    instance_index: int
    window: Window


class TrainingData:
    """Instances of one data set split, each seen through a window (the whole image, or a native-
    resolution crop around it), with the window's embedding cached for the decoder method."""

    def __init__(self, ds: SegmentationDataset, predictor: Predictor, *, cache_embeddings: bool,
                 store: EmbeddingStore | None, crop: int | None = None) -> None:
        self.ds = ds
        self.predictor = predictor
        self.spec = predictor.spec
        self.crop = crop
        self.items = []
        for i in range(len(ds)):
            for j, inst in enumerate(ds[i].instances):
                self.items.append(_Item(i, j, crop_window(inst.mask, crop)))
        if not self.items:
            raise InvalidInput("the split has no instances", field="data")
        self.embeddings: dict[tuple[int, Window], Embedding] = {}
        self.inputs: dict[tuple[int, Window], torch.Tensor] = {}
        self.store = store
        self.cache_embeddings = cache_embeddings

    @property
    def windows(self) -> list[tuple[int, Window]]:
        """Distinct (sample, window) pairs: what the decoder method embeds once."""
        return list(dict.fromkeys((it.sample_index, it.window) for it in self.items))

    def view(self, index: int, window: Window) -> np.ndarray:
        y0, x0, y1, x1 = window
        return np.ascontiguousarray(self.ds[index].load_image()[y0:y1, x0:x1])

    def embedding(self, index: int, window: Window) -> Embedding:
        if (index, window) not in self.embeddings:
            image = self.view(index, window)
            key = embedding_key(image_content_hash(image), self.predictor.model_id,
                                self.spec.preprocess_version, None)
            compute = lambda: self.predictor.encode_one(image)  # noqa: E731
            self.embeddings[index, window] = self.store.get_or_compute(key, compute) if self.store is not None \
                else compute()
        return self.embeddings[index, window]

    def model_input(self, index: int, window: Window) -> torch.Tensor:
        """3 x S x S preprocessed view (kept in memory: training splits are small)."""
        if (index, window) not in self.inputs:
            self.inputs[index, window] = preprocess(self.view(index, window), self.spec)[0][0]
        return self.inputs[index, window]

    def prompt_and_mask(self, item: _Item, rng: np.random.Generator, cfg: PromptConfig, sample=None):
        """-> (prompt dict in window coordinates, window mask h x w bool)."""
        sample = sample or self.ds[item.sample_index]
        y0, x0, y1, x1 = item.window
        mask = sample.instances[item.instance_index].mask[y0:y1, x0:x1]
        return simulate_prompt(mask, rng, cfg), mask

    def batch(self, items: list[tuple[int, _Item]], rng_seed: list[int], prompt_cfg: PromptConfig,
              device: torch.device):
        """(position in the global batch, item) pairs -> (images | None, embeddings | None, points | None,
        boxes | None, targets B x 1 x L x L). A prompt depends on (seed, step, position) only, so it is
        the same whichever rank draws it."""
        size, low = self.spec.img_size, self.spec.low_res_size
        images, embeds, coords, labels, boxes, targets = [], [], [], [], [], []
        samples: dict[int, Any] = {}
        for k, item in items:
            sample = samples.setdefault(item.sample_index, self.ds[item.sample_index])
            prompt, mask = self.prompt_and_mask(item, np.random.default_rng([*rng_seed, k]), prompt_cfg, sample)
            if self.cache_embeddings:
                embeds.append(self.embedding(item.sample_index, item.window).features[0])
            else:
                images.append(self.model_input(item.sample_index, item.window))
            if prompt["box"] is not None:
                boxes.append(transform_boxes(prompt["box"][None], mask.shape, size)[0])
            if prompt["point_coords"] is not None:
                coords.append(transform_coords(prompt["point_coords"], mask.shape, size))
                labels.append(prompt["point_labels"])
            targets.append(low_res_target(mask, size, low))
        if coords and len({len(c) for c in coords}) > 1:
            n = max(len(c) for c in coords)  # too little background for all negatives: repeat a point
            coords = [np.concatenate([c, np.repeat(c[-1:], n - len(c), 0)]) for c in coords]
            labels = [np.concatenate([lb, np.repeat(lb[-1:], n - len(lb), 0)]) for lb in labels]
        as_t = lambda a, dt=torch.float32: torch.as_tensor(np.stack(a), dtype=dt, device=device)  # noqa: E731
        return (
            as_t(images) if images else None,
            torch.stack(embeds).to(device) if embeds else None,
            (as_t(coords), as_t(labels, torch.int64)) if coords else None,
            as_t(boxes) if boxes else None,
            as_t(targets)[:, None],
        )


# ------------------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size())


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def _any(flag: bool, info: DistInfo) -> bool:
    if info.world == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoint_path(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}.pt"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def save_checkpoint(out: Path, state: dict[str, Any], keep: int = 2) -> Path:
    path = _checkpoint_path(out, state["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ validation
def validation_dice(predictor: Predictor, data: TrainingData, prompt_cfg: PromptConfig, seed: int,
                    reuse_embeddings: bool) -> float:
    """Mean per-instance Dice on the validation split with deterministic eval prompts.

    Whole-image windows go through :func:`sam_core.evaluation.evaluate.evaluate` (cached embeddings handed over
    when the encoder is frozen). With native-resolution crops every instance is decoded in its own
    window (a proxy for tiled inference, used for model selection).
    """
    from sam_core.evaluation.evaluate import EvalConfig, eval_cache_key, evaluate
    from sam_core.evaluation.metrics import dice
    from sam_core.inference.prompts import Prompt

    if data.crop is None:
        cfg = EvalConfig(prompt=prompt_cfg, seed=seed, keep_worst=0)
        cache: dict = {}
        if reuse_embeddings:
            for i, sample in enumerate(data.ds):
                window = (0, 0, sample.height, sample.width)
                cache[eval_cache_key(predictor, sample.image_id, cfg)] = data.embedding(i, window)
        return float(evaluate(predictor, data.ds, cfg, label="val", embeddings=cache).summary["dice_mean"])
    scores = []
    for k, item in enumerate(data.items):
        prompt, mask = data.prompt_and_mask(item, np.random.default_rng([seed, k]), prompt_cfg)
        emb = data.embedding(item.sample_index, item.window) if reuse_embeddings else \
            predictor.encode_one(data.view(item.sample_index, item.window))
        result = predictor.decode(emb, [Prompt(box=None if prompt["box"] is None else prompt["box"].astype(float),
                                               point_coords=prompt["point_coords"],
                                               point_labels=prompt["point_labels"])], return_low_res=False)
        scores.append(dice(result.masks[0, 0], mask))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------ the loop
def train(model: LoadedModel, train_ds: SegmentationDataset, val_ds: SegmentationDataset | None, cfg: TrainConfig,
          out_dir: str | os.PathLike, *, callback: Callable[[ProgressEvent], None] | None = None,
          resume: bool = True, adapter_name: str | None = None, parent: str | None = None,
          device: str | torch.device | None = None) -> TrainResult:
    """Fine-tune ``model`` (left untouched) with ``cfg.method``; publish ``out_dir/adapter`` at the end.

    ``out_dir`` holds ``checkpoints/``, ``embeddings/`` (decoder method), ``history.json`` and the
    adapter. With ``resume`` an existing checkpoint of the same config continues exactly.
    """
    if cfg.method.method == "persam":
        raise InvalidInput("persam is one-shot: use sam_core.training.persam.fit_persam", field="method")
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device else next(model.sam.parameters()).device
    info = init_distributed(device)
    if cfg.batch_size % info.world:
        raise InvalidInput(f"global batch {cfg.batch_size} is not divisible by {info.world} ranks",
                           field="batch_size")
    emit = callback if (callback and info.is_main) else (lambda event: None)
    with torch.random.fork_rng(devices=[]):  # seeded init (LoRA) without touching the process-wide RNG
        torch.manual_seed(cfg.seed)
        sam = adapted_sam(model, cfg.method).to(device)
    trainable = [p for p in sam.parameters() if p.requires_grad]
    base_predictor = Predictor(model, device=device)
    decoder_only = not cfg.method.encoder_side
    store = None
    if decoder_only:
        fingerprint = dataset_fingerprint(train_ds) + (dataset_fingerprint(val_ds) if val_ds else "")
        signature = {"model_id": model.model_id, "preprocess_version": model.spec.preprocess_version,
                     "encoder_adapter": "", "dataset": fingerprint}
        if info.is_main:  # rank 0 validates (or resets) the store before the others open it
            EmbeddingStore(out / "embeddings", signature=signature, reset_on_mismatch=True)
        _barrier(info)
        store = EmbeddingStore(out / "embeddings", signature=signature)
    train_data = TrainingData(train_ds, base_predictor, cache_embeddings=decoder_only, store=store, crop=cfg.crop)
    val_data = TrainingData(val_ds, base_predictor, cache_embeddings=decoder_only, store=store,
                            crop=cfg.crop) if val_ds else None

    # drop_last: every step sees a full global batch (so DDP ranks always get equal shares)
    steps_per_epoch = max(1, len(train_data.items) // cfg.batch_size)
    if len(train_data.items) < info.world:
        raise InvalidInput(f"{len(train_data.items)} training instances cannot feed {info.world} ranks", field="data")
    total_steps = min(cfg.max_steps or 10**12, cfg.epochs * steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch

    if decoder_only:  # embed every image once (rank 0 fills the shared store, the others read it)
        for data in filter(None, (train_data, val_data)):
            for i, window in data.windows if info.is_main else ():
                data.embedding(i, window)
                emit(ProgressEvent("embedding", 0, total_steps, 0, message=f"embedded {data.ds.image_ids[i]}"))
        _barrier(info)

    module: nn.Module = SamTrainModule(sam)
    if info.world > 1:
        # find_unused_parameters: the single-mask step never touches the multimask heads, nor the key
        # biases of token->image attention (they cancel in the softmax), so those get no gradient
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                                     else None, find_unused_parameters=True)
    # fused: one kernel over all tensors (the per-tensor loop profiled at ~1 s per step, loaded machine)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    history: dict[str, list] = {"step": [], "loss": [], "lr": [], "val_step": [], "val_dice": []}
    step, best_dice, best_state, bad_evals, zero_shot = 0, None, None, 0, None

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        if state["config"] != cfg.to_json() or state["model_id"] != model.model_id:
            raise InvalidInput(f"{out} holds a checkpoint of a different run; use another output folder or "
                               "resume=False", field="out")
        params = dict(sam.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        step, history, best_dice, bad_evals = state["step"], state["history"], state["best_dice"], state["bad_evals"]
        best_state, zero_shot = state["best_state"], state["zero_shot"]
        log.info("resumed %s at step %d", ckpt, step)
    elif val_data is not None and info.is_main:
        emit(ProgressEvent("validating", 0, total_steps, 0, message="zero-shot validation"))
        zero_shot = validation_dice(base_predictor, val_data, cfg.eval_prompt, cfg.seed, decoder_only)

    def current_predictor() -> Predictor:
        view = dataclasses.replace(model, sam=sam)
        if not decoder_only:  # embeddings of a changed encoder are not the base model's
            view = dataclasses.replace(view, adapter=_TrainingAdapter(), adapter_id="training")
        return Predictor(view, device=device)

    def checkpoint_state() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "model_id": model.model_id, "step": step,
            "trainable": trainable_state(sam), "optimizer": optimizer.state_dict(), "history": history,
            "best_dice": best_dice, "bad_evals": bad_evals, "best_state": best_state, "zero_shot": zero_shot,
        }

    stopped_early = False
    t_loop = time.perf_counter()
    first_step = step
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_data.items))
            pos = step % steps_per_epoch
            chosen = [train_data.items[k] for k in order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]]
            if len(chosen) % info.world:  # last partial batch: drop the remainder so ranks stay equal
                chosen = chosen[: len(chosen) - len(chosen) % info.world]
            local = list(enumerate(chosen))[info.rank::info.world]
            lr = get_lr(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_mode(sam)
            images, embeds, points, boxes, targets = train_data.batch(local, [cfg.seed, step], cfg.prompt,
                                                                      device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits, iou_pred = module(images, embeds, points, boxes)
            loss, parts = segmentation_loss(logits.float(), targets, iou_pred.float(), cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            step += 1
            loss_value = _mean_across(parts["total"], info)
            history["step"].append(step)
            history["loss"].append(loss_value)
            history["lr"].append(lr)
            rate = (time.perf_counter() - t_loop) / max(1, step - first_step)
            emit(ProgressEvent("training", step, total_steps, epoch, loss=loss_value, lr=lr, best_val_dice=best_dice,
                               eta_seconds=rate * (total_steps - step)))

            out_of_time = cfg.max_seconds is not None and _any(time.perf_counter() - t_start > cfg.max_seconds, info)
            stop = False
            if val_data is not None and (step % eval_every == 0 or step == total_steps or out_of_time):
                if info.is_main:
                    sam.eval()
                    emit(ProgressEvent("validating", step, total_steps, epoch))
                    score = validation_dice(current_predictor(), val_data, cfg.eval_prompt, cfg.seed, decoder_only)
                    history["val_step"].append(step)
                    history["val_dice"].append(score)
                    if best_dice is None or score > best_dice:
                        best_dice, best_state, bad_evals = score, trainable_state(sam), 0
                    else:
                        bad_evals += 1
                    stop = cfg.patience > 0 and bad_evals >= cfg.patience
                    emit(ProgressEvent("training", step, total_steps, epoch, loss=loss_value, val_dice=score,
                                       best_val_dice=best_dice))
                stop = _any(stop, info)
            if info.is_main and (step % cfg.checkpoint_every == 0 or step == total_steps or stop or out_of_time):
                save_checkpoint(out, checkpoint_state())
            if stop or out_of_time:
                stopped_early = True
                if out_of_time:
                    log.info("time budget of %.0fs reached at step %d", cfg.max_seconds, step)
                break
    except StopTraining:
        if info.is_main and step > first_step:  # resume exactly from the step the run was stopped at
            save_checkpoint(out, checkpoint_state())
        raise

    adapter_dir, trained = None, None
    if info.is_main:
        (out / "history.json").write_text(json.dumps(history, indent=2))
        final = best_state if best_state is not None else trainable_state(sam)
        adapter_dir = out / "adapter"
        if adapter_dir.exists():  # a resumed run that had already published
            config = read_adapter_config(adapter_dir)
        else:
            metrics = {"val_dice": best_dice, "zero_shot_val_dice": zero_shot, "steps": step,
                       "train_instances": len(train_data.items), "stopped_early": stopped_early}
            config = save_adapter(adapter_dir, model, final, cfg.method, metrics=metrics, parent=parent,
                                  name=adapter_name)
        params = dict(sam.named_parameters())
        with torch.no_grad():
            for name, tensor in final.items():
                params[name].copy_(tensor)
        trained = adapted_model(model, sam, config)
        emit(ProgressEvent("stopped_early" if stopped_early else "done", step, total_steps, step // steps_per_epoch,
                           best_val_dice=best_dice, message=str(adapter_dir)))
    _barrier(info)
    return TrainResult(adapter_dir=adapter_dir, model=trained, history=history, best_val_dice=best_dice,
                       zero_shot_val_dice=zero_shot, steps=step, seconds=time.perf_counter() - t_start,
                       stopped_early=stopped_early)


@dataclass(frozen=True)
class _TrainingAdapter:
    """Marks a model whose encoder is being trained (its embeddings must not be mixed with the base's)."""

    shares_base_embeddings: bool = False


def _mean_across(value: float, info: DistInfo) -> float:
    if info.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world
