"""The process executor through the real gRPC trainer (tiny model): every job is its own worker process
(``samforge train``), progress streams through WatchJob, CancelJob ends CANCELLED, a killed worker leaves the
API SERVING and its job resumes and publishes, a restarted trainer re-attaches to a live worker or resumes a
dead one's job, and a 2-process gloo job equals the single-process one on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from sam_core.adapters.artifact import read_adapter_config, read_adapter_tensors
from services._generated.sam.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.executors.process import start_ticks
from tests.conftest import write_blob_dataset
from tests.integration.conftest import health_status, running, start_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = trainer_pb2.Hyperparameters(epochs=1000, max_steps=100_000, batch_size=2, lr=1e-3, checkpoint_every=2)
SHORT = trainer_pb2.Hyperparameters(max_steps=12, epochs=1000, batch_size=2, lr=1e-3, checkpoint_every=2)


def make_env(root: Path) -> dict[str, str]:
    write_blob_dataset(root / "data" / "acme" / "blobs")
    return {"SAMFORGE_MODEL": "tiny", "SAMFORGE_DATA_DIR": str(root / "data"), "SAMFORGE_JOBS_DIR": str(root / "jobs"),
            "SAMFORGE_REGISTRY_DIR": str(root / "registry"), "SAMFORGE_GRACE_SECONDS": "2",
            "SAMFORGE_TRAINER_EXECUTOR": "process", "SAMFORGE_MAX_PROCESSES_PER_NODE": "2"}


@pytest.fixture(scope="module")
def trainer_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("executor")


@pytest.fixture(scope="module")
def trainer(trainer_root):
    with running("trainer", make_env(trainer_root), trainer_root) as service:
        yield service


@pytest.fixture(scope="module")
def jobs(trainer):
    with grpc.insecure_channel(trainer.address) as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel), trainer_pb2_grpc.AdapterRegistryStub(channel)


def create(stub, name: str, hp=SHORT, **fields) -> trainer_pb2.Job:
    """allow_regression: the random tiny model does not beat zero-shot; the guard's REJECTED path through this
    executor is in test_trainer_service.py (the process executor is the default)."""
    fields.setdefault("allow_regression", True)
    return stub.CreateJob(trainer_pb2.CreateJobRequest(tenant="acme", dataset="blobs", method="decoder",
                                                       adapter_name=name, hyperparameters=hp, **fields), timeout=30)


def watch(stub, job_id: str):
    return stub.WatchJob(trainer_pb2.WatchJobRequest(id=job_id, tenant="acme"), timeout=300)


def job_json(root: Path, job_id: str) -> dict:
    return json.loads((root / "jobs" / "acme" / job_id / "job.json").read_text())


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def wait_gone(pid: int, ticks: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while start_ticks(pid) == ticks:  # polls /proc: the worker is not always our child
        assert time.monotonic() < deadline, f"worker {pid} still running"
        time.sleep(0.05)


def test_a_job_runs_in_its_own_worker_process_and_streams_its_events(jobs, trainer, trainer_root):
    stub, registry = jobs
    job = create(stub, "own")
    events = []
    worker = {}
    for event in watch(stub, job.id):
        events.append(event)
        if event.phase == "training" and not worker:
            worker = job_json(trainer_root, job.id)["worker"]
            assert worker["pid"] != trainer.proc.pid and parent_pid(worker["pid"]) == trainer.proc.pid
    assert events[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    phases = [e.phase for e in events]
    assert "checking_data" in phases and phases[-2:] == ["publishing", "done"]
    steps = [e.job.step for e in events if e.phase == "training"]
    assert steps == sorted(steps) and steps[-1] == 12
    assert events[-1].job.metrics["finetuned_dice_mean"] >= 0 and events[-1].job.resumes == 0
    folder = trainer_root / "jobs" / "acme" / job.id
    assert json.loads((folder / "result.json").read_text())["status"] == "published"
    assert [a.version for a in registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme", name="own"),
                                                     timeout=30).adapters] == [1]
    assert job_json(trainer_root, job.id)["worker"] == {}


def test_cancel_sigterms_the_worker_and_ends_cancelled(jobs, trainer_root):
    stub, registry = jobs
    job = create(stub, "cancelled", hp=LONG)
    stream = watch(stub, job.id)
    next(e for e in stream if e.phase == "training" and e.job.step >= 2)
    worker = job_json(trainer_root, job.id)["worker"]
    stub.CancelJob(trainer_pb2.CancelJobRequest(id=job.id, tenant="acme"), timeout=30)
    assert [e.job.state for e in stream][-1] == trainer_pb2.JOB_STATE_CANCELLED
    wait_gone(worker["pid"], worker["start_ticks"])
    result = json.loads((trainer_root / "jobs" / "acme" / job.id / "result.json").read_text())
    assert (result["status"], result["exit_code"]) == ("stopped", 4)  # it stopped on SIGTERM, not killed
    assert list(registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme", name="cancelled")).adapters) == []


def test_kill_9_of_the_worker_leaves_the_api_serving_and_the_job_resumes_and_publishes(jobs, trainer, trainer_root):
    stub, registry = jobs
    job = create(stub, "survivor", hp=trainer_pb2.Hyperparameters(max_steps=40, epochs=1000, batch_size=2, lr=1e-3,
                                                                  checkpoint_every=2))
    stream = watch(stub, job.id)
    next(e for e in stream if e.phase == "training" and e.job.step >= 3)
    worker = job_json(trainer_root, job.id)["worker"]
    os.kill(worker["pid"], signal.SIGKILL)
    assert health_status(trainer.address) == health_pb2.HealthCheckResponse.SERVING
    rest = list(stream)
    resumed = next(e for e in rest if e.job.state == trainer_pb2.JOB_STATE_QUEUED)
    assert "killed by SIGKILL" in resumed.message and "1/3" in resumed.message
    after = [e.job.step for e in rest if e.phase == "training"]
    assert after and after[-1] == 40
    assert rest[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED and rest[-1].job.resumes == 1, rest[-1].job.error
    assert job_json(trainer_root, job.id)["worker"] == {}
    published = registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme", name="survivor"), timeout=30)
    assert [a.version for a in published.adapters] == [1]
    assert health_status(trainer.address) == health_pb2.HealthCheckResponse.SERVING


def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(jobs, trainer_root):
    stub, _ = jobs
    hp = trainer_pb2.Hyperparameters(max_steps=4, epochs=1000, batch_size=4, lr=1e-3, checkpoint_every=2)
    one = create(stub, "ddp", hp=hp)
    two = create(stub, "ddp", hp=hp, resources=trainer_pb2.Resources(processes_per_node=2))
    ends = {job.id: list(watch(stub, job.id))[-1].job for job in (one, two)}
    assert {j.state for j in ends.values()} == {trainer_pb2.JOB_STATE_SUCCEEDED}, [j.error for j in ends.values()]
    assert ends[two.id].resources.processes_per_node == 2
    folders = [trainer_root / "jobs" / "acme" / job.id / "adapter" for job in (one, two)]
    single, ddp = (read_adapter_tensors(f, read_adapter_config(f)) for f in folders)
    assert single.keys() == ddp.keys() and len(single) > 10
    for name in single:
        if name.endswith("k_proj.bias"):  # cancels in the softmax: its gradient is 0 (see tests/sam_core/test_train)
            continue
        torch.testing.assert_close(single[name], ddp[name], atol=1e-5, rtol=0)
    log = (folders[1].parent / "worker.log").read_text()
    assert "rank 1 of 2" in log and "rank 1 of 2" not in (folders[0].parent / "worker.log").read_text()


def test_a_restarted_trainer_reattaches_to_a_live_worker_and_resumes_a_dead_ones_job(tmp_path):
    env = make_env(tmp_path)
    first = start_service("trainer", env, tmp_path)
    try:
        with grpc.insecure_channel(first.address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            live, dead = create(stub, "live", hp=LONG), create(stub, "dead", hp=LONG)
            next(e for e in watch(stub, live.id) if e.phase == "training" and e.job.step >= 2)
        assert first.stop() == 0  # SIGTERM; SAMFORGE_DETACH_WORKERS defaults to true: the worker keeps running
    finally:
        first.stop()
    saved = job_json(tmp_path, live.id)
    worker = saved["worker"]
    assert saved["state"] == "RUNNING" and start_ticks(worker["pid"]) == worker["start_ticks"]
    assert job_json(tmp_path, dead.id)["state"] == "QUEUED"  # never started: SAMFORGE_MAX_CONCURRENT_JOBS=1
    with running("trainer", env, tmp_path) as second, grpc.insecure_channel(second.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        stream = watch(stub, live.id)
        seen = next(e for e in stream if e.phase == "training" and e.job.step > saved["step"])
        assert seen.job.resumes == 0 and job_json(tmp_path, live.id)["worker"]["pid"] == worker["pid"]
        stub.CancelJob(trainer_pb2.CancelJobRequest(id=live.id, tenant="acme"), timeout=30)  # not its child
        assert [e.job.state for e in stream][-1] == trainer_pb2.JOB_STATE_CANCELLED
        wait_gone(worker["pid"], worker["start_ticks"])
        stream = watch(stub, dead.id)
        next(e for e in stream if e.phase == "training" and e.job.step >= 2)
        doomed = job_json(tmp_path, dead.id)["worker"]
        second.kill()  # the trainer dies; then its worker dies too, while nobody watches
    os.kill(doomed["pid"], signal.SIGKILL)
    wait_gone(doomed["pid"], doomed["start_ticks"])
    with running("trainer", env, tmp_path) as third, grpc.insecure_channel(third.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        stream = watch(stub, dead.id)
        resumed = next(e for e in stream if e.phase == "training")
        assert resumed.job.resumes == 2  # once after the first restart, once now
        assert job_json(tmp_path, dead.id)["worker"]["pid"] != doomed["pid"]
        stub.CancelJob(trainer_pb2.CancelJobRequest(id=dead.id, tenant="acme"), timeout=30)
        assert [e.job.state for e in stream][-1] == trainer_pb2.JOB_STATE_CANCELLED
