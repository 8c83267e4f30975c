"""JobManager in-process on the tiny model: runs, events, cancel, failures, path checks, crash recovery
(the upload extractor: test_trainer_uploads.py)."""

from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest

from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.errors import InvalidInput, NotFound
from services.common.settings import TrainerSettings
from services.trainer.executors import inline as jobs_module
from services.trainer.job_model import JobState
from services.trainer.job_spec import Hyperparameters, JobRequest
from services.trainer.jobs import JobManager
from tests.conftest import write_blob_dataset

FAST = Hyperparameters(epochs=3, batch_size=2, lr=1e-3, checkpoint_every=1)


@pytest.fixture
def dirs(tmp_path):
    data = tmp_path / "data"
    write_blob_dataset(data / "default" / "blobs")
    return {"data": data, "jobs": tmp_path / "jobs", "registry": tmp_path / "registry"}


def make_manager(dirs, model) -> JobManager:
    settings = TrainerSettings.from_env({"SAMFORGE_DATA_DIR": str(dirs["data"]), "SAMFORGE_JOBS_DIR": str(dirs["jobs"]),
                                         "SAMFORGE_REGISTRY_DIR": str(dirs["registry"]),
                                         "SAMFORGE_TRAINER_EXECUTOR": "inline"})
    return JobManager(settings, model, FileSystemAdapterStore(dirs["registry"]))


@pytest.fixture
def manager(dirs, tiny_model):
    mgr = make_manager(dirs, tiny_model)
    yield mgr
    mgr.shutdown(timeout=30)


def request(name: str = "blobs", hp: Hyperparameters = FAST, **kw) -> JobRequest:
    """A job that publishes whatever it scores (the random tiny model does not beat zero-shot in 3 epochs; the
    publish guard is tested in test_trainer_guard.py)."""
    return JobRequest(tenant=kw.pop("tenant", ""), dataset=kw.pop("dataset", "blobs"),
                      method=kw.pop("method", "decoder"), adapter_name=name, hyperparameters=hp,
                      allow_regression=kw.pop("allow_regression", True), **kw)


def test_job_succeeds_streams_ordered_events_and_publishes_new_versions(manager, dirs):
    job = manager.create(request())
    assert job.state is JobState.QUEUED and job.tenant == "default"
    events = list(manager.watch("", job.id))
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    steps = [e.job.step for e in events]
    assert steps == sorted(steps) and steps[-1] == events[-1].job.total_steps > 0
    training = [e for e in events if e.phase == "training" and e.loss is not None]
    assert [e.job.step for e in training] == sorted(e.job.step for e in training) and training
    assert any(e.val_dice for e in events)
    assert events[-2].phase == "publishing" and events[-1].phase == "done"
    started = next(i for i, e in enumerate(events) if e.job.state is JobState.RUNNING)
    checked = events[started + 1]  # the run's first event: the data diagnostics in one line
    assert checked.phase == "checking_data" and checked.message.startswith("data: 6 images, 8 instances, 0 (0%) below")
    done = events[-1].job
    assert done.state is JobState.SUCCEEDED and done.adapter_version == 1 and done.error == ""
    assert 0 <= done.metrics["finetuned_dice_mean"] <= 1 and "zero_shot_dice_mean" in done.metrics
    assert done.metrics["finetuned_n_resolvable"] == done.metrics["finetuned_n_instances"] > 0  # no specks here
    assert done.metrics["finetuned_dice_resolvable_mean"] == done.metrics["finetuned_dice_mean"]
    folder = dirs["jobs"] / "default" / job.id
    assert json.loads((folder / "job.json").read_text())["state"] == "SUCCEEDED"
    assert not (folder / "checkpoints").exists() and (folder / "adapter").is_dir()
    assert json.loads((folder / "diagnostics.json").read_text())["n_instances"] == 8

    second = manager.wait("", manager.create(request(promote_to="staging")).id, timeout=120)
    assert second.state is JobState.SUCCEEDED and second.adapter_version == 2
    store = manager.store
    assert [v.version for v in store.list("default", "blobs")] == [1, 2]
    assert store.resolve("default", "blobs@staging").version == 2
    assert [j.id for j in manager.list("default")] == [job.id, second.id]
    assert list(manager.watch("", job.id))[-1].job.state is JobState.SUCCEEDED  # a late watcher: latest state only


def test_cancel_running_and_queued_jobs_publishes_nothing(manager):
    long = manager.create(request(hp=Hyperparameters(epochs=500, batch_size=2)))
    queued = manager.create(request())
    first_step = next(e for e in manager.watch("", long.id) if e.phase == "training")
    assert first_step.job.state is JobState.RUNNING
    with pytest.raises(NotFound):  # tenant isolation: another tenant's job does not exist for them
        manager.cancel("other", long.id)
    assert manager.list("other") == []
    cancelled = manager.cancel("", queued.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.step == 0
    stopped = manager.cancel("default", long.id)
    assert stopped.state is JobState.CANCELLED and stopped.step < stopped.total_steps
    assert list(manager.watch("", long.id))[-1].phase == "done"
    assert manager.store.list("default") == []


def test_failing_job_reports_a_clear_message(manager, dirs):
    empty = write_blob_dataset(dirs["data"] / "default" / "empty", n_images=3)
    for path in (empty / "masks").iterdir():
        cv2.imwrite(str(path), np.zeros((96, 128), np.uint8))
    job = manager.wait("", manager.create(request(dataset="empty")).id, timeout=60)
    assert job.state is JobState.FAILED
    assert job.error.startswith("empty: no usable sample") and str(dirs["data"]) not in job.error
    assert manager.store.list("default") == []


@pytest.mark.parametrize(("kwargs", "kind", "field"), [
    ({"dataset": "../default/blobs"}, InvalidInput, "dataset"),
    ({"dataset": "/etc"}, InvalidInput, "dataset"),
    ({"dataset": "escape"}, InvalidInput, "dataset"),
    ({"dataset": ""}, InvalidInput, "dataset"),
    ({"dataset": "missing"}, NotFound, "dataset"),
    ({"method": "magic"}, InvalidInput, "method"),
    ({"name": "../x"}, InvalidInput, "adapter_name"),
    ({"promote_to": "Prod!"}, InvalidInput, "promote_to"),
    ({"tenant": "../b"}, InvalidInput, "tenant"),
    ({"hp": Hyperparameters(epochs=-1)}, InvalidInput, "hyperparameters.epochs"),
    ({"hp": Hyperparameters(prompt="scribble")}, InvalidInput, "hyperparameters.prompt"),
    ({"hp": Hyperparameters(lr=float("nan"))}, InvalidInput, "hyperparameters.lr"),
])
def test_bad_requests_are_refused_before_queueing(manager, dirs, tmp_path, kwargs, kind, field):
    (dirs["data"] / "default" / "escape").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(kind) as info:
        manager.create(request(**kwargs))
    assert info.value.field == field
    assert manager.list("default") == []


class _Crash(BaseException):
    """Ends the worker thread the way a killed process ends: job.json still says RUNNING."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_restart_resumes_from_the_checkpoint(dirs, tiny_model, monkeypatch):
    real = jobs_module.run_finetune

    crashed = threading.Event()

    def crash_at_step_4(model, spec, callback):
        def progress(event):
            callback(event)
            if event.state == "training" and event.step == 4:
                crashed.set()
                raise _Crash()
        return real(model, spec, progress)

    monkeypatch.setattr(jobs_module, "run_finetune", crash_at_step_4)
    first = make_manager(dirs, tiny_model)
    job = first.create(request())
    folder = dirs["jobs"] / "default" / job.id
    assert crashed.wait(60)
    first.shutdown(timeout=10)  # joins the dead worker and releases the jobs folder
    assert json.loads((folder / "job.json").read_text())["state"] == "RUNNING"
    checkpoint_step = int(sorted((folder / "checkpoints").glob("step_*.pt"))[-1].stem.split("_")[1])
    assert 1 <= checkpoint_step < 4

    seen = []

    def recording(model, spec, callback):
        return real(model, spec, lambda event: (seen.append(event), callback(event)))

    monkeypatch.setattr(jobs_module, "run_finetune", recording)
    second = make_manager(dirs, tiny_model)
    try:
        done = second.wait("", job.id, timeout=120)
    finally:
        second.shutdown(timeout=30)
    assert done.state is JobState.SUCCEEDED and done.resumes == 1 and done.adapter_version == 1
    steps = [e.step for e in seen if e.state == "training"]
    assert steps[0] == checkpoint_step + 1 and steps[-1] == done.total_steps == done.step


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_crash_while_publishing_does_not_publish_twice(dirs, tiny_model, monkeypatch):
    first = make_manager(dirs, tiny_model)
    real_publish = first.store.publish
    crashed = threading.Event()

    def publish_then_crash(*args, **kwargs):
        real_publish(*args, **kwargs)
        crashed.set()
        raise _Crash()

    monkeypatch.setattr(first.store, "publish", publish_then_crash)
    job = first.create(request())
    assert crashed.wait(60)
    first.shutdown(timeout=10)
    assert json.loads((dirs["jobs"] / "default" / job.id / "job.json").read_text())["publishing"] is True

    second = make_manager(dirs, tiny_model)
    try:
        done = second.wait("", job.id, timeout=120)
    finally:
        second.shutdown(timeout=30)
    assert done.state is JobState.SUCCEEDED and done.adapter_version == 1
    assert [v.version for v in second.store.list("default", "blobs")] == [1]


def test_paths_built_from_a_tenant_refuse_names_that_leave_their_root(tmp_path):
    """Every path a tenant names goes through one validator: traversal and upper case are refused."""
    from sam_core.errors import InvalidInput
    from services.trainer.job_model import job_dir
    from services.trainer.job_spec import tenant_root

    for tenant in ("../escape", "Alice", "a/b", ""):
        with pytest.raises(InvalidInput) as err:
            tenant_root(tmp_path / "data", tenant)
        assert err.value.field == "tenant"
        with pytest.raises(InvalidInput):
            job_dir(tmp_path / "jobs", tenant, "0" * 32)
    assert tenant_root(tmp_path / "data", "alice") == (tmp_path / "data" / "alice").resolve()
