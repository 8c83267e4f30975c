"""deploy/examples/ddp-training-job.yaml is the kubernetes executor's own output for the command in its
header: no second launcher, nothing to go stale (the command's pods are run in tests/deploy/test_training.py)."""

from __future__ import annotations

import shlex

import yaml

from services.trainer import k8s_job

from .k8s import DEPLOY, load_yaml_file

EXAMPLE = DEPLOY / "examples" / "ddp-training-job.yaml"
PLACEHOLDER_DIGEST = "0" * 64


def header_command() -> tuple[dict[str, str], list[str]]:
    """(environment, arguments) of the ``python -m services.trainer.k8s_job`` command in the header."""
    lines = [line[1:].strip() for line in EXAMPLE.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("SAMFORGE_JOBS_DIR="))
    end = next(i for i, line in enumerate(lines) if "> job.yaml" in line)
    words = shlex.split(" ".join(line.rstrip("\\") for line in lines[start:end + 1]))
    env = dict(w.split("=", 1) for w in words if "=" in w and w.startswith("SAMFORGE_"))
    command = words[len(env):words.index(">")]
    assert command[:3] == ["python", "-m", "services.trainer.k8s_job"], command
    env["SAMFORGE_K8S_IMAGE"] = env["SAMFORGE_K8S_IMAGE"].replace("<digest>", PLACEHOLDER_DIGEST)
    return env, command[3:]


def test_the_example_is_what_the_executor_renders(monkeypatch, capsys):
    env, argv = header_command()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert k8s_job.main(argv) == 0
    rendered = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
    assert rendered == load_yaml_file(EXAMPLE)


def test_the_example_runs_samforge_train_under_torchrun_without_a_launcher():
    objects = {o["kind"]: o for o in load_yaml_file(EXAMPLE)}
    assert set(objects) == {"Service", "Job"}  # no ConfigMap carrying a Python launcher
    job, service = objects["Job"], objects["Service"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "services.trainer.pod_entry"]  # torchrun, exiting with the rank's status
    train = command[command.index("--no-python") + 1:]
    assert train[train.index("--") + 1:][:2] == ["samforge", "train"]  # each rank on its own GPU, then samforge
    assert "configMap" not in str(spec["volumes"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["completionMode"] == "Indexed"
    assert "--nnodes=2" in command and "--nproc-per-node=2" in command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert spec["subdomain"] == service["metadata"]["name"]
    assert f"--master-addr={job['metadata']['name']}-0.{service['metadata']['name']}" in command
