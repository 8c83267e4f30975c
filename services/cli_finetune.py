"""``samforge train``, ``samforge eval`` and ``samforge adapters inspect``.

``samforge train`` starts by printing the hardware preset (:mod:`sam_core.training.presets`: chosen from what
torch sees, or ``--preset``; ``--batch-size``, ``--bf16`` / ``--no-bf16``, ``--threads`` and
``--grad-checkpoint`` / ``--no-grad-checkpoint`` override its values)
and carries it in its first progress event (the data check's, as a second line). ``--method auto
--time-budget 20m`` runs the recipe search of :mod:`sam_core.training.auto` and prints its table.

``samforge train`` exit status: 0 the candidate was accepted (``<out>/adapter/``), 3 the guard rejected it
(``<out>/rejected/``, nothing in ``<out>/adapter/``; see :mod:`sam_core.training.guard`), 2 bad input, 4 stopped
by SIGTERM, anything else a failure. ``<out>/result.json`` (written by :func:`services.trainer.worker.write_result`)
holds the status, the exit code and the run's summary with the guard's verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sam_core.training.auto import AUTO_METHOD
from sam_core.training.config import Phase, ProgressEvent
from sam_core.training.guard import DEFAULT_HELDOUT_FRACTION, DEFAULT_MIN_IMPROVEMENT
from sam_core.training.methods import DEFAULT_METHOD, get_method, method_names
from sam_core.training.presets import PRESETS
from services.trainer.worker import EventsFile, StopOnSigterm

if TYPE_CHECKING:
    from sam_core.evaluation.evaluate import EmbeddingCache
    from sam_core.training.finetune import FinetuneResult, FinetuneSpec
    from sam_core.training.guard import HeldoutSplit
    from sam_core.training.presets import Preset

AUTO_HELP = ("auto: a time-budgeted search over decoder (whole / crops) and lora r4 / r8 at two learning rates, "
             "scored on the held-out split (--time-budget; each recipe sets its own lr, rank and crop)")


class ProgressBar:
    """One-line progress (step/total, loss, val Dice, ETA) on a terminal; one line per update otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 28) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.last_val: float | None = None
        self.last_print = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        if event.val_dice is not None:
            self.last_val = event.val_dice
        if event.state is Phase.CHECKING_DATA:
            print(event.message, file=self.stream, flush=True)
            return
        if event.state is Phase.EVALUATING and event.message:
            print(event.message, file=self.stream, flush=True)
            return
        if event.state in (Phase.EMBEDDING, Phase.VALIDATING, Phase.EVALUATING):
            if not self.tty and event.state is Phase.VALIDATING:
                print(f"[{event.state.value}] step {event.step}", file=self.stream, flush=True)
            return
        total = max(1, event.total_steps)
        done = int(self.width * min(event.step, total) / total)
        bar = "#" * done + "-" * (self.width - done)
        parts = [f"[{bar}] {event.step}/{total}"]
        if event.loss is not None:
            parts.append(f"loss {event.loss:.4f}")
        if self.last_val is not None:
            parts.append(f"val Dice {self.last_val:.4f}")
        if event.eta_seconds is not None:
            parts.append(f"ETA {event.eta_seconds:5.0f}s")
        if event.state.final:
            parts.append(event.state.value.replace("_", " "))
        line = "  ".join(parts)
        now = time.monotonic()
        final = event.state.final
        if self.tty:
            print("\r" + line.ljust(100), end="\n" if final else "", file=self.stream, flush=True)
        elif final or now - self.last_print > 5 or event.val_dice is not None:
            print(line, file=self.stream, flush=True)
            self.last_print = now


def add_train_args(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="fine-tune on a data set and publish an adapter")
    p.add_argument("--data", required=True,
                   help="folder (images/ + masks/ or masks_instances/), COCO .json, or npz folder")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=[*method_names(), AUTO_METHOD],
                   help="; ".join([*(f"{name}: {get_method(name).summary}" for name in method_names()), AUTO_HELP]))
    p.add_argument("--time-budget", help="--method auto: the search's wall-clock budget, e.g. 300, 90s, 20m, 1.5h "
                                         "(default 20m)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="hardware preset (default: chosen from what torch sees); explicit flags override its values")
    p.add_argument("--out", required=True, help="run folder: checkpoints, embeddings, adapter/, eval/")
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--checkpoint", help="base weights for vit_b/vit_l/vit_h")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N (under torchrun, auto = cuda:LOCAL_RANK when CUDA is present)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (default: the preset's)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--adapter-ratio", type=float, default=0.25, help="adapter bottleneck width / dim")
    p.add_argument("--prompt", default="box", choices=["box", "point", "box+point"], help="training prompts")
    p.add_argument("--eval-prompt", default="box", choices=["box", "point", "box+point"])
    p.add_argument("--box-jitter", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-first-last", help="N_TRAIN,N_VAL: first/last of the sorted image ids")
    p.add_argument("--min-area", type=int, default=0, help="drop instances smaller than this (pixels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the preset's)")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction,
                   help="recompute encoder block activations in the backward pass: less memory for encoder-side "
                        "methods, one more forward pass (default: the preset's, on for GPUs)")
    p.add_argument("--patience", type=int, default=0, help="early stopping after N validations without gain")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations (0 = each epoch)")
    p.add_argument("--val-max-instances", type=int, default=50,
                   help="instances scored per validation image, the first ones (0 = all); dense data (hundreds "
                        "of cells per image) otherwise spends more time validating than training")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--crop", type=int, default=0,
                   help="train on native-resolution crops of this size around instances and evaluate on tiles "
                        "(small objects in large images); 0 = whole images")
    p.add_argument("--crop-all-windows", action="store_true",
                   help="with --crop, show each instance through any crop of the half-crop grid that contains it, "
                        "drawn per step, as tiled inference may see it (more crops to embed)")
    p.add_argument("--max-seconds", type=float, help="wall-clock training budget (stops, keeps the best state)")
    p.add_argument("--persam-steps", type=int, default=200)
    p.add_argument("--name", help="adapter name recorded in the artifact")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    p.add_argument("--baseline", help="champion adapter folder the run must beat on its held-out split (default: "
                                      "the base model, with a new held-out split)")
    p.add_argument("--min-improvement", type=float, default=DEFAULT_MIN_IMPROVEMENT,
                   help="accept only if candidate >= baseline + this on the held-out split (Dice; default 0: no "
                        "regression)")
    p.add_argument("--allow-regression", action="store_true", help="publish even if the baseline scores higher")
    p.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                   help="share of the images a new held-out split takes (ignored when the baseline has one)")
    p.add_argument("--events", help="append one JSON line per progress event to this file (rank 0; the trainer "
                                    "service tails it); <out>/result.json is written at the end either way")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate the base model (and an adapter) on a data set")
    e.add_argument("--data", required=True)
    e.add_argument("--adapter", action="append", default=[], help="adapter folder (repeat to compare several)")
    e.add_argument("--model", default="litemedsam")
    e.add_argument("--checkpoint")
    e.add_argument("--split", default="all", choices=["all", "val", "heldout"],
                   help="all images; the val split as `samforge train` drew it (the adapter's held-out images "
                        "removed first, then --val-fraction / --seed); or the adapter's signed held-out split, "
                        "scored with its own settings (the score the publishing guard compared)")
    e.add_argument("--val-fraction", type=float, default=0.2)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--prompt", default="box", choices=["box", "point", "box+point"])
    e.add_argument("--tile", action="store_true", help="native-resolution tiles")
    e.add_argument("--out", default="out/eval")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("adapters", help="adapter artifacts")
    asub = a.add_subparsers(dest="adapters_command", required=True)
    inspect = asub.add_parser("inspect", help="print an adapter's config and verify its tensors")
    inspect.add_argument("path")
    inspect.add_argument("--model", help="also check that it loads on this base model")
    inspect.add_argument("--checkpoint")
    inspect.set_defaults(func=cmd_adapters_inspect)


def _first_last(text: str) -> tuple[int, int]:
    """``--split-first-last N_TRAIN,N_VAL`` as (n_train, n_val)."""
    values = [int(v) for v in text.split(",")]
    if len(values) != 2:
        raise SystemExit(f"samforge train: --split-first-last needs N_TRAIN,N_VAL, got {text!r}")
    return values[0], values[1]


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The preset for this machine (or ``--preset``) with the explicitly given flags over its values."""
    from sam_core.errors import InvalidInput
    from sam_core.training.presets import Machine, choose_preset, override

    if args.threads is not None and args.threads < 1:
        raise InvalidInput(f"must be >= 1, got {args.threads}", field="threads")
    return override(choose_preset(Machine.detect(), args.preset), batch_size=args.batch_size, bf16=args.bf16,
                    threads=args.threads, grad_checkpoint=args.grad_checkpoint)


def spec_from_args(args: argparse.Namespace, preset: Preset | None = None) -> FinetuneSpec:
    """The run ``samforge train``'s arguments describe (the trainer builds its workers' argv to reproduce its
    own :func:`services.trainer.job_spec.build_spec`); batch size and precision come from ``preset`` (default:
    :func:`preset_from_args`) unless given."""
    from sam_core.data.prompt_sim import prompt_config
    from sam_core.errors import InvalidInput
    from sam_core.evaluation.evaluate import EvalConfig
    from sam_core.training.auto import DEFAULT_TIME_BUDGET, parse_time_budget
    from sam_core.training.config import TrainConfig
    from sam_core.training.finetune import FinetuneSpec, SplitSpec
    from sam_core.training.guard import GuardOptions
    from sam_core.training.methods import MethodConfig

    preset = preset or preset_from_args(args)
    auto = args.method == AUTO_METHOD
    if args.time_budget is not None and not auto:
        raise InvalidInput("applies to --method auto only", field="time_budget")
    budget = parse_time_budget(args.time_budget or DEFAULT_TIME_BUDGET) if auto else None
    method = MethodConfig(DEFAULT_METHOD if auto else args.method, rank=args.rank, alpha=float(args.rank),
                          adapter_ratio=args.adapter_ratio)
    first_last = _first_last(args.split_first_last) if args.split_first_last else None
    train_cfg = TrainConfig(
        method=method, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=preset.global_batch, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, bf16=preset.bf16, seed=args.seed, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, patience=args.patience, prompt=prompt_config(args.prompt, args.box_jitter),
        eval_prompt=prompt_config(args.eval_prompt), crop=args.crop or None, max_seconds=args.max_seconds,
        grad_checkpoint=preset.grad_checkpoint, val_max_instances=args.val_max_instances or None,
        crop_all_windows=args.crop_all_windows,
    )
    return FinetuneSpec(
        data=args.data, out_dir=args.out, train=train_cfg,
        split=SplitSpec(val_fraction=args.val_fraction, seed=args.seed, first_last=first_last,
                        min_area=args.min_area),
        eval=EvalConfig(prompt=prompt_config(args.eval_prompt), seed=args.seed, tiled=bool(args.crop)),
        adapter_name=args.name,
        persam_steps=args.persam_steps,
        guard=GuardOptions(baseline=args.baseline, min_improvement=args.min_improvement,
                           allow_regression=args.allow_regression, heldout_fraction=args.heldout_fraction),
        time_budget=budget,
    )


def announce_preset(preset: Preset) -> str:
    """Print the preset (with what torch sees) and set the threads it says; returns the printed line."""
    import torch

    from sam_core.training.presets import Machine

    torch.set_num_threads(preset.threads)
    line = f"{preset.describe()} (torch sees {Machine.detect().describe()})"
    print(line, file=sys.stderr, flush=True)
    if preset.ddp and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        print(f"samforge train: one process; for DDP run it under torchrun --nproc_per_node {preset.processes}",
              file=sys.stderr)
    return line


def run_train(args: argparse.Namespace, bar: ProgressBar, events: EventsFile | None,
              stop: StopOnSigterm) -> FinetuneResult | None:
    """Build the spec (the preset first, printed), load the model and run it; ``--method auto`` prints its table.
    The events file gets the preset line in its first event (the data check's), as a second line."""
    from sam_core.modeling.registry import load_model, resolve_device
    from sam_core.training.auto import run_auto
    from sam_core.training.finetune import run_finetune

    preset = preset_from_args(args)
    spec = spec_from_args(args, preset)
    pending = [announce_preset(preset)]

    def report(event: ProgressEvent) -> None:
        bar(event)
        if events is not None:
            if pending and event.state is Phase.CHECKING_DATA:
                event = dataclasses.replace(event, message=f"{event.message}\n{pending.pop()}")
            events(event)

    callback = stop.wrap(report)
    model = load_model(args.model, args.checkpoint, device=resolve_device(args.device))
    if spec.time_budget is None:
        return run_finetune(model, spec, callback=callback)
    auto = run_auto(model, spec, spec.time_budget, callback)
    print(f"auto: {len(auto.candidates)} recipes within {spec.time_budget:g} s\n{auto.table()}", file=sys.stderr)
    return auto.finetune


def cmd_train(args: argparse.Namespace) -> int:
    """Run the fine-tuning; rank 0 writes ``<out>/result.json`` and returns its exit status
    (:mod:`services.trainer.worker`: 0 published, 2 bad input, 3 rejected by the guard, 4 stopped by SIGTERM)."""
    from sam_core.errors import SamforgeError
    from services.trainer.worker import StoppedBySignal, WorkerStatus, is_rank_zero
    from services.trainer.worker import write_result as write

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"samforge train: rank {os.environ.get('RANK')} of {os.environ['WORLD_SIZE']}", file=sys.stderr)
    if args.no_resume:
        import shutil

        shutil.rmtree(Path(args.out) / "checkpoints", ignore_errors=True)
    events = EventsFile(args.events) if args.events and is_rank_zero() else None
    stop = StopOnSigterm()
    stop.install()
    main = is_rank_zero()
    try:
        result = run_train(args, ProgressBar(), events, stop)
    except StoppedBySignal:
        print("samforge train: stopped by SIGTERM (checkpointed; run again to resume)", file=sys.stderr)
        return write(args.out, WorkerStatus.STOPPED) if main else 0
    except SamforgeError as exc:
        if main:
            write(args.out, WorkerStatus.INVALID_INPUT, error=str(exc), field=exc.field)
        raise  # samforge's main prints it and exits 2
    except Exception as exc:
        if main:
            write(args.out, WorkerStatus.STOPPED if stop.requested else WorkerStatus.FAILED,
                  error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop.uninstall()
        if events is not None:
            events.close()
    if result is None:  # a non-zero torchrun rank: it trained; rank 0 evaluates and publishes
        return 0
    print(result.table, file=sys.stderr)
    print(result.guard.reason, file=sys.stderr)
    print(json.dumps(result.summary(), indent=2))
    status = WorkerStatus.PUBLISHED if result.accepted else WorkerStatus.REJECTED
    return write(args.out, status, summary=result.summary())


def cmd_eval(args: argparse.Namespace) -> int:
    from sam_core.adapters.artifact import load_adapter
    from sam_core.data.dataset import load_dataset
    from sam_core.data.prompt_sim import prompt_config
    from sam_core.data.splits import split_dataset
    from sam_core.evaluation.evaluate import EvalConfig, compare, evaluate, format_table, write_report
    from sam_core.inference.predictor import Predictor
    from sam_core.modeling.registry import load_model

    base = load_model(args.model, args.checkpoint)
    heldout = _stored_heldout_split(args.adapter)
    if args.split == "heldout" and heldout is None:
        raise SystemExit("samforge eval: --split heldout needs an --adapter whose config carries a held-out split "
                         "(a guarded `samforge train` run records one)")
    ds = load_dataset(args.data, min_area=heldout.min_area if heldout is not None else 0)
    cfg = EvalConfig(prompt=prompt_config(args.prompt), seed=args.seed, tiled=args.tile)
    if args.split == "heldout":
        assert heldout is not None
        ds, cfg = heldout.select(ds)[0], heldout.eval_config()
    elif args.split == "val":
        rest = heldout.select(ds)[1] if heldout is not None else ds
        ds = split_dataset(rest, val_fraction=args.val_fraction, seed=args.seed)[1]
    cache: EmbeddingCache = {}
    reports = [evaluate(Predictor(base), ds, cfg, label="zero-shot", embeddings=cache)]
    for path in args.adapter:
        adapted = load_adapter(base, path)
        reports.append(evaluate(Predictor(adapted), ds, cfg, label=f"{adapted.adapter_id}", embeddings=cache))
    files = write_report(args.out, reports, dataset=ds)
    print(format_table(compare(reports)), file=sys.stderr)
    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None  # nan: no (resolvable) instance

    dice = {key: {r.label: finite(r.summary[key]) for r in reports} for key in ("dice_mean", "dice_resolvable_mean")}
    summary = {"report": str(files["report"]), **dice,
               "n_instances": reports[0].summary["n_instances"], "n_resolvable": reports[0].summary["n_resolvable"]}
    print(json.dumps(summary, indent=2))
    return 0


def _stored_heldout_split(adapters: list[str]) -> HeldoutSplit | None:
    """The held-out split the first of ``adapters`` that carries one was guarded on (None: none does)."""
    from sam_core.adapters.artifact import read_adapter_config
    from sam_core.training.guard import HeldoutSplit

    for path in adapters:
        stored = read_adapter_config(path).heldout_split
        if stored is not None:
            return HeldoutSplit.from_json(stored, f"adapter {path}")
    return None


def cmd_adapters_inspect(args: argparse.Namespace) -> int:
    from sam_core.adapters.artifact import read_adapter_config, read_adapter_tensors

    config = read_adapter_config(args.path)
    tensors = read_adapter_tensors(args.path, config)  # verifies the checksum
    report = {
        "path": str(args.path),
        "config": config.to_json(),
        "tensors": {"count": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values())),
                    "checksum": "ok"},
    }
    if args.model:
        from sam_core.adapters.artifact import load_adapter
        from sam_core.modeling.registry import load_model

        if get_method(config.method).one_shot:
            from sam_core.training.persam import load_persam

            load_persam(load_model(args.model, args.checkpoint), args.path)
        else:
            load_adapter(load_model(args.model, args.checkpoint), args.path)
        report["loads_on"] = args.model
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
