"""The training pod exits with the status rank 0 recorded, so the Job's podFailurePolicy sees it.

torchrun exits 1 whenever a rank fails; the rendered pod command must still end 3 when the publishing guard
rejected the candidate and 2 on bad input (both are FailJob exit codes: a retry cannot change them). The pod
command is run locally as the kubelet would run it (one pod, two gloo ranks on 127.0.0.1, tiny model).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from services.common.settings import TrainerSettings
from services.trainer.job_spec import Resources
from services.trainer.k8s_job import TrainingJob, out_dir, render_job
from services.trainer.pod_entry import pod_exit_status
from services.trainer.worker import RESULT_FILE
from tests.conftest import write_blob_dataset
from tests.deploy.test_training import free_port, local_pod

JOB_ID = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"


def settings_for(root: Path) -> TrainerSettings:
    return TrainerSettings.from_env({"SAMFORGE_JOBS_DIR": str(root / "jobs"), "SAMFORGE_DATA_DIR": str(root / "data"),
                                     "SAMFORGE_K8S_IMAGE": "samforge:test", "SAMFORGE_K8S_CPU_PER_PROCESS": "1"})


def run_pod(tmp_path: Path, data: Path, *train_args: str) -> tuple[int, dict, str]:
    """Render a 1-node x 2-process Job, run its pod command; (exit status, the Job, rank output)."""
    settings = settings_for(tmp_path)
    job = TrainingJob(JOB_ID, "default", str(data), ("--model", "tiny", "--method", "decoder", "--max-steps", "2",
                                                     "--batch-size", "2", "--val-fraction", "0.34", *train_args),
                      Resources(nodes=1, processes_per_node=2))
    body = render_job(settings, job)
    argv, env = local_pod(body, 0, free_port())
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    return done.returncode, body, done.stderr[-3000:]


def fail_job_codes(job: dict) -> list[int]:
    rules = job["spec"]["podFailurePolicy"]["rules"]
    return [code for rule in rules if rule["action"] == "FailJob" for code in rule["onExitCodes"]["values"]]


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_the_guard_rejects_ends_the_pod_with_status_3(tmp_path):
    data = write_blob_dataset(tmp_path / "data" / "default" / "blobs", n_images=8, height=64, width=64)
    code, job, errors = run_pod(tmp_path, data, "--lr", "1.0", "--name", "blobs")  # harmful: below zero-shot
    assert code == 3, errors
    result = json.loads((out_dir(settings_for(tmp_path), "default", JOB_ID) / RESULT_FILE).read_text())
    assert (result["status"], result["exit_code"]) == ("rejected", 3)
    assert 3 in fail_job_codes(job)


@pytest.mark.slow
@pytest.mark.integration
def test_bad_input_ends_the_pod_with_status_2(tmp_path):
    empty = tmp_path / "data" / "default" / "empty"
    empty.mkdir(parents=True)
    code, job, errors = run_pod(tmp_path, empty, "--name", "empty")
    assert code == 2, errors
    assert 2 in fail_job_codes(job)


@pytest.mark.parametrize(("failures", "status"), [
    ({0: 3}, 3),  # the guard rejected the candidate; the other ranks had finished
    ({0: -15, 1: 2}, 2),  # rank 1 refused the data first; torchrun then killed rank 0
    ({0: 4, 1: 1}, 1),  # rank 1 crashed; rank 0 stopped on torchrun's SIGTERM
    ({0: 2, 1: 2}, 2),
    ({1: -9}, 1),  # the OOM killer: a crash, retried
    ({0: 4, 1: -15}, 1),
])
def test_the_rank_that_failed_on_its_own_decides_the_pods_status(failures, status):
    assert pod_exit_status(failures) == status
