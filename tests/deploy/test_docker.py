"""The container images: hadolint-clean, multi-stage, non-root, pinned, in step with pyproject and the protos."""

from __future__ import annotations

import fnmatch
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from services.common.settings import ENV, ENV_BY_NAME

from .k8s import DEPLOY, ROOT, hadolint, missing_tool

DOCKER = DEPLOY / "docker"
DOCKERFILES = {"Dockerfile": "cpu", "Dockerfile.cuda": "gpu"}


def parse(path: Path):
    try:
        from dockerfile_parse import DockerfileParser
    except ImportError:
        missing_tool("dockerfile-parse", "dockerfile-parse is needed to read deploy/docker/Dockerfile*")
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def stages(parser) -> list[tuple[str, list[dict]]]:
    """(stage name, instructions) in order."""
    result: list[tuple[str, list[dict]]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            words = item["value"].split()
            result.append((words[2] if len(words) == 3 and words[1].lower() == "as" else "", []))
        elif result:
            result[-1][1].append(item)
    return result


def pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()  # text, not tomllib: the project supports Python 3.10


def pinned(package: str) -> str:
    match = re.search(rf'^\s*"{re.escape(package)}==([\w.]+)",', pyproject(), flags=re.M)
    assert match, f"pyproject.toml does not pin {package}"
    return match.group(1)


def generated_grpc_version() -> str:
    versions = {re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", p.read_text()).group(1)
                for p in (ROOT / "services" / "_generated").rglob("*_pb2_grpc.py")}
    assert len(versions) == 1, versions
    return versions.pop()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name):
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKER / name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_structure(name):
    parser = parse(DOCKER / name)
    assert parser.is_multistage
    named_stages = stages(parser)
    stage_names = [stage for stage, _ in named_stages]
    assert stage_names[-1] == "runtime" and "builder" in stage_names and "protos" in stage_names
    for image in parser.parent_images:
        if image in stage_names:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: base image {image} not pinned"
    runtime = named_stages[-1][1]
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    assert users, f"{name}: the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} (numeric, non-root for runAsNonRoot)"
    assert "10001" == uid, "the manifests run pods as uid 10001"
    cmd = [i for i in runtime if i["instruction"] == "CMD"]
    assert cmd and json.loads(cmd[-1]["value"])[:2] == ["python", "-m"], f"{name}: CMD should be exec form"
    # the final image gets the virtualenv from the builder, and the builder waits for the protos check
    assert any(i["instruction"] == "COPY" and "--from=builder" in i["value"] for i in runtime)
    builder = dict(named_stages)["builder"]
    assert any(i["instruction"] == "COPY" and "--from=protos" in i["value"] for i in builder)


@pytest.mark.parametrize("name,extra", DOCKERFILES.items())
def test_image_installs_what_pyproject_pins(name, extra):
    text = (DOCKER / name).read_text()
    assert f'"torch=={pinned("torch")}"' in text, f"{name}: torch pin differs from pyproject.toml"
    assert f'"torchvision=={pinned("torchvision")}"' in text, f"{name}: torchvision pin differs"
    assert f'pip install ".[{extra}]"' in text
    assert re.search(rf"^{extra} = \[", pyproject(), flags=re.M), f"pyproject.toml has no extra {extra!r}"
    # the committed generated code is checked with the generator version that produced it
    assert f'"grpcio-tools=={generated_grpc_version()}"' in text
    assert "python protos/generate.py --check" in text
    # the baked-in default model is loaded once at build time (weights sha256 verified by load_model)
    assert f"load_model('{ENV_BY_NAME['SAMFORGE_MODEL'].default}')" in text


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_defaults_are_known_settings_and_ports(name):
    parser = parse(DOCKER / name)
    runtime = stages(parser)[-1][1]
    env_text = " ".join(i["value"] for i in runtime if i["instruction"] == "ENV")
    for var in re.findall(r"\b(SAMFORGE_[A-Z0-9_]+)=", env_text):
        assert var in ENV_BY_NAME, f"{name}: ENV {var} is not a setting"
    assert "SAMFORGE_HOST=0.0.0.0" in env_text
    exposed = {int(p) for i in runtime if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    ports = {int(v.default) for v in ENV if v.name.endswith("_PORT")}
    assert exposed == ports


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule, simplified: the last matching pattern wins, `!` re-includes."""
    verdict = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().rstrip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        suffixes = ["/".join(parts[i:]) for i in range(len(parts))]
        matched = any(fnmatch.fnmatchcase(p, c) for c in candidates for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(s, pattern[3:]) for s in suffixes))
        if matched:
            verdict = not negate
    return verdict


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_sends_only_what_the_build_copies(name):
    ignore = DOCKER / f"{name}.dockerignore"
    assert ignore.is_file(), f"BuildKit reads {ignore.name} next to {name}"
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for item in parse(DOCKER / name).structure:
        if item["instruction"] != "COPY" or "--from=" in item["value"]:
            continue
        for source in item["value"].split()[:-1]:
            assert not _ignored(patterns, source.rstrip("/")), f"{name}: COPY {source} is excluded by {ignore.name}"
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
    for private in (".git", ".venv", "tests", "var", "out", "bench", "sam_core/__pycache__/x.pyc",
                    "services/__pycache__"):
        assert _ignored(patterns, private), f"{ignore.name} lets {private} into the build context"
