"""deploy/README.md and deploy/prometheus-adapter agree with the code they describe."""

from __future__ import annotations

import re

import yaml

from services.common.settings import env_table_markdown

from .k8s import DEPLOY, ROOT

README = DEPLOY / "README.md"
BEGIN, END = "<!-- settings:begin -->\n", "<!-- settings:end -->"


def metric_names() -> set[str]:
    """Metric names declared in services/common/metrics.py (as Prometheus exposes them)."""
    source = (ROOT / "services" / "common" / "metrics.py").read_text()
    return set(re.findall(r'(?:Counter|Gauge|Histogram|Summary)\(\s*"(samforge_[a-z0-9_]+)"', source))


def test_settings_table_matches_the_settings_module():
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "settings markers missing or repeated"
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    assert block == env_table_markdown(), (
        "deploy/README.md's settings block differs from services.common.settings.env_table_markdown(); "
        "paste the function's output between the markers")


def test_every_metric_is_documented():
    text = README.read_text()
    documented = set(re.findall(r"^\| `(samforge_[a-z0-9_]+)` \|", text, flags=re.M))
    declared = metric_names()
    assert len(declared) >= 10
    assert documented == declared, f"undocumented: {declared - documented}; stale: {documented - declared}"


def test_readme_names_the_commands_it_promises():
    text = README.read_text()
    for needle in ("kubectl apply -k deploy/overlays/gpu", "sam.v1.TrainerService/CreateJob",
                   "sam.v1.AdapterRegistry/Promote", "sam.v1.AdapterRegistry/Rollback",
                   "examples/ddp-training-job.yaml", "prometheus-adapter/rules.yaml",
                   "kustomize edit set image samforge=registry.example.com/samforge:0.1.0-cpu@",
                   "components: [../../components/kubernetes-executor]", "components: [../../components/s3-registry]",
                   "SAMFORGE_TRAINER_EXECUTOR", "python -m services.trainer.k8s_job",
                   "The Kubernetes API calls themselves are not tested here"):
        assert needle in text, needle


def test_prometheus_adapter_rule_serves_the_encoder_autoscaling_metric():
    config = yaml.safe_load((DEPLOY / "prometheus-adapter" / "rules.yaml").read_text())
    hpa = [d for d in yaml.safe_load_all((DEPLOY / "base" / "hpa.yaml").read_text())
           if d["metadata"]["name"] == "samforge-encoder"][0]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in metric_names()
    rules = [r for r in config["rules"] if r["name"]["as"] == metric]
    assert len(rules) == 1
    rule = rules[0]
    assert metric in rule["seriesQuery"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    # the README shows the same rule
    assert rule["metricsQuery"] in README.read_text()
