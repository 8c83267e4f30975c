"""The process executor through the real gRPC trainer (tiny model): every job is its own worker process
(``samforge train``), progress streams through WatchJob, CancelJob ends a 2-process torchrun job CANCELLED with
a resumable checkpoint, a killed worker leaves the API SERVING and its job resumes and publishes, a restarted
trainer re-attaches to a live worker and resumes a dead one's job, and a 2-process gloo job equals the
single-process one on the same global batch.

Kept short for CI: one trainer for the module, the single-process job of the DDP comparison is also the job
whose events and worker are checked (:func:`ddp_pair`), and jobs stop at the first training step that proves
their point."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from sam_core.adapters.artifact import read_adapter_config, read_adapter_tensors
from sam_core.training.checkpoint import latest_checkpoint, load_checkpoint
from sam_core.training.config import Phase, ProgressEvent
from services._generated.sam.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.settings import TrainerSettings
from services.trainer.executors.base import JobLaunch, Outcome
from services.trainer.executors.process import ProcessExecutor, start_ticks
from services.trainer.job_spec import Hyperparameters, JobRequest, Resources, build_spec
from tests.conftest import write_blob_dataset
from tests.integration.conftest import health_status, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = trainer_pb2.Hyperparameters(epochs=1000, max_steps=100_000, batch_size=2, lr=1e-3, checkpoint_every=2)
SHORT = trainer_pb2.Hyperparameters(max_steps=12, epochs=1000, batch_size=2, lr=1e-3, checkpoint_every=2)
DDP = trainer_pb2.Hyperparameters(max_steps=4, epochs=1000, batch_size=4, lr=1e-3, checkpoint_every=2)
TWO_PROCESSES = trainer_pb2.Resources(processes_per_node=2)


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


@pytest.fixture(scope="module")
def ddp_pair(jobs, trainer_root):
    """The same 4-step job on one process and on two gloo processes, run to the end: (one, two, the single
    job's events, its worker as recorded at its first event with the worker's parent pid)."""
    stub, _ = jobs
    one = create(stub, "ddp", hp=DDP)
    two = create(stub, "ddp", hp=DDP, resources=TWO_PROCESSES)
    events, worker = [], {}
    for event in watch(stub, one.id):
        events.append(event)
        if not worker and job_json(trainer_root, one.id)["worker"]:  # recorded as the worker starts
            worker = dict(job_json(trainer_root, one.id)["worker"])
            worker["parent"] = parent_pid(worker["pid"])
    list(watch(stub, two.id))
    return one, two, events, worker


def test_a_job_runs_in_its_own_worker_process_and_streams_its_events(ddp_pair, jobs, trainer, trainer_root):
    one, _, events, worker = ddp_pair
    _, registry = jobs
    assert worker["pid"] != trainer.proc.pid and worker["parent"] == trainer.proc.pid
    assert events[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    phases = [e.phase for e in events]
    assert "checking_data" in phases and phases[-2:] == ["publishing", "done"]
    steps = [e.job.step for e in events if e.phase == "training"]
    assert steps == sorted(steps) and steps[-1] == DDP.max_steps
    assert events[-1].job.metrics["finetuned_dice_mean"] >= 0 and events[-1].job.resumes == 0
    folder = trainer_root / "jobs" / "acme" / one.id
    assert json.loads((folder / "result.json").read_text())["status"] == "published"
    assert [a.version for a in registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme", name="ddp"),
                                                     timeout=30).adapters] == [1, 2]  # one, then two
    assert job_json(trainer_root, one.id)["worker"] == {}


def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(ddp_pair, jobs, trainer_root):
    one, two, _, _ = ddp_pair
    stub, _ = jobs
    ends = {job.id: next(iter(watch(stub, job.id))).job for job in (one, two)}  # finished: its last event
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


def test_cancel_ends_a_two_process_job_cancelled(jobs, trainer_root):
    """SIGTERM reaches torchrun and both ranks; rank 0 records ``stopped`` although rank 1 then fails its next
    collective and torchrun exits non-zero: CANCELLED, nothing published."""
    stub, registry = jobs
    job = create(stub, "cancelled", hp=LONG, resources=TWO_PROCESSES)
    stream = watch(stub, job.id)
    next(e for e in stream if e.phase == "training" and e.job.step >= 1)
    worker = job_json(trainer_root, job.id)["worker"]
    stub.CancelJob(trainer_pb2.CancelJobRequest(id=job.id, tenant="acme"), timeout=30)
    rest = list(stream)
    assert rest[-1].job.state == trainer_pb2.JOB_STATE_CANCELLED, rest[-1].job.error
    wait_gone(worker["pid"], worker["start_ticks"])
    folder = trainer_root / "jobs" / "acme" / job.id
    result = json.loads((folder / "result.json").read_text())
    assert (result["status"], result["exit_code"]) == ("stopped", 4)  # it stopped on SIGTERM, not killed
    assert "rank 1 of 2" in (folder / "worker.log").read_text() and not (folder / "adapter").exists()
    assert list(registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme", name="cancelled")).adapters) == []


class StopAtFirstStep:
    """The manager's side of an attempt (:class:`~services.trainer.executors.base.JobControl`) asking the worker
    to stop once it has trained a step; a cancelled job's manager then deletes the checkpoints, so the
    executor is driven directly here to see what the stop leaves."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []
        self.worker: dict[str, int] = {}
        self._clock = threading.Event()  # never set: wait() is the executor's poll interval

    def progress(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def stop_requested(self) -> bool:
        return any(e.state is Phase.TRAINING and e.step >= 1 for e in self.events)

    def detach_requested(self) -> bool:
        return False

    def record_worker(self, worker: dict[str, int]) -> None:
        self.worker = dict(worker)

    def wait(self, seconds: float) -> None:
        self._clock.wait(seconds)


def test_a_stopped_two_process_worker_leaves_a_resumable_checkpoint(tmp_path):
    hp = Hyperparameters(max_steps=12, epochs=1000, batch_size=2, lr=1e-3, checkpoint_every=1000)  # no periodic one
    request = JobRequest(tenant="acme", dataset="blobs", method="decoder", adapter_name="stopped", hyperparameters=hp,
                         resources=Resources(processes_per_node=2), allow_regression=True)
    launch = JobLaunch("f" * 32, "acme", tmp_path / "job", write_blob_dataset(tmp_path / "blobs"), request)
    control = StopAtFirstStep()
    result = ProcessExecutor(TrainerSettings.from_env({"SAMFORGE_MODEL": "tiny"})).run(launch, control)
    log = (launch.out_dir / "worker.log").read_text()
    assert result.outcome is Outcome.STOPPED, log[-3000:]
    assert "rank 1 of 2" in log and start_ticks(control.worker["pid"]) is None
    saved = latest_checkpoint(launch.out_dir)
    assert saved is not None, log[-3000:]
    state = load_checkpoint(saved)
    trained = [e.step for e in control.events if e.state is Phase.TRAINING]
    assert state["step"] == trained[-1] >= 1  # rank 0 saved the step it stopped at
    assert state["config"] == build_spec(request, launch.data, launch.out_dir).train.to_json()  # so it resumes


def test_kill_9_of_the_worker_leaves_the_api_serving_and_the_job_resumes_and_publishes(jobs, trainer, trainer_root):
    stub, registry = jobs
    job = create(stub, "survivor", hp=SHORT)
    stream = watch(stub, job.id)
    next(e for e in stream if e.phase == "training" and e.job.step >= 1)
    worker = job_json(trainer_root, job.id)["worker"]
    os.kill(worker["pid"], signal.SIGKILL)
    assert health_status(trainer.address) == health_pb2.HealthCheckResponse.SERVING
    rest = list(stream)
    resumed = next(e for e in rest if e.job.state == trainer_pb2.JOB_STATE_QUEUED)
    assert "killed by SIGKILL" in resumed.message and "1/3" in resumed.message
    after = [e.job.step for e in rest if e.phase == "training"]
    assert after and after[-1] == SHORT.max_steps
    assert rest[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED and rest[-1].job.resumes == 1, rest[-1].job.error
    assert job_json(trainer_root, job.id)["worker"] == {}
    published = registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme", name="survivor"), timeout=30)
    assert [a.version for a in published.adapters] == [1]
    assert health_status(trainer.address) == health_pb2.HealthCheckResponse.SERVING


def test_a_restarted_trainer_reattaches_to_a_live_worker_and_resumes_a_dead_ones_job(tmp_path):
    """Two jobs run at once; the trainer stops (workers detached, a third job still queued); one worker dies
    while no trainer runs. The next trainer re-attaches to the live one and resumes the dead one's job."""
    env = {**make_env(tmp_path), "SAMFORGE_MAX_CONCURRENT_JOBS": "2"}
    with running("trainer", env, tmp_path) as first, grpc.insecure_channel(first.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        live, dead, queued = (create(stub, name, hp=LONG) for name in ("live", "dead", "queued"))
        for job in (live, dead):
            next(e for e in watch(stub, job.id) if e.phase == "training" and e.job.step >= 1)
        assert first.stop() == 0  # SIGTERM; SAMFORGE_DETACH_WORKERS defaults to true: the workers keep running
    saved = job_json(tmp_path, live.id)
    worker = saved["worker"]
    assert saved["state"] == "RUNNING" and start_ticks(worker["pid"]) == worker["start_ticks"]
    assert job_json(tmp_path, queued.id)["state"] == "QUEUED"  # never started: 2 jobs at once
    doomed = job_json(tmp_path, dead.id)["worker"]
    os.kill(doomed["pid"], signal.SIGKILL)  # its worker dies while no trainer watches
    wait_gone(doomed["pid"], doomed["start_ticks"])
    with running("trainer", env, tmp_path) as second, grpc.insecure_channel(second.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        stub.CancelJob(trainer_pb2.CancelJobRequest(id=queued.id, tenant="acme"), timeout=30)
        stream = watch(stub, live.id)
        seen = next(e for e in stream if e.phase == "training" and e.job.step > saved["step"])
        assert seen.job.resumes == 0 and job_json(tmp_path, live.id)["worker"]["pid"] == worker["pid"]
        stub.CancelJob(trainer_pb2.CancelJobRequest(id=live.id, tenant="acme"), timeout=30)  # not its child
        assert [e.job.state for e in stream][-1] == trainer_pb2.JOB_STATE_CANCELLED
        wait_gone(worker["pid"], worker["start_ticks"])
        result = json.loads((tmp_path / "jobs" / "acme" / live.id / "result.json").read_text())
        assert (result["status"], result["exit_code"]) == ("stopped", 4)  # SIGTERM reached the re-attached worker
        stream = watch(stub, dead.id)
        resumed = next(e for e in stream if e.phase == "training")
        assert resumed.job.resumes == 1 and job_json(tmp_path, dead.id)["worker"]["pid"] != doomed["pid"]
        stub.CancelJob(trainer_pb2.CancelJobRequest(id=dead.id, tenant="acme"), timeout=30)
        assert [e.job.state for e in stream][-1] == trainer_pb2.JOB_STATE_CANCELLED
