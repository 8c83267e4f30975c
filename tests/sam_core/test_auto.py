"""``--method auto`` on the tiny model: the recipe grid pruned by the diagnostics, a table with one row per recipe,
skips with their reason, the best held-out score wins and goes through the publishing guard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sam_core.adapters.artifact import read_adapter_config
from sam_core.data.dataset import load_dataset
from sam_core.data.diagnostics import diagnose
from sam_core.errors import InvalidInput
from sam_core.evaluation.evaluate import EvalReport
from sam_core.modeling.registry import SPECS
from sam_core.training.auto import (
    Candidate,
    Recipe,
    _OutOfShare,
    _Search,
    _watch,
    parse_time_budget,
    recipe_grid,
    run_auto,
)
from sam_core.training.config import Phase, ProgressEvent, TrainConfig
from sam_core.training.finetune import FinetuneSpec, SplitSpec, heldout_split, run_finetune
from sam_core.training.guard import GuardOptions
from tests.conftest import write_blob_dataset
from tests.sam_core.test_diagnostics import write_speck_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_dataset(tmp_path_factory.mktemp("auto") / "blobs", n_images=6, height=64, width=80)


def auto_spec(data: Path, out: Path, **guard) -> FinetuneSpec:
    return FinetuneSpec(data=str(data), out_dir=str(out), train=TrainConfig(epochs=1, batch_size=2, warmup_steps=1),
                        split=SplitSpec(val_fraction=0.34), guard=GuardOptions(**guard))


def test_time_budget_parsing():
    assert [parse_time_budget(t) for t in ("300", "90s", "20m", "1.5h", 45)] == [300, 90, 1200, 5400, 45]
    for bad in ("", "0", "-5m", "ten", "5d", "nan", "inf"):
        with pytest.raises(InvalidInput) as info:
            parse_time_budget(bad)
        assert info.value.field == "time_budget"


def test_grid_without_crops_when_every_instance_is_resolvable(blobs):
    rows = recipe_grid(diagnose(load_dataset(blobs), SPECS["tiny"]))
    assert [r.recipe.method for r in rows] == ["decoder"] * 4 + ["lora"] * 4
    assert {r.recipe.rank for r in rows[4:]} == {4, 8} and len({r.recipe.lr for r in rows}) == 4
    assert [bool(r.skipped) for r in rows] == [False, False, True, True, False, False, False, False]
    assert all("every instance is resolvable" in r.skipped for r in rows[2:4])


def test_grid_tries_crops_first_when_the_diagnostics_recommend_them(tmp_path):
    report = diagnose(load_dataset(write_speck_dataset(tmp_path / "specks")), SPECS["litemedsam"])
    crop = next(r.value for r in report.recommendations if r.flag == "--crop")
    rows = recipe_grid(report)
    assert [r.recipe.crop for r in rows[:2]] == [crop, crop] and not any(r.skipped for r in rows)
    assert [r.recipe.crop for r in rows[2:]] == [None] * 6


def test_large_images_get_crop_recipes_pruned_only_on_a_whole_image_split(tmp_path):
    """Every instance resolvable but images over twice the input: crop recipes at the input size, pruned only when
    no mode of the held-out split is tiled (a champion's stored whole-image split)."""
    from sam_core.evaluation.evaluate import EvalConfig
    from sam_core.training.auto import prune_untiled_crops
    from sam_core.training.auto_tiling import CROP_MIN_DOWNSCALE, HeldoutBaseline, HeldoutMode
    from sam_core.training.guard import HeldoutSplit

    spec = SPECS["tiny"]
    side = int(CROP_MIN_DOWNSCALE * spec.img_size)
    ds = load_dataset(write_blob_dataset(tmp_path / "big", n_images=3, height=side, width=side))
    report = diagnose(ds, spec)
    assert not report.unresolvable and not report.recommendations
    rows = recipe_grid(report)
    assert [r.recipe.crop for r in rows[2:4]] == [spec.img_size] * 2 and not any(r.skipped for r in rows)

    split = HeldoutSplit.create(ds, fraction=0.34, seed=0, min_area=0, eval_cfg=EvalConfig())
    unscored = EvalReport([], {}, {}, [], "m", "baseline", 0.0)  # pruning reads only the modes' settings

    def held(*tiled: bool) -> HeldoutBaseline:
        modes = tuple(HeldoutMode(split.with_eval(EvalConfig(tiled=t)), unscored) for t in tiled)
        return HeldoutBaseline(ds, ds, modes, crops_first=False)

    kept = prune_untiled_crops(recipe_grid(report), report, held(False, True))
    assert not any(r.skipped for r in kept)
    pruned = prune_untiled_crops(recipe_grid(report), report, held(False))
    assert [bool(r.skipped) for r in pruned] == [False, False, True, True, False, False, False, False]
    assert "stored held-out split is scored on whole images" in pruned[2].skipped


def _probe(share: float, epochs: int, eta: float, total: int) -> None:
    search = _Search(None, FinetuneSpec("d", "o", train=TrainConfig(epochs=epochs)), None, None, None,  # type: ignore[arg-type]
                     lambda event: None, deadline=0.0)
    watch = _watch(search, Candidate(Recipe("lora", 3e-4, rank=4)), started=__import__("time").perf_counter(),
                   share=share)
    for step in (1, 2, 3):
        watch(ProgressEvent(Phase.TRAINING, step, total, 0, eta_seconds=eta * (total - step) / (total - 3)))


def test_a_candidate_whose_epoch_cannot_fit_its_share_is_stopped_with_the_reason():
    _probe(share=100.0, epochs=2, eta=20.0, total=40)  # 20 steps an epoch at 0.54 s: fits
    with pytest.raises(_OutOfShare, match=r"one epoch \(20 steps at 5.41 s/step\) needs ~92 s, its share is 50 s"):
        _probe(share=50.0, epochs=2, eta=200.0, total=40)


def test_a_long_epoch_needs_only_the_minimum_of_steps_to_fit():
    # 1,000 steps an epoch at 0.5 s: the epoch (500 s) does not fit 60 s, the 100-step minimum (~50 s) does
    _probe(share=60.0, epochs=1, eta=0.5 * 997, total=1000)
    with pytest.raises(_OutOfShare, match=r"the minimum \(100 steps at 0.50 s/step\) needs ~49 s, its share is 40 s"):
        _probe(share=40.0, epochs=1, eta=0.5 * 997, total=1000)


def test_caching_may_use_the_shares_of_the_later_recipes_it_serves():
    search = _Search(None, FinetuneSpec("d", "o"), None, None, None,  # type: ignore[arg-type]
                     lambda event: None, deadline=0.0)
    started = __import__("time").perf_counter() - 10.0  # 10 s into caching
    embedding = ProgressEvent(Phase.EMBEDDING, 1, 5, 0)
    _watch(search, Candidate(Recipe("decoder", 1e-4, crop=256)), started, share=5.0, cache_share=20.0)(embedding)
    with pytest.raises(_OutOfShare, match="caching the encoder outputs took over its 5 s share"):
        _watch(search, Candidate(Recipe("decoder", 1e-4, crop=256)), started, share=5.0)(embedding)


def test_auto_on_tiny_picks_the_best_heldout_candidate_and_publishes_it(tiny_model, blobs, tmp_path):
    events: list[ProgressEvent] = []
    auto = run_auto(tiny_model, auto_spec(blobs, tmp_path / "run", allow_regression=True), 300.0, events.append)
    rows, winner = auto.candidates, auto.winner
    assert len(rows) == 8 and [r.recipe for r in rows] == [r.recipe for r in recipe_grid(
        diagnose(load_dataset(blobs), SPECS["tiny"]))]
    scored = {i: r.heldout_dice for i, r in enumerate(rows) if r.heldout_dice is not None}
    assert len(scored) == 6 and all(rows[i].steps > 0 for i in scored)
    assert scored[winner] == max(scored.values()) and winner == min(i for i in scored if scored[i] == scored[winner])
    result = auto.finetune
    assert result.accepted and result.adapter_dir == tmp_path / "run" / "adapter"
    config = read_adapter_config(result.adapter_dir)
    assert config.method == rows[winner].recipe.method and config.metrics["auto_recipe"] == rows[winner].recipe.label
    assert [c["recipe"] for c in config.metrics["auto_candidates"]] == [r.recipe.label for r in rows]
    assert config.metrics["heldout_dice"] == pytest.approx(scored[winner])
    assert json.loads((tmp_path / "run" / "auto.json").read_text())["recipe"] == rows[winner].recipe.label
    per_candidate = [e.message for e in events if e.message.startswith("auto ")]
    assert len(per_candidate) == 8 and not any(e.state.final for e in events)
    assert "held-out Dice" in auto.table() and auto.table().count("skipped: every instance") == 2
    assert result.summary()["auto"]["candidates"][winner]["heldout_dice"] == scored[winner]


def test_a_budget_too_small_for_any_recipe_is_invalid_input_with_the_table(tiny_model, blobs, tmp_path):
    with pytest.raises(InvalidInput) as info:
        run_finetune(tiny_model, FinetuneSpec(**{**auto_spec(blobs, tmp_path / "run").__dict__, "time_budget": 0.01}))
    assert info.value.field == "time_budget"
    assert info.value.detail.count("skipped: the time budget is spent") == 6
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_winner_is_rejected_by_the_guard_when_it_does_not_beat_the_baseline(tiny_model, blobs, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr("sam_core.training.auto.LR_FACTORS", (1.0,))  # a grid of decoder and lora r4
    monkeypatch.setattr("sam_core.training.auto.LORA_RANKS", (4,))
    auto = run_auto(tiny_model, auto_spec(blobs, tmp_path / "run", min_improvement=1.0), 300.0)
    assert [bool(c.skipped) for c in auto.candidates] == [False, True, False]
    assert not auto.finetune.accepted and auto.finetune.adapter_dir == tmp_path / "run" / "rejected"
    assert not (tmp_path / "run" / "adapter").exists()
    assert read_adapter_config(tmp_path / "run" / "rejected").metrics["auto_recipe"] == auto.candidates[
        auto.winner].recipe.label


def test_a_search_with_recommended_crops_scores_the_heldout_split_tiled(tiny_model, tmp_path, monkeypatch):
    """Crops first (the diagnostics recommend them): the held-out split, and so every candidate's score and the
    baseline's, use tiled inference, the way a crop-trained model is meant to be used; the split records it."""
    monkeypatch.setattr("sam_core.training.auto.LR_FACTORS", (1.0,))  # a grid of decoder crop / whole only
    monkeypatch.setattr("sam_core.training.auto.LORA_RANKS", ())
    data = write_speck_dataset(tmp_path / "specks", n_images=5)
    report = diagnose(load_dataset(data), SPECS["tiny"])
    assert any(r.flag == "--crop" for r in report.recommendations)
    auto = run_auto(tiny_model, auto_spec(data, tmp_path / "run", allow_regression=True), 300.0)
    assert [c.recipe.crop for c in auto.candidates] == [recipe_grid(report)[0].recipe.crop, None]
    split = read_adapter_config(auto.finetune.adapter_dir).heldout_split
    assert split is not None and split["eval"]["tiled"] is True


def test_the_winner_continues_with_the_time_the_search_left(tiny_model, blobs, tmp_path, monkeypatch):
    """Candidates that stop at a quarter of their share leave time: the winner resumes its own checkpoint with it
    (its steps go on from where it stopped) and keeps the continued state only if the held-out split says so."""
    import dataclasses

    import sam_core.training.auto as auto_module

    monkeypatch.setattr(auto_module, "LR_FACTORS", (1.0,))
    monkeypatch.setattr(auto_module, "LORA_RANKS", ())
    run_one = auto_module.run_candidate
    monkeypatch.setattr(auto_module, "run_candidate",
                        lambda search, index, candidate, share, sharing=1: run_one(search, index, candidate, share / 4))
    spec = auto_spec(blobs, tmp_path / "run", allow_regression=True)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=10_000))
    events: list[ProgressEvent] = []
    auto = run_auto(tiny_model, spec, 40.0, events.append)
    best = auto.candidates[auto.winner]
    assert best.out_of_time and best.extended, auto.table()
    continued = [e for e in events if e.message.startswith(f"auto: {best.recipe.label} continues")]
    assert len(continued) == 1
    first_steps = continued[0].step
    resumed = [e.step for e in events[events.index(continued[0]) + 1:] if e.state is Phase.TRAINING]
    assert resumed and min(resumed) > first_steps  # resumed, not restarted
    assert best.extended.startswith(f"+{max(resumed) - first_steps} steps")
    if best.extended.endswith("(kept)"):
        assert best.steps == max(resumed)
    else:
        assert best.steps == first_steps
    assert json.loads((tmp_path / "run" / "auto.json").read_text())["candidates"][auto.winner]["extended"] == \
        best.extended
    assert "continued with the time left" in auto.table()


@pytest.mark.parametrize(("tiled_dice", "crops_first"), [(0.70, True), (0.605, False)])
def test_a_new_split_with_crop_recipes_is_scored_both_ways(blobs, tmp_path, monkeypatch, tiled_dice, crops_first):
    """With crop recipes but no crop recommendation, the baseline is scored on the same images whole and tiled
    (two modes, each with its own signed split); tiles that beat whole images by TILED_GAIN put crops first."""
    import sam_core.training.auto_tiling as tiling

    monkeypatch.setattr(tiling, "crop_plan", lambda report: (128, False))
    calls: list[bool] = []

    def scorer(images, cfg, label):
        calls.append(cfg.tiled)
        return EvalReport([], {"n_resolvable": 3, "dice_resolvable_mean": tiled_dice if cfg.tiled else 0.60}, {}, [],
                          "m", label, seconds=10.0, encode_seconds=8.0)

    spec, ds = auto_spec(blobs, tmp_path / "run"), load_dataset(blobs)
    events: list[ProgressEvent] = []
    held = tiling.baseline_on_heldout(spec, ds, None, scorer, events.append)  # type: ignore[arg-type]
    assert calls == [False, True]  # no extra scoring: the estimates come from the two runs' timings
    assert [m.tiled for m in held.modes] == [False, True] and held.crops_first is crops_first
    assert [m.split.images for m in held.modes][0] == held.modes[1].split.images
    assert held.modes[0].split.signature != held.modes[1].split.signature
    tiled_spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, tiled=True))
    assert held.modes[1].split == heldout_split(tiled_spec, ds)[0]  # as a job asking for tiles would draw it
    assert (held.seconds, held.cached_seconds) == pytest.approx((20.0, 4.0))
    assert events[-1].message.endswith(("crop" if crops_first else "whole-image") + " recipes first")
    assert [r.recipe.crop for r in recipe_grid(diagnose(ds, SPECS["tiny"]), crops_first=crops_first)][0] == (
        128 if crops_first else None)


def test_candidates_are_scored_in_both_modes_and_the_guard_judges_the_winners(tiny_model, tmp_path, monkeypatch):
    """Large images: each candidate's held-out score is its better mode (whole images or tiles); the published
    adapter stores the split of the winner's mode, and the guard compared it with the baseline served that way."""
    import sam_core.training.auto as auto_module
    from sam_core.adapters.artifact import load_adapter
    from sam_core.evaluation.evaluate import evaluate
    from sam_core.inference.predictor import Predictor
    from sam_core.training.guard import HeldoutSplit, guard_score

    monkeypatch.setattr(auto_module, "LR_FACTORS", (1.0,))
    monkeypatch.setattr(auto_module, "LORA_RANKS", ())
    side = 2 * SPECS["tiny"].img_size
    data = write_blob_dataset(tmp_path / "big", n_images=6, height=side, width=side)
    auto = run_auto(tiny_model, auto_spec(data, tmp_path / "run", allow_regression=True), 300.0)
    rows = auto.candidates
    assert [r.recipe.crop for r in rows] in ([128, None], [None, 128]) and all(r.heldout_dice for r in rows)
    config = read_adapter_config(auto.finetune.adapter_dir)
    stored = HeldoutSplit.from_json(config.heldout_split, "test")
    held, _ = stored.select(load_dataset(data))

    def both_ways(model):
        return [guard_score(evaluate(Predictor(model), held, dataclasses.replace(stored.eval_config(), tiled=t)))[0]
                for t in (False, True)]

    for row in rows:
        scores = both_ways(load_adapter(tiny_model, row.adapter_dir))
        assert row.heldout_dice == pytest.approx(max(scores))
        assert row.served == ("tiles" if scores[1] > scores[0] else "whole images")
    winner = rows[auto.winner]
    assert stored.eval["tiled"] is (winner.served == "tiles")
    baseline = both_ways(tiny_model)[int(stored.eval["tiled"])]
    assert config.metrics["heldout_baseline_dice"] == pytest.approx(baseline)
    assert config.metrics["auto_candidates"][auto.winner]["heldout_mode"] == winner.served
    assert f"({winner.served})" in auto.table()


def test_two_searches_with_the_same_seed_give_the_same_table(tiny_model, blobs, tmp_path, monkeypatch):
    """Deterministic given the seed when no candidate is stopped by the clock (the module docstring's contract)."""
    import sam_core.training.auto as auto_module

    monkeypatch.setattr(auto_module, "LR_FACTORS", (1.0,))
    monkeypatch.setattr(auto_module, "LORA_RANKS", (4,))
    runs = [run_auto(tiny_model, auto_spec(blobs, tmp_path / name, allow_regression=True), 300.0)
            for name in ("first", "second")]
    tables = [[(c.recipe, c.steps, c.heldout_dice, c.skipped, c.out_of_time) for c in run.candidates] for run in runs]
    assert tables[0] == tables[1] and not any(row[4] for row in tables[0])
    assert runs[0].winner == runs[1].winner
    adapters = [read_adapter_config(run.finetune.adapter_dir) for run in runs]
    assert adapters[0].weights_sha256 == adapters[1].weights_sha256


def test_crop_recipes_train_through_every_grid_window():
    assert Recipe("decoder", 1e-4, crop=256).train_config(TrainConfig(), 60.0).crop_all_windows
    assert not Recipe("decoder", 1e-4).train_config(TrainConfig(), 60.0).crop_all_windows


def test_a_candidate_stopped_by_its_share_before_its_minimum_is_skipped_not_scored(tiny_model, blobs, tmp_path,
                                                                                    monkeypatch):
    """A share that ends after a step (caching ate the rest) leaves a candidate untrained: it is skipped with the
    reason instead of competing with a near-zero-shot score."""
    import sam_core.training.auto as auto_module
    from sam_core.training.loop import train

    monkeypatch.setattr(auto_module, "LR_FACTORS", (1.0,))
    monkeypatch.setattr(auto_module, "LORA_RANKS", ())
    monkeypatch.setattr(auto_module, "train", lambda model, train_ds, val_ds, cfg, out, **kw: train(
        model, train_ds, val_ds, dataclasses.replace(cfg, max_seconds=1e-9), out, **kw))  # out of time at step 1
    spec = auto_spec(blobs, tmp_path / "run", allow_regression=True)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch_size=1))  # an epoch of several steps
    with pytest.raises(InvalidInput) as info:
        run_auto(tiny_model, spec, 300.0)
    assert info.value.field == "time_budget"
    assert "its share ended after 1 of the" in info.value.detail and "steps it needs" in info.value.detail


def test_frozen_encoder_candidates_are_budgeted_with_the_cached_scoring():
    from sam_core.training.auto_tiling import HeldoutBaseline, HeldoutMode

    def mode(seconds: float, encode: float) -> HeldoutMode:
        return HeldoutMode(None, EvalReport([], {}, {}, [], "m", "baseline", seconds,  # type: ignore[arg-type]
                                            encode_seconds=encode))

    held = HeldoutBaseline(None, None, (mode(20.0, 15.0), mode(60.0, 53.0)), crops_first=True)  # type: ignore[arg-type]
    search = _Search(None, FinetuneSpec("d", "o"), None, None, held,  # type: ignore[arg-type]
                     lambda event: None, deadline=0.0)
    assert search.eval_estimate(Recipe("decoder", 1e-4, crop=256)) == 12.0
    assert search.eval_estimate(Recipe("lora", 3e-4, rank=4)) == 80.0
