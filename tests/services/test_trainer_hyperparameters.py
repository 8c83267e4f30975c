"""CreateJob's hyper-parameter bounds: every field has a documented upper bound, checked before a job is queued
(InvalidInput naming ``hyperparameters.<field>`` and stating the bound), and the bounds agree with sam_core."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from sam_core.errors import InvalidInput
from services.trainer.job_spec import Hyperparameters, JobRequest, check_request

INT32_MAX = 2**31 - 1
README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


def job(method: str = "lora", **values: object) -> JobRequest:
    return JobRequest(tenant="t", dataset="d", method=method, adapter_name="a",
                      hyperparameters=Hyperparameters(**values))  # type: ignore[arg-type]


@pytest.mark.parametrize(("values", "field", "bound"), [
    ({"rank": INT32_MAX}, "rank", "<= 256"),
    ({"epochs": INT32_MAX}, "epochs", "<= 10000"),
    ({"max_steps": INT32_MAX}, "max_steps", "<= 1000000"),
    ({"lr": 1e30}, "lr", "<= 1"),
    ({"lr": float("inf")}, "lr", "<= 1"),
    ({"batch_size": INT32_MAX}, "batch_size", "<= 64"),
    ({"warmup_steps": INT32_MAX}, "warmup_steps", "<= 100000"),
    ({"checkpoint_every": INT32_MAX}, "checkpoint_every", "<= 1000000"),
    ({"crop": INT32_MAX}, "crop", "<= 8192"),
    ({"crop": 8}, "crop", ">= 32"),
    ({"patience": INT32_MAX}, "patience", "<= 10000"),
    ({"val_fraction": 0.99}, "val_fraction", "<= 0.95"),
    ({"seed": -1}, "seed", ">= 0"),
])
def test_values_past_a_bound_are_refused_naming_the_field_and_the_bound(values, field, bound):
    with pytest.raises(InvalidInput) as info:
        check_request(job(**values))
    assert info.value.field == f"hyperparameters.{field}"
    assert bound in info.value.detail, info.value.detail


def test_one_shot_methods_have_their_own_step_bound():
    with pytest.raises(InvalidInput) as info:
        check_request(job("persam", max_steps=20_000))
    assert info.value.field == "hyperparameters.max_steps" and "<= 10000" in info.value.detail
    check_request(job("lora", max_steps=20_000))


def test_every_numeric_hyperparameter_has_a_bound():
    from services.trainer.job_spec import HYPERPARAMETER_BOUNDS

    numeric = {f.name for f in fields(Hyperparameters) if f.type in ("int", "float")}
    assert numeric == {b.field for b in HYPERPARAMETER_BOUNDS}


@pytest.mark.parametrize("edge", ["low", "high"])
@pytest.mark.parametrize("method", ["decoder", "lora", "persam"])
def test_the_extreme_accepted_values_build_a_job_spec(tmp_path, edge, method):
    """What the table accepts sam_core accepts too: no job fails later for a value CreateJob let through."""
    from services.trainer.job_spec import HYPERPARAMETER_BOUNDS, applicable_bounds, build_spec

    rows = applicable_bounds(method)
    floats = {"lr", "val_fraction"}
    values: dict[str, object] = {
        b.field: (b.high if edge == "high" else b.high / 1000 if b.low_open else b.low) for b in rows}
    values = {k: (float(v) if k in floats else int(v)) for k, v in values.items()}  # type: ignore[call-overload]
    request = job(method, **values)
    check_request(request)
    spec = build_spec(request, tmp_path, tmp_path / "out")
    assert spec.train.method.rank == values["rank"] and spec.train.batch_size == values["batch_size"]
    skipped = set() if method == "auto" else {b.field for b in HYPERPARAMETER_BOUNDS if b.auto_only}
    assert {b.field for b in rows} == {b.field for b in HYPERPARAMETER_BOUNDS} - skipped


def test_the_deploy_readme_documents_the_bounds_table():
    from services.trainer.job_spec import bounds_table_markdown

    assert bounds_table_markdown() in README.read_text(), (
        "deploy/README.md's hyper-parameter table differs from services.trainer.job_spec.bounds_table_markdown()")
