"""The fine-tuning loop (nanoGPT-plain): AdamW, warmup + cosine ``get_lr``, clipping, bf16 autocast,
checkpoints that resume exactly, early stopping on validation Dice, DDP through ``torchrun``.

Determinism without hidden state: the instance order of epoch ``e`` is a permutation drawn from
``default_rng([seed, e])`` and every prompt of step ``s`` from ``default_rng([seed, s, item])``, so a run
resumed at step ``s`` sees exactly the batches an uninterrupted run sees. A checkpoint
(:mod:`sam_core.training.checkpoint`) holds the config, step, trainable tensors, optimizer state, history
and best-so-far weights.

Model selection: each validation scores the mean Dice over all validation instances (history ``val_dice_all``)
and over the instances the model can resolve at its input scale (:mod:`sam_core.data.resolution`: at least
2 px on a side in the resized image, or in the crop with ``cfg.crop``). The best state, early stopping,
``best_val_dice``, the zero-shot score and history ``val_dice`` use the resolvable figure whenever the split has
a resolvable instance (:attr:`~sam_core.training.validation.ValidationScore.selection`), the all-instance one
otherwise: Dice on specks no input can resolve is noise.

A method that leaves the image encoder unchanged (``decoder``) trains on embeddings computed once and
cached on disk in an :class:`EmbeddingStore` signed by (model id, preprocessing version, data set
fingerprint). A method that trains the encoder from some block on (``lora``, ``adapter``: the first
attention block) trains on the frozen prefix's activations, computed once per window and stored in
``prefix_cache/`` signed by (model, weights, preprocessing, cut, precision, data set, torch version)
(:mod:`sam_core.training.prefix_cache`): only the suffix runs in a step, and the steps compute what they would
from the images. ``full`` runs the whole image encoder in every step. One-shot methods are not trained here.

Distributed (:mod:`sam_core.training.distributed`): launched by ``torchrun`` (``WORLD_SIZE`` > 1), each rank
takes an equal share of every global batch and DDP averages the gradients. Rank 0 evaluates, checkpoints,
reports progress and publishes the adapter.

:func:`train` is a plain sequence of small steps: :func:`prepare_run`, :func:`embed_frozen`,
:func:`cache_prefix`, :func:`resume_or_score_base`, then :func:`train_step` / :func:`validate` /
:func:`save_checkpoint` until done, then :func:`publish`. :func:`cache_encoder_outputs` runs only the caching
steps, for a caller that wants the caches filled before a timed run starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sam_core.adapters.artifact import adapted_model, adapted_net, read_adapter_config, save_adapter
from sam_core.data.dataset import SegmentationDataset
from sam_core.data.fingerprint import dataset_fingerprint
from sam_core.errors import InvalidInput
from sam_core.inference.embedding_store import EmbeddingStore
from sam_core.inference.predictor import Predictor
from sam_core.modeling.family import EncoderPrefix, Features, PromptBatch, SegmentationModel
from sam_core.modeling.registry import LoadedModel
from sam_core.training import checkpoint
from sam_core.training.config import Phase, ProgressEvent, StopTraining, TrainConfig, TrainResult, get_lr
from sam_core.training.data import TrainingData
from sam_core.training.distributed import DistInfo, any_rank, barrier, init_distributed, mean_across_ranks
from sam_core.training.grad_checkpoint import checkpoint_encoder_blocks
from sam_core.training.losses import segmentation_loss
from sam_core.training.methods import train_mode, trainable_state
from sam_core.training.prefix_cache import ActivationStore, PrefixCache, prefix_signature
from sam_core.training.validation import validation_score

log = logging.getLogger(__name__)


class TrainStep(nn.Module):
    """forward(images, features or the frozen prefix's activations, prompts) -> (B x 1 x L x L logits, B x 1
    IoU); what DDP wraps."""

    def __init__(self, net: SegmentationModel, prefix: EncoderPrefix | None) -> None:
        super().__init__()
        self.net = net
        self.prefix = prefix

    def forward(self, images: torch.Tensor | None, features: Features | None, prompts: PromptBatch,
                activations: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if activations is not None:
            assert self.prefix is not None
            features = self.prefix.suffix(activations)
        if features is None:
            assert images is not None
            features = self.net.encode(images)
        return self.net.decode_per_item(features, prompts)


def _empty_history() -> dict[str, list[float]]:
    return {"step": [], "loss": [], "lr": [], "val_step": [], "val_dice": [], "val_dice_all": []}


@dataclass
class RunState:
    """What resumes exactly besides the weights and the optimizer (all of it is in every checkpoint)."""

    step: int = 0
    history: dict[str, list[float]] = field(default_factory=_empty_history)
    best_dice: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals: int = 0
    zero_shot: float | None = None


@dataclass
class TrainingRun:
    """Everything one call of :func:`train` works with."""

    model: LoadedModel
    cfg: TrainConfig
    out: Path
    info: DistInfo
    device: torch.device
    net: SegmentationModel
    module: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    train_data: TrainingData
    val_data: TrainingData | None
    emit: Callable[[ProgressEvent], None]
    total_steps: int
    steps_per_epoch: int
    t_start: float
    state: RunState = field(default_factory=RunState)
    stopped_early: bool = False
    out_of_time: bool = False  # stopped by cfg.max_seconds (a resumed call with a new budget continues it)
    loop_start: tuple[float, int] = (0.0, 0)  # (clock, step) when this process started stepping: the ETA's base

    @property
    def frozen_encoder(self) -> bool:
        return not self.cfg.method.changes_image_encoder

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every or self.steps_per_epoch


def train(model: LoadedModel, train_ds: SegmentationDataset, val_ds: SegmentationDataset | None, cfg: TrainConfig,
          out_dir: str | os.PathLike[str], *, callback: Callable[[ProgressEvent], None] | None = None,
          resume: bool = True, adapter_name: str | None = None, parent: str | None = None,
          device: str | torch.device | None = None) -> TrainResult:
    """Fine-tune ``model`` (left untouched) with ``cfg.method``; publish ``out_dir/adapter`` at the end.

    ``out_dir`` holds ``checkpoints/``, ``embeddings/`` (frozen-encoder methods), ``history.json`` and the
    adapter. With ``resume`` an existing checkpoint of the same config continues exactly.
    """
    if cfg.method.plugin.one_shot:
        raise InvalidInput(f"{cfg.method.method} is one-shot: it is fitted by its own procedure, not trained",
                           field="method")
    run = prepare_run(model, train_ds, val_ds, cfg, Path(out_dir), callback, device)
    embed_frozen(run)
    cache_prefix(run)
    resume_or_score_base(run, resume)
    first_step = run.state.step
    run.loop_start = (time.perf_counter(), first_step)
    try:
        while run.state.step < run.total_steps:
            if not _advance(run):
                break
    except StopTraining:
        if run.info.is_main and run.state.step > first_step:  # resume exactly from the step it was stopped at
            save_checkpoint(run)
        raise
    adapter_dir, trained = publish(run, adapter_name, parent) if run.info.is_main else (None, None)
    barrier(run.info)
    return TrainResult(adapter_dir=adapter_dir, model=trained, history=run.state.history,
                       best_val_dice=run.state.best_dice, zero_shot_val_dice=run.state.zero_shot,
                       steps=run.state.step, seconds=time.perf_counter() - run.t_start,
                       stopped_early=run.stopped_early, out_of_time=run.out_of_time)


def prepare_run(model: LoadedModel, train_ds: SegmentationDataset, val_ds: SegmentationDataset | None,
                cfg: TrainConfig, out: Path, callback: Callable[[ProgressEvent], None] | None,
                device: str | torch.device | None) -> TrainingRun:
    """The trainable network (seeded init), the data (with the embedding store), DDP and the optimizer."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device) if device else next(model.net.parameters()).device
    info = init_distributed(dev)
    if cfg.batch_size % info.world:
        raise InvalidInput(f"global batch {cfg.batch_size} is not divisible by {info.world} ranks", field="batch_size")
    with torch.random.fork_rng(devices=[]):  # seeded init (LoRA) without touching the process-wide RNG
        torch.manual_seed(cfg.seed)
        net = adapted_net(model, cfg.method).to(dev)
    frozen = not cfg.method.changes_image_encoder
    if cfg.grad_checkpoint and not frozen:
        checkpoint_encoder_blocks(net)
    store = _embedding_store(model, train_ds, val_ds, out, info) if frozen else None
    base = Predictor(model, device=dev)
    train_data = TrainingData(train_ds, base, cache_embeddings=frozen, store=store, crop=cfg.crop,
                              all_windows=cfg.crop_all_windows)
    val_data = TrainingData(val_ds, base, cache_embeddings=frozen, store=store, crop=cfg.crop,
                            max_instances=cfg.val_max_instances) if val_ds else None
    prefix = _prefix_cache(model, net, train_ds, val_ds, cfg, out, info, dev)
    train_data.prefix = prefix
    if len(train_data.items) < info.world:
        raise InvalidInput(f"{len(train_data.items)} training instances cannot feed {info.world} ranks", field="data")
    # drop_last: every step sees a full global batch (so DDP ranks always get equal shares)
    steps_per_epoch = max(1, len(train_data.items) // cfg.batch_size)
    trainable = [p for p in net.parameters() if p.requires_grad]
    return TrainingRun(
        model=model, cfg=cfg, out=out, info=info, device=dev, net=net,
        module=_wrap(net, prefix.split if prefix else None, info, dev),
        # fused: one kernel over all trainable tensors instead of a per-tensor loop
        optimizer=torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True),
        trainable=trainable, train_data=train_data, val_data=val_data,
        emit=callback if (callback and info.is_main) else (lambda event: None),
        total_steps=min(cfg.max_steps or 10**12, cfg.epochs * steps_per_epoch), steps_per_epoch=steps_per_epoch,
        t_start=t_start)


def _embedding_store(model: LoadedModel, train_ds: SegmentationDataset, val_ds: SegmentationDataset | None,
                     out: Path, info: DistInfo) -> EmbeddingStore:
    fingerprint = dataset_fingerprint(train_ds) + (dataset_fingerprint(val_ds) if val_ds else "")
    levels = {name: list(shape) for name, shape in model.net.feature_shapes().items()}
    signature = {"model_id": model.model_id, "preprocess_version": model.spec.preprocess_version,
                 "encoder_adapter": "", "dataset": fingerprint, "features": json.dumps(levels)}
    if info.is_main:  # rank 0 validates (or resets) the store before the others open it
        EmbeddingStore(out / "embeddings", signature=signature, reset_on_mismatch=True)
    barrier(info)
    return EmbeddingStore(out / "embeddings", signature=signature)


def _prefix_cache(model: LoadedModel, net: SegmentationModel, train_ds: SegmentationDataset,
                  val_ds: SegmentationDataset | None, cfg: TrainConfig, out: Path, info: DistInfo,
                  device: torch.device) -> PrefixCache | None:
    """The frozen-prefix cache of a method that trains the encoder from some block on, else None."""
    first = cfg.method.plugin.first_trained_module(net)
    split = net.encoder_prefix(first) if cfg.prefix_cache and first is not None else None
    if split is None:
        return None
    fingerprint = dataset_fingerprint(train_ds) + (dataset_fingerprint(val_ds) if val_ds else "")
    signature = prefix_signature(model.model_id, model.weights_sha256, model.spec.preprocess_version, split.cut,
                                 cfg.bf16, fingerprint)
    if info.is_main:  # rank 0 validates (or resets) the store before the others open it
        ActivationStore(out / "prefix_cache", signature=signature, reset_on_mismatch=True)
    barrier(info)
    return PrefixCache(split, ActivationStore(out / "prefix_cache", signature=signature), device, cfg.bf16)


def _wrap(net: SegmentationModel, prefix: EncoderPrefix | None, info: DistInfo, device: torch.device) -> nn.Module:
    module: nn.Module = TrainStep(net, prefix)
    if info.world > 1:
        # find_unused_parameters: the single-mask step never touches the multimask heads, nor the key
        # biases of token->image attention (they cancel in the softmax), so those get no gradient
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return module


def embed_frozen(run: TrainingRun) -> None:
    """With a frozen encoder, embed every window once (rank 0 fills the shared store, the others read it)."""
    if not run.frozen_encoder:
        return
    for data in filter(None, (run.train_data, run.val_data)):
        for i, window in data.windows if run.info.is_main else ():
            data.embedding(i, window)
            run.emit(ProgressEvent(Phase.EMBEDDING, 0, run.total_steps, 0, message=f"embedded {data.ds.image_ids[i]}"))
    barrier(run.info)


def cache_prefix(run: TrainingRun) -> None:
    """With a cached encoder prefix, compute every training window's activations once (rank 0 fills the
    shared store, the others read it)."""
    data = run.train_data
    if data.prefix is None:
        return
    train_mode(run.net)  # the mode the training step runs the prefix in
    for i, window in data.windows if run.info.is_main else ():
        data.prefix_activations(i, window)
        run.emit(ProgressEvent(Phase.EMBEDDING, 0, run.total_steps, 0,
                               message=f"cached the encoder prefix of {data.ds.image_ids[i]}"))
    barrier(run.info)


def cache_encoder_outputs(model: LoadedModel, train_ds: SegmentationDataset, val_ds: SegmentationDataset | None,
                          cfg: TrainConfig, out_dir: str | os.PathLike[str], *,
                          callback: Callable[[ProgressEvent], None] | None = None,
                          device: str | torch.device | None = None) -> None:
    """Fill ``out_dir``'s ``embeddings/`` (frozen encoder) or ``prefix_cache/`` (cached encoder prefix) as
    :func:`train` with the same arguments would before its first step, and nothing else: a later ``train`` into
    ``out_dir`` finds every entry (its ``max_seconds`` then counts training only)."""
    run = prepare_run(model, train_ds, val_ds, cfg, Path(out_dir), callback, device)
    embed_frozen(run)
    cache_prefix(run)


def resume_or_score_base(run: TrainingRun, resume: bool) -> None:
    """Continue from the latest checkpoint of this run, or score the base model on the validation split."""
    path = checkpoint.latest_checkpoint(run.out) if resume else None
    if path is not None:
        saved = checkpoint.load_checkpoint(path)
        if not _same_run(saved["config"], run.cfg) or saved["model_id"] != run.model.model_id:
            raise InvalidInput(f"{run.out} holds a checkpoint of a different run; use another output folder or "
                               "resume=False", field="out")
        _load_trainable(run.net, saved["trainable"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.state = RunState(step=saved["step"], history=saved["history"], best_dice=saved["best_dice"],
                             best_state=saved["best_state"], bad_evals=saved["bad_evals"], zero_shot=saved["zero_shot"])
        log.info("resumed %s at step %d", path, run.state.step)
    elif run.val_data is not None and run.info.is_main:
        run.emit(ProgressEvent(Phase.VALIDATING, 0, run.total_steps, 0, message="zero-shot validation"))
        run.state.zero_shot = validation_score(Predictor(run.model, device=run.device), run.val_data,
                                               run.cfg.eval_prompt, run.cfg.seed, run.frozen_encoder).selection


def _same_run(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """True when a checkpoint's config is ``cfg`` up to the prefix-cache and gradient-checkpointing switches,
    which change how a step computes, not what (a run resumes across them, and from checkpoints written before
    they existed), and up to the time budget: a resumed call gets a budget of its own (``--method auto`` gives
    its winner the time the search left this way). A setting a checkpoint predates counts as its default."""
    defaults = TrainConfig().to_json()  # a checkpoint written before a setting existed ran with its default

    def what(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in {**defaults, **config}.items()
                if k not in ("prefix_cache", "grad_checkpoint", "max_seconds")}

    return what(saved) == what(cfg.to_json())


def _load_trainable(net: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def _advance(run: TrainingRun) -> bool:
    """One optimiser step, then validation and checkpoint when due; False when the run must stop now."""
    loss = train_step(run)
    step, cfg = run.state.step, run.cfg
    out_of_time = cfg.max_seconds is not None and any_rank(time.perf_counter() - run.t_start > cfg.max_seconds,
                                                           run.info)
    stop = False
    if run.val_data is not None and (step % run.eval_every == 0 or step == run.total_steps or out_of_time):
        stop = any_rank(validate(run, run.val_data, loss) if run.info.is_main else False, run.info)
    if run.info.is_main and (step % cfg.checkpoint_every == 0 or step == run.total_steps or stop or out_of_time):
        save_checkpoint(run)
    if stop or out_of_time:
        run.stopped_early, run.out_of_time = True, out_of_time and not stop and step < run.total_steps
        if out_of_time:
            log.info("time budget of %.0fs reached at step %d", cfg.max_seconds, step)
        return False
    return True


def train_step(run: TrainingRun) -> float:
    """One optimiser step on this rank's share of the global batch; returns the loss averaged over ranks."""
    cfg, state, info = run.cfg, run.state, run.info
    epoch = state.step // run.steps_per_epoch
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(run.train_data.items))
    pos = state.step % run.steps_per_epoch
    chosen = [run.train_data.items[k] for k in order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]]
    if len(chosen) % info.world:  # last partial batch: drop the remainder so ranks stay equal
        chosen = chosen[: len(chosen) - len(chosen) % info.world]
    local = list(enumerate(chosen))[info.rank::info.world]
    lr = get_lr(state.step, cfg, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    train_mode(run.net)
    batch = run.train_data.batch(local, [cfg.seed, state.step], cfg.prompt, run.device)
    with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits, iou_pred = run.module(batch.images, batch.features, batch.prompts, batch.activations)
    loss, parts = segmentation_loss(logits.float(), batch.targets, iou_pred.float(), cfg.loss)
    run.optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
    run.optimizer.step()
    state.step += 1
    loss_value = mean_across_ranks(parts["total"], info)
    for key, value in (("step", state.step), ("loss", loss_value), ("lr", lr)):
        state.history[key].append(value)
    started, first_step = run.loop_start
    rate = (time.perf_counter() - started) / max(1, state.step - first_step)
    run.emit(ProgressEvent(Phase.TRAINING, state.step, run.total_steps, epoch, loss=loss_value, lr=lr,
                           best_val_dice=state.best_dice, eta_seconds=rate * (run.total_steps - state.step)))
    return loss_value


def validate(run: TrainingRun, val_data: TrainingData, loss: float) -> bool:
    """Score the current weights on ``val_data`` (rank 0); True when patience has run out."""
    state, epoch = run.state, run.state.step // run.steps_per_epoch
    run.net.eval()
    run.emit(ProgressEvent(Phase.VALIDATING, state.step, run.total_steps, epoch))
    measured = validation_score(_current_predictor(run), val_data, run.cfg.eval_prompt, run.cfg.seed,
                                run.frozen_encoder)
    score = measured.selection
    state.history["val_step"].append(state.step)
    state.history["val_dice"].append(score)
    state.history.setdefault("val_dice_all", []).append(measured.dice_all)  # absent from older checkpoints
    if state.best_dice is None or score > state.best_dice:
        state.best_dice, state.best_state, state.bad_evals = score, trainable_state(run.net), 0
    else:
        state.bad_evals += 1
    run.emit(ProgressEvent(Phase.TRAINING, state.step, run.total_steps, epoch, loss=loss, val_dice=score,
                           best_val_dice=state.best_dice,
                           message=f"val Dice {measured.dice_resolvable:.4f} over {measured.n_resolvable} resolvable "
                                   f"instances, {measured.dice_all:.4f} over all {measured.n}"))
    return run.cfg.patience > 0 and state.bad_evals >= run.cfg.patience


def _current_predictor(run: TrainingRun) -> Predictor:
    view = dataclasses.replace(run.model, net=run.net)
    if not run.frozen_encoder:  # embeddings of an encoder being trained are not the base model's
        view = dataclasses.replace(view, adapter_id="training", encoder_adapter_id="training")
    return Predictor(view, device=run.device)


def save_checkpoint(run: TrainingRun) -> None:
    state = run.state
    checkpoint.save_checkpoint(run.out, {
        "format": checkpoint.CHECKPOINT_FORMAT, "config": run.cfg.to_json(), "model_id": run.model.model_id,
        "step": state.step, "trainable": trainable_state(run.net), "optimizer": run.optimizer.state_dict(),
        "history": state.history, "best_dice": state.best_dice, "bad_evals": state.bad_evals,
        "best_state": state.best_state, "zero_shot": state.zero_shot,
    })


def publish(run: TrainingRun, adapter_name: str | None, parent: str | None) -> tuple[Path, LoadedModel]:
    """Write the history and the best state as ``out/adapter`` (kept if a resumed run had published it);
    returns the folder and the base model with that adapter applied."""
    state = run.state
    (run.out / "history.json").write_text(json.dumps(state.history, indent=2))
    final = state.best_state if state.best_state is not None else trainable_state(run.net)
    adapter_dir = run.out / "adapter"
    if adapter_dir.exists():  # a resumed run that had already published
        config = read_adapter_config(adapter_dir)
    else:
        metrics: dict[str, Any] = {"val_dice": state.best_dice, "zero_shot_val_dice": state.zero_shot,
                                   "steps": state.step, "train_instances": len(run.train_data.items),
                                   "stopped_early": run.stopped_early}
        config = save_adapter(adapter_dir, run.model, final, run.cfg.method, metrics=metrics, parent=parent,
                              name=adapter_name)
    _load_trainable(run.net, final)
    run.emit(ProgressEvent(Phase.STOPPED_EARLY if run.stopped_early else Phase.DONE, state.step, run.total_steps,
                           state.step // run.steps_per_epoch, best_val_dice=state.best_dice, message=str(adapter_dir)))
    return adapter_dir, adapted_model(run.model, run.net, config)
