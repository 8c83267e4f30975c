"""The DDP launcher shipped in deploy/examples/ddp-training-job.yaml runs against the current sam_core API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .k8s import DEPLOY, ROOT, load_yaml_file

EXAMPLE = DEPLOY / "examples" / "ddp-training-job.yaml"


def launcher_source() -> str:
    config = [o for o in load_yaml_file(EXAMPLE) if o["kind"] == "ConfigMap"][0]
    return config["data"]["ddp_train.py"]


def test_job_runs_the_launcher_it_ships():
    objects = {o["kind"]: o for o in load_yaml_file(EXAMPLE)}
    job, config = objects["Job"], objects["ConfigMap"]
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["command"] == ["torchrun"]
    mount = [m for m in container["volumeMounts"] if m["name"] == "launcher"][0]
    script = [a for a in container["args"] if a.endswith(".py")][0]
    assert script == f"{mount['mountPath']}/ddp_train.py"
    assert [v for v in spec["volumes"] if v["name"] == "launcher"][0]["configMap"]["name"] == \
        config["metadata"]["name"]
    nnodes = int([a for a in container["args"] if a.startswith("--nnodes=")][0].split("=")[1])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes
    assert job["spec"]["completionMode"] == "Indexed"
    service = objects["Service"]
    assert spec["subdomain"] == service["metadata"]["name"]
    master = [a for a in container["args"] if a.startswith("--master-addr=")][0].split("=")[1]
    assert master == f"{job['metadata']['name']}-0.{service['metadata']['name']}"


@pytest.mark.slow
def test_launcher_trains_and_publishes(tmp_path, blob_dataset_dir):
    """One process (WORLD_SIZE 1) on the tiny model: same code path as each torchrun rank, then the publish."""
    from sam_core.adapters.filesystem import FileSystemAdapterStore  # imports torch: only when this test runs

    script = tmp_path / "ddp_train.py"
    script.write_text(launcher_source())
    registry = tmp_path / "registry"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, str(script), "--data", str(blob_dataset_dir), "--out", str(tmp_path / "run"),
         "--model", "tiny", "--method", "decoder", "--max-steps", "2", "--batch-size", "2",
         "--checkpoint-every", "1", "--val-fraction", "0.34", "--registry", str(registry), "--name", "blobs"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["published"] == "blobs:1" and summary["steps"] == 2
    version = FileSystemAdapterStore(registry).resolve("default", "blobs")
    assert (version.name, version.version, version.method) == ("blobs", 1, "decoder")
