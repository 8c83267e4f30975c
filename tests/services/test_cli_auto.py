"""``samforge train --method auto`` and the presets it prints, and method "auto" through the trainer: CreateJob's
checks, the worker's argv and a job run by the JobManager (inline executor) on the tiny model."""

from __future__ import annotations

import argparse
import json

import pytest

from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.errors import InvalidInput
from sam_core.training.auto import DEFAULT_TIME_BUDGET
from sam_core.training.presets import Machine, choose_preset
from services._generated.sam.v1 import trainer_pb2
from services.cli import main
from services.cli_finetune import add_train_args, spec_from_args
from services.common.settings import TrainerSettings
from services.trainer.convert import job_request
from services.trainer.executors.base import JobLaunch
from services.trainer.executors.process import worker_argv
from services.trainer.job_model import JobState
from services.trainer.job_spec import Hyperparameters, JobRequest, build_spec, check_request
from services.trainer.jobs import JobManager
from tests.conftest import write_blob_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def small_grid(monkeypatch):
    """Decoder (whole, crops) and lora r4 at one learning rate: the mechanics of the search on 3 rows."""
    monkeypatch.setattr("sam_core.training.auto.LR_FACTORS", (1.0,))
    monkeypatch.setattr("sam_core.training.auto.LORA_RANKS", (4,))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_dataset(tmp_path_factory.mktemp("cli-auto") / "blobs", n_images=6, height=64, width=80)


def parse_train(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_args(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", "--data", "d", "--out", "o", *argv])


def test_cli_auto_prints_the_preset_and_the_table_and_publishes(blobs, tmp_path, capsys, small_grid):
    out, events = tmp_path / "run", tmp_path / "events.jsonl"
    assert main(["train", "--data", str(blobs), "--method", "auto", "--time-budget", "5m", "--model", "tiny",
                 "--epochs", "1", "--batch-size", "2", "--threads", "1", "--out", str(out), "--events",
                 str(events), "--allow-regression"]) == 0
    err = capsys.readouterr().err
    preset = choose_preset(Machine.detect())
    assert err.splitlines()[0].startswith(f"preset {preset.name}: batch 2, ")  # the flags override the preset
    assert ", 1 thread, " in err.splitlines()[0]
    assert "auto: 3 recipes within 300 s" in err and "skipped: every instance is resolvable" in err
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    first = lines[0]["message"].splitlines()
    assert lines[0]["state"] == "checking_data" and first[0].startswith("data: ") and first[1].startswith("preset ")
    assert [e["message"].split(":")[0] for e in lines if e["message"].startswith("auto ")] == [
        "auto 1/3 decoder whole lr 1e-04", "auto 2/3 decoder crop 128 lr 1e-04", "auto 3/3 lora r4 whole lr 3e-04"]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "published" and len(result["auto"]["candidates"]) == 3
    assert result["method"] == result["auto"]["candidates"][[c["recipe"] for c in result["auto"]["candidates"]]
                                                            .index(result["auto"]["recipe"])]["method"]


@pytest.mark.parametrize(("argv", "field"), [
    (["--method", "decoder", "--time-budget", "5m"], "time_budget"),
    (["--method", "auto", "--time-budget", "soon"], "time_budget"),
    (["--preset", "multi-gpu"], "preset"),
])
def test_cli_bad_auto_or_preset_flags_are_invalid_input(tmp_path, capsys, argv, field):
    if field == "preset" and Machine.detect().cuda_devices:
        pytest.skip("this machine has the GPUs the preset needs")
    out = tmp_path / "o"
    assert main(["train", "--data", str(tmp_path), "--model", "tiny", "--out", str(out), *argv]) == 2
    assert field in capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert (result["status"], result["field"]) == ("invalid_input", field)


def test_explicit_flags_override_the_preset():
    preset = choose_preset(Machine.detect())
    defaults = spec_from_args(parse_train([]))
    assert (defaults.train.batch_size, defaults.train.bf16) == (preset.global_batch, preset.bf16)
    explicit = spec_from_args(parse_train(["--batch-size", "6", "--bf16"])).train
    assert (explicit.batch_size, explicit.bf16) == (6, True)
    assert spec_from_args(parse_train(["--preset", "cpu", "--no-bf16"])).train.bf16 is False
    assert spec_from_args(parse_train(["--method", "auto"])).time_budget == DEFAULT_TIME_BUDGET
    assert spec_from_args(parse_train(["--method", "decoder"])).time_budget is None


def auto_request(**hp) -> JobRequest:
    return JobRequest(tenant="acme", dataset="blobs", method="auto", adapter_name="ships",
                      hyperparameters=Hyperparameters(**hp), allow_regression=True)


def test_create_job_accepts_auto_and_checks_its_budget(tmp_path):
    check_request(auto_request(time_budget_seconds=600))
    assert build_spec(auto_request(), tmp_path, tmp_path).time_budget == DEFAULT_TIME_BUDGET
    assert build_spec(auto_request(time_budget_seconds=90), tmp_path, tmp_path).time_budget == 90
    for seconds in (60, 7 * 24 * 3600):  # the bounds' extremes
        check_request(auto_request(time_budget_seconds=seconds))
        assert build_spec(auto_request(time_budget_seconds=seconds), tmp_path, tmp_path).time_budget == seconds
    for request, field in ((auto_request(time_budget_seconds=59), "time_budget_seconds"),
                           (auto_request(time_budget_seconds=7 * 24 * 3600 + 1), "time_budget_seconds"),
                           (JobRequest("acme", "blobs", "decoder", "ships", Hyperparameters(time_budget_seconds=600)),
                            "time_budget_seconds"),
                           (auto_request(lr=1e-3), "lr"), (auto_request(rank=8), "rank"),
                           (auto_request(crop=128), "crop")):
        with pytest.raises(InvalidInput) as info:
            check_request(request)
        assert info.value.field == f"hyperparameters.{field}"
    msg = trainer_pb2.CreateJobRequest(method="auto", hyperparameters=trainer_pb2.Hyperparameters(
        time_budget_seconds=120))
    assert job_request(msg).hyperparameters.time_budget_seconds == 120


def test_the_worker_argv_rebuilds_an_auto_spec(tmp_path):
    request = auto_request(time_budget_seconds=90, epochs=3, batch_size=2)
    launch = JobLaunch("f" * 32, "acme", tmp_path / "job", tmp_path / "data", request)
    argv = worker_argv(launch, TrainerSettings.from_env({"SAMFORGE_MODEL": "tiny"}))
    args = parse_train(argv[argv.index("train") + 1:])
    assert (args.method, args.time_budget) == ("auto", "90.0")
    assert spec_from_args(args) == build_spec(request, tmp_path / "data", tmp_path / "job")


def test_an_auto_job_runs_in_the_trainer_with_one_event_per_candidate(tmp_path, tiny_model, small_grid):
    data = tmp_path / "data"
    write_blob_dataset(data / "default" / "blobs", n_images=6, height=64, width=80)
    settings = TrainerSettings.from_env({"SAMFORGE_DATA_DIR": str(data), "SAMFORGE_JOBS_DIR": str(tmp_path / "jobs"),
                                         "SAMFORGE_REGISTRY_DIR": str(tmp_path / "reg"),
                                         "SAMFORGE_TRAINER_EXECUTOR": "inline"})
    manager = JobManager(settings, tiny_model, FileSystemAdapterStore(tmp_path / "reg"))
    try:
        job = manager.create(JobRequest("", "blobs", "auto", "ships", Hyperparameters(
            epochs=1, batch_size=2, time_budget_seconds=300), allow_regression=True))
        events = list(manager.watch("", job.id))
    finally:
        manager.shutdown(timeout=30)
    done = events[-1].job
    assert done.state is JobState.SUCCEEDED and done.method == "auto" and done.adapter_version == 1
    assert [e.message.split(":")[0] for e in events if e.message.startswith("auto ")] == [
        "auto 1/3 decoder whole lr 1e-04", "auto 2/3 decoder crop 128 lr 1e-04", "auto 3/3 lora r4 whole lr 3e-04"]
    version = manager.store.get("default", "ships", 1)
    assert version.metrics["auto_recipe"] in ("decoder whole lr 1e-04", "lora r4 whole lr 3e-04")
    assert len(version.metrics["auto_candidates"]) == 3
