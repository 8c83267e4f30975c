"""Security scanners on every CI run: checkov over the rendered overlays and the Dockerfiles, bandit over the
Python the images ship (sam_core, services) and the benchmarks (bench). Any finding fails, and so does a
skip without a reason.

Where a check does not apply, the skip sits next to what it is about and says why: a
``checkov.io/skip<N>: CKV_K8S_<id>=<reason>`` annotation on the object, a ``# checkov:skip=<id>:<reason>``
comment in the Dockerfile, a commented entry in pyproject's ``[tool.bandit]`` (a check off everywhere) or
``# nosec B<id>  # <reason>`` on one line.

checkov runs from its own environment, ``.venv-scan`` (``make scan-env``, pins in .ci/requirements-scan.txt);
without it these tests skip, unless SAMFORGE_REQUIRE_SCANS is set (``make test`` sets it, so CI fails).
bandit comes with the dev tools in .venv.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .k8s import DEPLOY, OVERLAYS, ROOT, missing_tool, workloads

pytestmark = pytest.mark.slow  # each checkov run starts a large program (seconds)

SCAN_VENV = ROOT / ".venv-scan"
REQUIRE_SCANS = "SAMFORGE_REQUIRE_SCANS"
NO_REASON = "No comment provided"  # what checkov records for a skip that gives none
DOCKERFILES = [DEPLOY / "docker" / name for name in ("Dockerfile", "Dockerfile.cuda")]
BANDIT_TARGETS = ("sam_core", "services", "bench")


# ---------------------------------------------------------------------------------------------- checkov
def checkov_executable() -> Path:
    path = SCAN_VENV / "bin" / "checkov"
    if os.access(path, os.X_OK):
        return path
    why = f"checkov is not installed in {SCAN_VENV} (`make scan-env` builds it)"
    if os.environ.get(REQUIRE_SCANS):
        pytest.fail(f"{why}; {REQUIRE_SCANS} is set, so this fails instead of skipping", pytrace=False)
    pytest.skip(f"{why}; `make test` builds it and sets {REQUIRE_SCANS}")
    raise AssertionError("unreachable")


@dataclass
class CheckovReport:
    passed: list[dict]
    failed: list[dict]
    skipped: list[dict]

    def of_file(self, name: str) -> CheckovReport:
        def keep(checks: list[dict]) -> list[dict]:
            return [c for c in checks if Path(c["file_path"]).name == name]

        return CheckovReport(keep(self.passed), keep(self.failed), keep(self.skipped))

    def resources(self) -> set[str]:
        return {c["resource"] for c in self.passed + self.failed + self.skipped}

    def problems(self) -> list[str]:
        """Failed checks, and skipped ones without a reason."""
        found = [f"FAILED {c['check_id']} {c['check_name']!r}: {c['resource']} ({Path(c['file_path']).name})"
                 for c in self.failed]
        found += [f"SKIPPED WITHOUT A REASON {c['check_id']}: {c['resource']} ({Path(c['file_path']).name})"
                  for c in self.skipped if c["check_result"].get("suppress_comment", NO_REASON) == NO_REASON]
        return found


def checkov(framework: str, files: list[Path]) -> CheckovReport:
    """checkov over ``files``, offline (--skip-download: no Prisma Cloud guidelines or policies)."""
    argv = [str(checkov_executable()), "--framework", framework, "--output", "json", "--skip-download"]
    for path in files:
        argv += ["--file", str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode in (0, 1), f"checkov failed to run ({proc.returncode}):\n{proc.stderr[-3000:]}"
    data = json.loads(proc.stdout)
    assert isinstance(data, dict) and data["check_type"] == framework, proc.stdout[:500]
    assert data["summary"]["parsing_errors"] == 0, data["summary"]
    results = data["results"]
    return CheckovReport(results["passed_checks"], results["failed_checks"], results["skipped_checks"])


@pytest.fixture(scope="module")
def overlays_scan(rendered, tmp_path_factory) -> CheckovReport:
    """One checkov run over both rendered overlays (cpu.yaml, gpu.yaml): it takes seconds to start."""
    root = tmp_path_factory.mktemp("rendered")
    for name, objects in rendered.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return checkov("kubernetes", sorted(root.glob("*.yaml")))


@pytest.mark.parametrize("name", OVERLAYS)
def test_checkov_finds_nothing_in_the_rendered_overlay(rendered, overlays_scan, name):
    report = overlays_scan.of_file(f"{name}.yaml")
    # every workload was checked: nothing found because nothing is wrong, not because nothing was scanned
    scanned = {f"{w.kind}.{w.namespace}.{w.name}" for w in workloads(rendered[name])}
    assert scanned and scanned <= report.resources(), scanned - report.resources()
    assert len(report.passed) > 300, len(report.passed)
    assert not report.problems(), "\n".join(report.problems())


def test_checkov_finds_nothing_in_the_dockerfiles():
    assert {p.name for p in (DEPLOY / "docker").glob("Dockerfile*") if p.suffix != ".dockerignore"} == \
        {p.name for p in DOCKERFILES}, "a new Dockerfile: scan it too"
    report = checkov("dockerfile", DOCKERFILES)
    for path in DOCKERFILES:
        assert len(report.of_file(path.name).passed) > 100, path.name
    assert not report.problems(), "\n".join(report.problems())


def test_checkov_reports_findings_and_skips_without_a_reason(tmp_path):
    """The two ways the scans above can fail, shown on purpose-made objects."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unpinned", "namespace": "x"},
           "spec": {"containers": [{"name": "app", "image": "example.com/app:1.0"}]}}
    excused = {**pod, "metadata": {"name": "excused", "namespace": "x", "annotations": {
        "checkov.io/skip1": "CKV_K8S_43", "checkov.io/skip2": "CKV_K8S_15=pulled by digest elsewhere"}}}
    path = tmp_path / "pods.yaml"
    path.write_text(yaml.safe_dump_all([pod, excused]))
    problems = checkov("kubernetes", [path]).problems()
    assert any(p.startswith("FAILED CKV_K8S_43 ") and "Pod.x.unpinned" in p for p in problems), problems
    assert any(p.startswith("SKIPPED WITHOUT A REASON CKV_K8S_43:") and "Pod.x.excused" in p for p in problems)
    assert not any("CKV_K8S_15" in p and "Pod.x.excused" in p for p in problems), problems


# ----------------------------------------------------------------------------------------------- bandit
def bandit(tmp_path: Path, targets: list[str]) -> dict:
    """bandit with the project's configuration (pyproject.toml [tool.bandit]) -> its JSON report."""
    out = tmp_path / "bandit.json"
    proc = subprocess.run([sys.executable, "-m", "bandit", "-c", "pyproject.toml", "-r", *targets, "-f", "json",
                           "-o", str(out), "-q"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if "No module named bandit" in proc.stderr:
        missing_tool("bandit", "bandit scans sam_core, services and bench")
    assert proc.returncode in (0, 1) and out.exists(), f"bandit failed to run:\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_bandit_finds_nothing(tmp_path):
    report = bandit(tmp_path, list(BANDIT_TARGETS))
    assert not report["errors"], report["errors"]
    assert report["metrics"]["_totals"]["loc"] > 10_000  # it read the code
    findings = [f"{r['test_id']} {r['issue_text']} {r['filename']}:{r['line_number']}" for r in report["results"]]
    assert not findings, "\n".join(findings)


def test_bandit_still_reports_what_the_configuration_keeps(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import subprocess\n\n\ndef run(name):\n    subprocess.call("ls " + name, shell=True)\n\n\n'
                   'PASSWORD = "hunter2"\n')
    found = {r["test_id"] for r in bandit(tmp_path, [str(bad)])["results"]}
    assert found == {"B602", "B105"}, found


def test_every_bandit_exception_gives_its_reason():
    text = (ROOT / "pyproject.toml").read_text()  # text, not tomllib: the comments are the point
    block = text[text.index("\n[tool.bandit]\n") + 1:]
    block = block[:block.index("\n[", 1)]
    skipped = re.findall(r'"(B\d+)"', block)
    assert skipped, "no [tool.bandit] skips found"
    explained = re.findall(r'(?:^ *#.*\S.*\n)+ *"(B\d+)",', block, flags=re.M)
    assert skipped == explained, f"skips without a comment above them: {sorted(set(skipped) - set(explained))}"
    for target in BANDIT_TARGETS:
        for path in (ROOT / target).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if "nosec" in line:
                    assert re.search(r"# nosec B\d+(?:, *B\d+)* +# +\S", line), \
                        f"{path.relative_to(ROOT)}:{number}: write `# nosec B<id>  # <reason>`"
