"""Executors without servers: the worker's argv reproduces the trainer's FinetuneSpec, CreateJob resources are
checked (each bad field named), each rank of a GPU job gets its own devices, the events file round-trips, the
registry holds the executors the setting offers, and /proc start times tell a live worker from a recycled pid."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sam_core.errors import InvalidInput
from sam_core.training.config import Phase, ProgressEvent
from services.cli_finetune import add_train_args, spec_from_args
from services.common.settings import ENV_BY_NAME, TrainerSettings
from services.trainer.devices import rank_devices, rank_environment, visible_devices
from services.trainer.executors import EXECUTORS
from services.trainer.executors.base import JobLaunch
from services.trainer.executors.inline import InlineExecutor
from services.trainer.executors.process import ProcessExecutor, start_ticks, worker_argv, worker_environment
from services.trainer.job_spec import (
    Hyperparameters,
    JobRequest,
    ResourceLimits,
    Resources,
    build_spec,
    check_resources,
)
from services.trainer.worker import EventsFile, WorkerStatus, read_events, read_result, write_result


def parse_train(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_args(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.parametrize("method", ["decoder", "lora", "persam"])
@pytest.mark.parametrize("hp", [
    Hyperparameters(),
    Hyperparameters(epochs=7, max_steps=33, batch_size=6, lr=3.3e-4, rank=8, prompt="box+point", val_fraction=0.3,
                    seed=11, bf16=True, patience=4, crop=128, warmup_steps=5, checkpoint_every=9),
    Hyperparameters(prompt="point", lr=0.1 + 0.2),  # a float that only survives the argv as repr
], ids=["defaults", "everything", "float"])
def test_the_worker_argv_rebuilds_the_trainers_spec(tmp_path, method, hp):
    request = JobRequest(tenant="acme", dataset="blobs", method=method, adapter_name="ships", hyperparameters=hp,
                         resources=Resources(processes_per_node=2))
    settings = TrainerSettings.from_env({"SAMFORGE_MODEL": "tiny"})
    launch = JobLaunch("f" * 32, "acme", tmp_path / "job", tmp_path / "data", request)
    argv = worker_argv(launch, settings)
    assert argv[1:3] == ["-m", "torch.distributed.run"] and argv[argv.index("--nproc_per_node") + 1] == "2"
    args = parse_train(argv[argv.index("train"):])
    assert (args.model, args.events) == ("tiny", str(tmp_path / "job" / "events.jsonl"))
    assert spec_from_args(args) == build_spec(request, tmp_path / "data", tmp_path / "job")
    single = worker_argv(dataclasses.replace(launch, request=dataclasses.replace(request, resources=Resources())),
                         settings)
    assert "torch.distributed.run" not in single and single[single.index("train"):] == argv[argv.index("train"):]


@pytest.mark.parametrize(("allow_regression", "min_improvement", "champion"), [
    (False, 0.0, None), (True, -0.25, "registry/acme/ships/3"), (False, 0.1 + 0.2, "registry/acme/ships/1"),
], ids=["base-model", "allowed-regression", "margin"])
def test_the_worker_argv_carries_the_publishing_guard(tmp_path, allow_regression, min_improvement, champion):
    """The champion chosen by the trainer (JobLaunch.baseline) and the request's guard options reach the worker
    as --baseline / --allow-regression / --min-improvement and parse back into the same GuardOptions."""
    request = JobRequest(tenant="acme", dataset="blobs", method="decoder", adapter_name="ships",
                         allow_regression=allow_regression, min_improvement=min_improvement)
    baseline = None if champion is None else tmp_path / champion
    launch = JobLaunch("f" * 32, "acme", tmp_path / "job", tmp_path / "data", request, baseline=baseline)
    argv = worker_argv(launch, TrainerSettings.from_env({"SAMFORGE_MODEL": "tiny"}))
    spec = spec_from_args(parse_train(argv[argv.index("train"):]))
    assert spec == build_spec(request, tmp_path / "data", tmp_path / "job", baseline)
    assert spec.guard.baseline == (None if baseline is None else str(baseline))
    assert (spec.guard.allow_regression, spec.guard.min_improvement) == (allow_regression, min_improvement)


LIMITS = ResourceLimits(nodes=2, processes_per_node=4, gpus_per_process=1)


@pytest.mark.parametrize(("resources", "hp", "field", "needle"), [
    (Resources(nodes=3), Hyperparameters(), "resources.nodes", "1 to 2 (SAMFORGE_MAX_NODES), got 3"),
    (Resources(nodes=-1), Hyperparameters(), "resources.nodes", "got -1"),
    (Resources(processes_per_node=5), Hyperparameters(), "resources.processes_per_node",
     "SAMFORGE_MAX_PROCESSES_PER_NODE"),
    (Resources(gpus_per_process=2), Hyperparameters(), "resources.gpus_per_process", "SAMFORGE_MAX_GPUS_PER_PROCESS"),
    (Resources(processes_per_node=3), Hyperparameters(), "resources.processes_per_node", "global batch (4)"),
    (Resources(nodes=2, processes_per_node=2), Hyperparameters(batch_size=6), "resources.processes_per_node",
     "4 ranks"),
])
def test_resources_outside_the_limits_name_their_field(resources, hp, field, needle):
    with pytest.raises(InvalidInput) as info:
        check_resources(resources, LIMITS, hp)
    assert info.value.field == field and needle in str(info.value)


def test_resources_within_the_limits_pass():
    for resources in (Resources(), Resources(nodes=2, processes_per_node=4, gpus_per_process=1)):
        check_resources(resources, LIMITS, Hyperparameters(batch_size=8))
    assert Resources(nodes=2, processes_per_node=3).world_size == 6 and Resources().world_size == 1


def test_each_executor_refuses_what_it_cannot_run(tiny_model):
    process = ProcessExecutor(TrainerSettings.from_env({}))
    with pytest.raises(InvalidInput) as info:
        process.check(Resources(nodes=2))
    assert info.value.field == "resources.nodes" and "kubernetes" in str(info.value)
    process.check(Resources(processes_per_node=2))
    if not __import__("torch").cuda.is_available():
        with pytest.raises(InvalidInput) as info:
            process.check(Resources(gpus_per_process=1))
        assert info.value.field == "resources.gpus_per_process"
    inline = InlineExecutor(tiny_model)
    for bad in (Resources(processes_per_node=2), Resources(nodes=2), Resources(gpus_per_process=1)):
        with pytest.raises(InvalidInput) as info:
            inline.check(bad)
        assert info.value.field.startswith("resources.")


def test_the_registry_offers_exactly_the_settings_choices():
    assert tuple(EXECUTORS) == ENV_BY_NAME["SAMFORGE_TRAINER_EXECUTOR"].parse.options  # type: ignore[attr-defined]
    assert TrainerSettings.from_env({}).executor == "process"


def test_events_round_trip_and_a_partial_line_waits(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = EventsFile(path)
    sent = [ProgressEvent(Phase.CHECKING_DATA, 0, 0, 0, message="data: ok"),
            ProgressEvent(Phase.TRAINING, 3, 10, 1, loss=0.5, lr=1e-4, eta_seconds=2.0)]
    for event in sent:
        sink(event)
    with open(path, "a") as stream:
        stream.write('{"state": "training", "st')  # a line the worker is still writing
    got, offset = read_events(path, 0)
    assert got == sent and offset == len(path.read_bytes()) - len('{"state": "training", "st')
    assert read_events(path, offset) == ([], offset)
    sink.close()
    assert read_events(tmp_path / "missing.jsonl", 7) == ([], 7)


def test_result_file_carries_the_status_and_exit_code(tmp_path):
    assert read_result(tmp_path) is None
    assert write_result(tmp_path, WorkerStatus.INVALID_INPUT, error="bad", field="data") == 2
    assert read_result(tmp_path) == {"status": "invalid_input", "exit_code": 2, "error": "bad", "field": "data"}
    assert write_result(tmp_path, WorkerStatus.STOPPED) == 4
    (tmp_path / "result.json").write_text(json.dumps({"status": "maybe"}))
    assert read_result(tmp_path) is None


def test_start_ticks_tell_a_live_process_from_a_gone_one():
    mine = start_ticks(os.getpid())
    assert mine is not None and mine == start_ticks(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    ticks = start_ticks(child.pid)
    child.communicate(b"")
    assert start_ticks(child.pid) is None and ticks is not None
    assert start_ticks(2**22 + 1) is None  # above pid_max
    assert Path("/proc/self/stat").exists()


def test_each_local_rank_owns_its_gpus_per_process_devices():
    visible = ["3", "5", "6", "7"]  # the trainer's CUDA_VISIBLE_DEVICES
    assert [rank_devices(rank, 2, visible) for rank in (0, 1)] == [["3", "5"], ["6", "7"]]
    assert [rank_devices(rank, 1, visible) for rank in range(4)] == [["3"], ["5"], ["6"], ["7"]]
    with pytest.raises(InvalidInput) as info:
        rank_devices(2, 2, visible)
    assert info.value.field == "resources.gpus_per_process" and "only 4 visible" in str(info.value)
    assert visible_devices(None, 2) == ["0", "1"] and visible_devices("4, 5", 8) == ["4", "5"]
    assert visible_devices("", 8) == []
    # a Kubernetes pod sees exactly its processes x gpus devices (its nvidia.com/gpu limit), numbered from 0
    pod_rank_1 = rank_environment({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2)
    assert pod_rank_1["CUDA_VISIBLE_DEVICES"] == "2,3"


def gpu_launch(tmp_path: Path, resources: Resources) -> JobLaunch:
    request = JobRequest(tenant="acme", dataset="blobs", method="decoder", adapter_name="ships",
                         resources=resources)
    return JobLaunch("f" * 32, "acme", tmp_path / "job", tmp_path / "data", request)


def test_a_gpu_job_sees_only_its_devices_and_each_rank_trains_on_its_own(tmp_path):
    settings = TrainerSettings.from_env({"SAMFORGE_MODEL": "tiny"})
    trainer_env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "PATH": os.environ["PATH"]}
    plain = gpu_launch(tmp_path, Resources(gpus_per_process=2))
    assert worker_environment(plain.request.resources, trainer_env, lambda: 8)["CUDA_VISIBLE_DEVICES"] == "4,5"
    argv = worker_argv(plain, settings)
    assert argv[argv.index("--device") + 1] == "cuda:0" and "torch.distributed.run" not in argv
    assert worker_environment(plain.request.resources, {}, lambda: 3)["CUDA_VISIBLE_DEVICES"] == "0,1"

    ranks = gpu_launch(tmp_path, Resources(processes_per_node=2, gpus_per_process=1))
    env = worker_environment(ranks.request.resources, trainer_env, lambda: 8)
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5"
    argv = worker_argv(ranks, settings)
    after = argv[argv.index("--no-python") + 1:]
    launcher = after[:after.index("--") + 1]  # what torchrun runs before the samforge command
    assert launcher[:4] == [sys.executable, "-m", "services.trainer.devices", "--gpus-per-process=1"]
    assert argv[argv.index("--device") + 1] == "cuda:0"
    show = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"]
    for rank, device in ((0, "4"), (1, "5")):  # what each rank runs under torchrun, without a GPU
        rank_env = {**os.environ, **env, "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        shown = subprocess.run([*launcher, *show], env=rank_env, capture_output=True,
                               text=True, check=True, timeout=60)
        assert shown.stdout.strip() == device

    cpu = gpu_launch(tmp_path, Resources(processes_per_node=2))
    assert worker_environment(cpu.request.resources, trainer_env, lambda: 8) == trainer_env
    argv = worker_argv(cpu, settings)
    assert "services.trainer.devices" not in argv and argv[argv.index("--device") + 1] == settings.device
