"""The trainer's publish guard in-process on the tiny model: a harmful job (lr 1.0) ends REJECTED without
publishing or moving its alias; a sound job beats a harmful champion on the same signed split and is promoted;
Promote refuses a worse or incomparable version unless forced; a held-out image missing from new data fails the
job naming the split.

The tiny model is random: a sound 3-epoch job does not beat its zero-shot output, so the sound job is judged
against a harmful champion published with allow_regression.
"""

from __future__ import annotations

import json
import shutil

import pytest

from sam_core.adapters.artifact import read_adapter_config, write_adapter_config
from sam_core.adapters.store import AdapterConflict, content_sha256
from services.trainer.job_model import JobState
from services.trainer.job_spec import Hyperparameters
from services.trainer.registry import TenantRegistry, champion
from tests.conftest import write_blob_dataset
from tests.services.test_trainer_jobs import make_manager, request

pytestmark = pytest.mark.slow
HARMFUL = Hyperparameters(epochs=3, batch_size=2, lr=1.0, checkpoint_every=1)


@pytest.fixture
def dirs(tmp_path):
    write_blob_dataset(tmp_path / "data" / "default" / "blobs")
    return {"data": tmp_path / "data", "jobs": tmp_path / "jobs", "registry": tmp_path / "registry"}


@pytest.fixture
def manager(dirs, tiny_model):
    mgr = make_manager(dirs, tiny_model)
    yield mgr
    mgr.shutdown(timeout=30)


def test_harmful_job_is_rejected_and_publishes_nothing(manager, dirs):
    job = manager.wait("", manager.create(request(hp=HARMFUL, promote_to="prod", allow_regression=False)).id,
                       timeout=180)
    assert job.state is JobState.REJECTED and job.adapter_version == 0 and job.error == ""
    assert job.metrics["guard_candidate"] < job.metrics["guard_baseline"]
    events = list(manager.watch("", job.id))
    assert events[-1].message.startswith("rejected: candidate") and "base model" in events[-1].message
    assert manager.store.list("default") == []
    folder = dirs["jobs"] / "default" / job.id
    assert not (folder / "adapter").exists() and (folder / "rejected" / "adapter_config.json").is_file()
    assert not (folder / "checkpoints").exists()
    assert json.loads((folder / "job.json").read_text())["state"] == "REJECTED"


def test_champion_and_challenger_on_the_same_split_and_the_promote_guard(manager, dirs):
    store, registry = manager.store, TenantRegistry(manager.store)
    first = manager.wait("", manager.create(request(hp=HARMFUL, promote_to="prod")).id, timeout=180)
    assert first.state is JobState.SUCCEEDED and first.adapter_version == 1  # allow_regression
    sound = manager.wait("", manager.create(request(promote_to="prod", allow_regression=False)).id, timeout=180)
    assert sound.state is JobState.SUCCEEDED and sound.adapter_version == 2, sound.error
    saved = json.loads((dirs["jobs"] / "default" / sound.id / "job.json").read_text())
    assert saved["baseline"] == "blobs:1"  # the champion, fixed at the job's first start
    v1, v2 = store.get("default", "blobs", 1), store.get("default", "blobs", 2)
    copied = dirs["jobs"] / "default" / sound.id / "baseline"  # on the jobs volume, for workers without the store
    assert content_sha256(copied) == v1.sha256
    assert sound.metrics["guard_baseline"] == v1.metrics["heldout_dice"] < v2.metrics["heldout_dice"]
    assert v1.metrics["heldout_signature"] == v2.metrics["heldout_signature"]  # the split is reused
    split = read_adapter_config(store.path_of(v1)).heldout_split
    assert split is not None and read_adapter_config(store.path_of(v2)).heldout_split == split
    assert champion(store, "default", "blobs", "prod") == store.resolve("default", "blobs@prod") == v2 and \
        champion(store, "default", "blobs", "") == v2 and champion(store, "default", "other", "prod") is None

    worse = manager.wait("", manager.create(request(hp=HARMFUL, promote_to="prod", allow_regression=False)).id,
                         timeout=180)
    assert worse.state is JobState.REJECTED and worse.metrics["guard_baseline"] == v2.metrics["heldout_dice"]
    assert [v.version for v in store.list("default", "blobs")] == [1, 2]
    assert store.resolve("default", "blobs@prod").version == 2  # the alias did not move

    with pytest.raises(AdapterConflict) as info:
        registry.promote("", "blobs", "prod", 1)
    assert "blobs:1 scores" in info.value.detail and "blobs:2 (blobs@prod)" in info.value.detail
    assert info.value.field == "version" and store.resolve("default", "blobs@prod").version == 2
    assert registry.promote("", "blobs", "prod", 1, force=True).version == 1
    assert registry.promote("", "blobs", "prod", 2).version == 2  # better than the current one: no force needed
    assert registry.promote("", "blobs", "staging", 1).version == 1  # a new alias has no current version

    unguarded = dirs["jobs"] / "unguarded"  # v2's artifact without its held-out record
    shutil.copytree(store.path_of(v2), unguarded)
    config = read_adapter_config(unguarded)
    metrics = {k: v for k, v in config.metrics.items() if not k.startswith("heldout_")}
    (unguarded / "adapter_config.json").chmod(0o644)
    write_adapter_config(unguarded, config.__class__(**{**config.__dict__, "metrics": metrics, "heldout_split": None}))
    v3 = store.publish("default", "blobs", unguarded)
    with pytest.raises(AdapterConflict, match="not scored on the same held-out split"):
        registry.promote("", "blobs", "prod", v3.version)
    assert registry.promote("", "blobs", "prod", v3.version, force=True).version == v3.version


def test_a_held_out_image_missing_from_new_data_fails_the_job(manager, dirs):
    first = manager.wait("", manager.create(request()).id, timeout=180)
    assert first.state is JobState.SUCCEEDED
    split = read_adapter_config(manager.store.path_of(manager.store.get("default", "blobs", 1))).heldout_split
    assert split is not None
    lost = split["images"][0]["image_id"]
    for sub in ("images", "masks"):
        (dirs["data"] / "default" / "blobs" / sub / f"{lost}.png").unlink()
    job = manager.wait("", manager.create(request()).id, timeout=180)
    assert job.state is JobState.FAILED and job.error.startswith("heldout_split: the adapter's held-out split")
    assert f"{lost} (image missing)" in job.error and str(dirs["data"]) not in job.error
    assert [v.version for v in manager.store.list("default", "blobs")] == [1]
