"""The trainer service as its own process (tiny model): jobs, progress streams, uploads, the adapter registry,
bad inputs and tenant isolation."""

from __future__ import annotations

import io
import json
import urllib.request
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services._generated.sam.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import tar_bytes, write_blob_dataset
from tests.integration.conftest import health_status, running

pytestmark = pytest.mark.integration

FAST = trainer_pb2.Hyperparameters(epochs=2, batch_size=2, lr=1e-3)
TERMINAL = {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED,
            trainer_pb2.JOB_STATE_REJECTED}
HARMFUL = trainer_pb2.Hyperparameters(epochs=2, batch_size=2, lr=1.0)


@pytest.fixture(scope="module")
def trainer_env(tmp_path_factory) -> tuple[dict[str, str], Path]:
    root = tmp_path_factory.mktemp("trainer")
    write_blob_dataset(root / "data" / "acme" / "blobs")
    env = {"SAMFORGE_MODEL": "tiny", "SAMFORGE_DATA_DIR": str(root / "data"), "SAMFORGE_JOBS_DIR": str(root / "jobs"),
           "SAMFORGE_REGISTRY_DIR": str(root / "registry"), "SAMFORGE_MAX_UPLOAD_BYTES": str(2 << 20),
           "SAMFORGE_GRACE_SECONDS": "20",  # SIGTERM: the job worker checkpoints and exits within it
           "SAMFORGE_DETACH_WORKERS": "false"}
    return env, root


@pytest.fixture(scope="module")
def trainer(trainer_env):
    with running("trainer", *trainer_env) as service:
        yield service


@pytest.fixture(scope="module")
def stubs(trainer):
    with grpc.insecure_channel(trainer.address) as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel), trainer_pb2_grpc.AdapterRegistryStub(channel)


def run_job(jobs, **fields) -> list[trainer_pb2.JobEvent]:
    # allow_regression: the random tiny model does not beat zero-shot; test_a_harmful_job_is_rejected drops it
    request = {"tenant": "acme", "dataset": "blobs", "method": "decoder", "adapter_name": "ships",
               "hyperparameters": FAST, "allow_regression": True, **fields}
    job = jobs.CreateJob(trainer_pb2.CreateJobRequest(**request), timeout=30)
    assert job.state == trainer_pb2.JOB_STATE_QUEUED and len(job.id) == 32
    return list(jobs.WatchJob(trainer_pb2.WatchJobRequest(id=job.id, tenant=request["tenant"]), timeout=120))


@pytest.fixture(scope="module")
def first_job(stubs):
    return run_job(stubs[0])


def code_of(call, request) -> tuple[grpc.StatusCode, str]:
    """Status of a failing unary call, or of the first message of a failing stream."""
    with pytest.raises(grpc.RpcError) as info:
        reply = call(request, timeout=30)
        if hasattr(reply, "__next__"):  # a server stream fails on its first message
            next(reply)
    return info.value.code(), info.value.details()


def test_watch_streams_progress_to_succeeded_and_lists_the_adapter(stubs, first_job):
    jobs, registry = stubs
    last = first_job[-1]
    assert last.job.state == trainer_pb2.JOB_STATE_SUCCEEDED and last.phase == "done", last.job.error
    assert last.job.adapter_version == 1 and last.job.step == last.job.total_steps > 0
    assert "finetuned_dice_mean" in last.job.metrics
    training = [e for e in first_job if e.phase == "training"]
    assert training and all(e.loss > 0 for e in training if e.val_dice == 0)
    assert any(e.val_dice > 0 for e in training)
    steps = [e.job.step for e in first_job]
    assert steps == sorted(steps)
    assert [j.id for j in jobs.ListJobs(trainer_pb2.ListJobsRequest(tenant="acme")).jobs] == [last.job.id]
    adapters = registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme")).adapters
    assert [(a.name, a.version, a.method) for a in adapters] == [("ships", 1, "decoder")]
    assert adapters[0].shares_base_embeddings and len(adapters[0].sha256) == 64 and adapters[0].n_parameters > 0
    assert "val_dice" in adapters[0].metrics and "stopped_early" not in adapters[0].metrics


def test_tenants_do_not_see_each_other(stubs, first_job):
    jobs, registry = stubs
    job_id = first_job[-1].job.id
    assert code_of(jobs.WatchJob, trainer_pb2.WatchJobRequest(id=job_id, tenant="other"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(jobs.CancelJob, trainer_pb2.CancelJobRequest(id=job_id, tenant="other"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert list(jobs.ListJobs(trainer_pb2.ListJobsRequest(tenant="other")).jobs) == []
    assert list(registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="other")).adapters) == []
    assert code_of(registry.GetAdapter, trainer_pb2.GetAdapterRequest(tenant="other", ref="ships"))[0] == \
        grpc.StatusCode.NOT_FOUND
    # the other tenant's data folder is not reachable either (relative to its own root, "blobs" does not exist)
    code, details = code_of(jobs.CreateJob, trainer_pb2.CreateJobRequest(
        tenant="other", dataset="blobs", method="decoder", adapter_name="ships"))
    assert code == grpc.StatusCode.NOT_FOUND and "dataset" in details


def test_promote_rollback_and_delete_move_aliases(stubs, first_job):
    jobs, registry = stubs
    second = run_job(jobs, promote_to="prod")[-1]
    assert second.job.state == trainer_pb2.JOB_STATE_SUCCEEDED and second.job.adapter_version == 2
    assert "ships@prod" in second.message

    def prod() -> int:
        return registry.GetAdapter(trainer_pb2.GetAdapterRequest(tenant="acme", ref="ships@prod"), timeout=30).version

    assert prod() == 2
    moved = registry.Promote(trainer_pb2.PromoteRequest(tenant="acme", name="ships", alias="prod", version=1))
    assert moved.version == 1 and list(moved.aliases) == ["prod"] and prod() == 1
    assert registry.Rollback(trainer_pb2.RollbackRequest(tenant="acme", name="ships", alias="prod")).version == 2
    assert prod() == 2
    code, details = code_of(registry.Delete, trainer_pb2.DeleteRequest(tenant="acme", name="ships", version=2))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "prod" in details
    registry.Delete(trainer_pb2.DeleteRequest(tenant="acme", name="ships", version=1), timeout=30)
    listed = registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme", name="ships")).adapters
    assert [(a.version, list(a.aliases)) for a in listed] == [(2, ["prod"])]
    assert code_of(registry.GetAdapter, trainer_pb2.GetAdapterRequest(tenant="acme", ref="ships:1"))[0] == \
        grpc.StatusCode.NOT_FOUND


def test_a_harmful_job_is_rejected_and_promote_is_guarded(stubs, trainer_env):
    """Tenant "guarded", through the default (process) executor: a sound job (v1, prod) is the champion; a
    harmful one (lr 1.0, its worker exits 3) ends REJECTED with both scores, publishes nothing and leaves prod;
    a worse version published anyway is refused by Promote unless forced."""
    jobs, registry = stubs
    write_blob_dataset(trainer_env[1] / "data" / "guarded" / "blobs")
    champion = run_job(jobs, tenant="guarded", promote_to="prod")[-1].job
    assert champion.state == trainer_pb2.JOB_STATE_SUCCEEDED and champion.adapter_version == 1, champion.error
    rejected = run_job(jobs, tenant="guarded", promote_to="prod", hyperparameters=HARMFUL, allow_regression=False)
    last = rejected[-1]
    assert last.job.state == trainer_pb2.JOB_STATE_REJECTED and last.phase == "done" and last.job.adapter_version == 0
    assert last.job.metrics["guard_candidate"] < last.job.metrics["guard_baseline"] and "rejected" in last.message
    folder = trainer_env[1] / "jobs" / "guarded" / last.job.id  # the default (process) executor's worker ended it
    result = json.loads((folder / "result.json").read_text())
    assert (result["status"], result["exit_code"], result["accepted"]) == ("rejected", 3, False)
    assert result["guard"]["candidate"] == last.job.metrics["guard_candidate"] and (folder / "worker.log").is_file()
    assert not (folder / "adapter").exists() and (folder / "rejected").is_dir()
    v1 = registry.GetAdapter(trainer_pb2.GetAdapterRequest(tenant="guarded", ref="ships@prod"), timeout=30)
    assert v1.version == 1 and v1.metrics["heldout_dice"] == last.job.metrics["guard_baseline"]
    assert len(v1.heldout_signature) == 64
    listed = registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="guarded", name="ships"), timeout=30)
    assert [a.version for a in listed.adapters] == [1]

    worse = run_job(jobs, tenant="guarded", hyperparameters=HARMFUL)[-1].job  # allow_regression: published
    assert worse.state == trainer_pb2.JOB_STATE_SUCCEEDED and worse.adapter_version == 2
    promote = trainer_pb2.PromoteRequest(tenant="guarded", name="ships", alias="prod", version=2)
    code, details = code_of(registry.Promote, promote)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "ships:2 scores" in details and "ships:1" in details
    promote.force = True
    assert registry.Promote(promote, timeout=30).version == 2


def _chunks(payload: bytes, tenant: str = "acme", filename: str = "data.tar.gz", size: int = 16384):
    yield trainer_pb2.DatasetChunk(tenant=tenant, filename=filename, data=payload[:size])
    for start in range(size, len(payload), size):
        yield trainer_pb2.DatasetChunk(data=payload[start:start + size])


def test_upload_a_data_set_and_train_on_it(stubs, tmp_path):
    jobs, _ = stubs
    folder = write_blob_dataset(tmp_path / "mine", seed=3)
    members = {f"mine/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*.png"))}
    payload = tar_bytes(members)
    ref = jobs.UploadDataset(_chunks(payload), timeout=60)
    assert ref.id.startswith("uploads/") and ref.bytes == len(payload)
    events = run_job(jobs, dataset=ref.id, adapter_name="uploaded",
                     hyperparameters=trainer_pb2.Hyperparameters(epochs=1, batch_size=2))
    assert events[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    assert events[-1].job.dataset == ref.id


def test_cancel_stops_a_running_job(stubs):
    jobs, registry = stubs
    job = jobs.CreateJob(trainer_pb2.CreateJobRequest(
        tenant="acme", dataset="blobs", method="decoder", adapter_name="long",
        hyperparameters=trainer_pb2.Hyperparameters(epochs=500, batch_size=2)), timeout=30)
    stream = jobs.WatchJob(trainer_pb2.WatchJobRequest(id=job.id, tenant="acme"), timeout=120)
    next(e for e in stream if e.phase == "training")
    cancelled = jobs.CancelJob(trainer_pb2.CancelJobRequest(id=job.id, tenant="acme"), timeout=30)
    assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
    assert [e.job.state for e in stream][-1] == trainer_pb2.JOB_STATE_CANCELLED
    assert list(registry.ListAdapters(trainer_pb2.ListAdaptersRequest(tenant="acme", name="long")).adapters) == []


def test_metrics_carry_no_job_or_tenant_labels(stubs, trainer, first_job):
    """/metrics is unauthenticated: while a tenant's job trains it shows aggregates, never its id or tenant."""
    jobs, _ = stubs
    job = jobs.CreateJob(trainer_pb2.CreateJobRequest(
        tenant="acme", dataset="blobs", method="decoder", adapter_name="watched",
        hyperparameters=trainer_pb2.Hyperparameters(epochs=500, batch_size=2)), timeout=30)
    stream = jobs.WatchJob(trainer_pb2.WatchJobRequest(id=job.id, tenant="acme"), timeout=120)
    next(e for e in stream if e.phase == "training" and e.job.step >= 2)
    with urllib.request.urlopen(f"http://127.0.0.1:{trainer.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    stream.cancel()
    jobs.CancelJob(trainer_pb2.CancelJobRequest(id=job.id, tenant="acme"), timeout=30)
    assert job.id not in text and first_job[-1].job.id not in text and "acme" not in text
    assert "job=" not in text and "tenant=" not in text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("samforge_training"))
    assert float(samples['samforge_training_jobs{state="running"}']) == 1
    assert float(samples["samforge_training_steps_total"]) >= 2


@pytest.mark.parametrize(("fields", "needle"), [
    ({"dataset": "../acme/blobs"}, "dataset"),
    ({"dataset": "/etc"}, "dataset"),
    ({"adapter_name": "../../etc"}, "adapter_name"),
    ({"method": "magic"}, "method"),
    ({"tenant": "../acme"}, "tenant"),
    ({"hyperparameters": trainer_pb2.Hyperparameters(val_fraction=1.5)}, "val_fraction"),
    *[({"hyperparameters": trainer_pb2.Hyperparameters(**{name: 2**31 - 1})}, f"hyperparameters.{name}: must be 0")
      for name in ("rank", "epochs", "batch_size", "warmup_steps", "checkpoint_every", "crop")],
    ({"hyperparameters": trainer_pb2.Hyperparameters(lr=1e30)}, "hyperparameters.lr: must be 0 (the default) or > 0 "
                                                                "and <= 1"),
    ({"resources": trainer_pb2.Resources(nodes=2)}, "resources.nodes: must be 0 (the default) or 1 to 1"),
    ({"resources": trainer_pb2.Resources(processes_per_node=64)}, "resources.processes_per_node: must be 0"),
    ({"resources": trainer_pb2.Resources(processes_per_node=3)}, "resources.processes_per_node: the global batch"),
    ({"resources": trainer_pb2.Resources(gpus_per_process=-1)}, "resources.gpus_per_process: must be 0"),
    ({"resources": trainer_pb2.Resources(gpus_per_process=1)}, "resources.gpus_per_process: asks for 1 GPU"),
])
def test_bad_job_requests_are_invalid_argument(stubs, trainer, fields, needle):
    jobs, _ = stubs
    request = {"tenant": "acme", "dataset": "blobs", "method": "decoder", "adapter_name": "ships", **fields}
    code, details = code_of(jobs.CreateJob, trainer_pb2.CreateJobRequest(**request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details
    assert health_status(trainer.address) == health_pb2.HealthCheckResponse.SERVING


def test_unknown_jobs_bad_refs_and_malicious_archives_leave_the_service_serving(stubs, trainer):
    jobs, registry = stubs
    unknown = trainer_pb2.WatchJobRequest(id="f" * 32, tenant="acme")
    assert code_of(jobs.WatchJob, unknown)[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(jobs.CancelJob, trainer_pb2.CancelJobRequest(id="../x", tenant="acme"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(registry.GetAdapter, trainer_pb2.GetAdapterRequest(tenant="acme", ref="../x"))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    evil = tar_bytes({"images/a.png": b"x", "../../escaped.txt": b"owned"})
    code, details = code_of(jobs.UploadDataset, _chunks(evil))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in details
    code, details = code_of(jobs.UploadDataset, _chunks(bytes(3 << 20)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in details
    assert health_status(trainer.address) == health_pb2.HealthCheckResponse.SERVING


def test_a_zip_bomb_upload_is_refused_and_leaves_nothing(stubs, trainer, trainer_env):
    jobs, _ = stubs
    uploads = trainer_env[1] / "data" / "acme" / "uploads"
    before = sorted(uploads.iterdir()) if uploads.exists() else []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive, \
            archive.open("images/zero.png", "w") as entry:
        for _ in range(100):
            entry.write(bytes(1 << 20))
    assert len(buffer.getvalue()) < 200_000
    code, details = code_of(jobs.UploadDataset, _chunks(buffer.getvalue(), filename="bomb.zip"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "SAMFORGE_MAX_EXTRACT_RATIO" in details
    assert details.startswith("data: ")
    assert (sorted(uploads.iterdir()) if uploads.exists() else []) == before
    assert health_status(trainer.address) == health_pb2.HealthCheckResponse.SERVING


# Last on purpose: it stops the module's server and restarts the service on the same folders.
def test_sigterm_leaves_a_running_job_resumable_and_a_restart_resumes_it(stubs, trainer, trainer_env):
    env, root = trainer_env
    jobs, _ = stubs
    job = jobs.CreateJob(trainer_pb2.CreateJobRequest(
        tenant="acme", dataset="blobs", method="decoder", adapter_name="long",
        hyperparameters=trainer_pb2.Hyperparameters(epochs=500, batch_size=2, checkpoint_every=3)), timeout=30)
    stream = jobs.WatchJob(trainer_pb2.WatchJobRequest(id=job.id, tenant="acme"), timeout=120)
    next(e for e in stream if e.phase == "training" and e.job.step >= 7)
    stream.cancel()
    assert trainer.stop() == 0
    folder = root / "jobs" / "acme" / job.id
    saved = json.loads((folder / "job.json").read_text())
    assert saved["state"] == "QUEUED" and "resumes at the next start" in saved["events"][-1]["message"]
    resumed_from = int(sorted((folder / "checkpoints").glob("step_*.pt"))[-1].stem.split("_")[1])
    assert resumed_from >= 6
    with running("trainer", env, root) as service, grpc.insecure_channel(service.address) as channel:
        restarted = trainer_pb2_grpc.TrainerServiceStub(channel)
        stream = restarted.WatchJob(trainer_pb2.WatchJobRequest(id=job.id, tenant="acme"), timeout=120)
        seen = next(e for e in stream if e.phase == "training")
        assert resumed_from + 1 <= seen.job.step < seen.job.total_steps
        stream.cancel()
        cancelled = restarted.CancelJob(trainer_pb2.CancelJobRequest(id=job.id, tenant="acme"), timeout=30)
        assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
        listed = restarted.ListJobs(trainer_pb2.ListJobsRequest(tenant="acme"), timeout=30).jobs
        assert {j.state for j in listed if j.id != job.id} == {trainer_pb2.JOB_STATE_SUCCEEDED,  # kept over restarts
                                                                trainer_pb2.JOB_STATE_CANCELLED}
