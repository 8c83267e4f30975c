"""The ENV table is the one source of settings: names, defaults, parsing; and every SAMFORGE_* name the code
mentions is in it."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from sam_core.errors import InvalidInput
from services.common.settings import (
    ENV,
    ENV_BY_NAME,
    CommonSettings,
    DecoderSettings,
    EncoderSettings,
    TrainerSettings,
)

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = (EncoderSettings, DecoderSettings, TrainerSettings)
NAME = re.compile(r"\bSAMFORGE_[A-Z0-9_]*[A-Z0-9]\b")
# SAMFORGE_* names read outside the table, with the file that reads them (none: sam_core reads no settings)
OUTSIDE_THE_TABLE: dict[str, str] = {}


def source_files() -> list[Path]:
    return [p for package in ("services", "sam_core") for p in sorted((ROOT / package).rglob("*.py"))
            if "_generated" not in p.parts]


@pytest.mark.parametrize("kind", SETTINGS, ids=lambda k: k.SERVICE)
def test_settings_fields_have_no_defaults_of_their_own(kind):
    for field in dataclasses.fields(kind):
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, field.name


@pytest.mark.parametrize("kind", SETTINGS, ids=lambda k: k.SERVICE)
def test_unset_variables_take_the_table_defaults(kind):
    settings = kind.from_env({})
    for field_name, variable in kind.variables().items():
        var = ENV_BY_NAME[variable]  # KeyError: a field reads a variable the table does not declare
        assert kind.SERVICE in var.services, f"{variable} does not list {kind.SERVICE}"
        assert getattr(settings, field_name) == var.parse(var.default, variable), variable


def test_every_default_in_the_table_parses_and_every_variable_is_read():
    read = {variable for kind in SETTINGS for variable in kind.variables().values()}
    for var in ENV:
        var.parse(var.default, var.name)
    # SAMFORGE_ENCODER_PORT is listed for the decoder too (deploy derives SAMFORGE_ENCODER_ADDRESS from it)
    assert {var.name for var in ENV} == read


def test_common_fields_read_the_services_own_ports():
    assert {k.SERVICE: (k.variables()["port"], k.variables()["metrics_port"]) for k in SETTINGS} == {
        "encoder": ("SAMFORGE_ENCODER_PORT", "SAMFORGE_ENCODER_METRICS_PORT"),
        "decoder": ("SAMFORGE_DECODER_PORT", "SAMFORGE_DECODER_METRICS_PORT"),
        "trainer": ("SAMFORGE_TRAINER_PORT", "SAMFORGE_TRAINER_METRICS_PORT")}
    assert CommonSettings.SERVICE == ""


@pytest.mark.parametrize(("kind", "env", "variable"), [
    (TrainerSettings, {"SAMFORGE_WORKERS": "0"}, "SAMFORGE_WORKERS"),
    (TrainerSettings, {"SAMFORGE_GRACE_SECONDS": "soon"}, "SAMFORGE_GRACE_SECONDS"),
    (TrainerSettings, {"SAMFORGE_GRACE_SECONDS": "nan"}, "SAMFORGE_GRACE_SECONDS"),
    (TrainerSettings, {"SAMFORGE_LOG_LEVEL": "chatty"}, "SAMFORGE_LOG_LEVEL"),
    (TrainerSettings, {"SAMFORGE_TLS_CERT": "/cert.pem"}, "SAMFORGE_TLS_KEY"),
    (TrainerSettings, {"SAMFORGE_MAX_UPLOAD_BYTES": "0"}, "SAMFORGE_MAX_UPLOAD_BYTES"),
    (EncoderSettings, {"SAMFORGE_CACHE_BYTES": "1G"}, "SAMFORGE_CACHE_BYTES"),
    (EncoderSettings, {"SAMFORGE_BF16": "maybe"}, "SAMFORGE_BF16"),
    (EncoderSettings, {"SAMFORGE_ONNX_CACHE_DIR": ""}, "SAMFORGE_ONNX_CACHE_DIR"),
    # a decode budget must hold one image of SAMFORGE_MAX_PIXELS (10 bytes a pixel)
    (EncoderSettings, {"SAMFORGE_DECODE_BYTES": "639999999"}, "SAMFORGE_DECODE_BYTES"),
    (EncoderSettings, {"SAMFORGE_MAX_PIXELS": "100000000"}, "SAMFORGE_DECODE_BYTES"),
    (DecoderSettings, {"SAMFORGE_DECODER_RUNTIME": "tensorrt"}, "SAMFORGE_DECODER_RUNTIME"),
    (DecoderSettings, {"SAMFORGE_ENCODER_TIMEOUT_SECONDS": "inf"}, "SAMFORGE_ENCODER_TIMEOUT_SECONDS"),
    (DecoderSettings, {"SAMFORGE_MAX_PROMPTS": "0"}, "SAMFORGE_MAX_PROMPTS"),
    (DecoderSettings, {"SAMFORGE_REGISTRY_URL": "/var/registry"}, "SAMFORGE_REGISTRY_URL"),
    (EncoderSettings, {"SAMFORGE_REGISTRY_URL": "gs://bucket/prefix"}, "SAMFORGE_REGISTRY_URL"),
    (TrainerSettings, {"SAMFORGE_REGISTRY_URL": "s3:///no-bucket"}, "SAMFORGE_REGISTRY_URL"),
    (TrainerSettings, {"SAMFORGE_REGISTRY_URL": "s3://bucket/../up"}, "SAMFORGE_REGISTRY_URL"),
    (TrainerSettings, {"SAMFORGE_K8S_NODE_SELECTOR": "gpu=true"}, "SAMFORGE_K8S_NODE_SELECTOR"),
    (TrainerSettings, {"SAMFORGE_K8S_TOLERATIONS": "{}"}, "SAMFORGE_K8S_TOLERATIONS"),
    (TrainerSettings, {"SAMFORGE_K8S_TOLERATIONS": "[1]"}, "SAMFORGE_K8S_TOLERATIONS"),
    (TrainerSettings, {"SAMFORGE_K8S_MEMORY_PER_PROCESS": "16GB"}, "SAMFORGE_K8S_MEMORY_PER_PROCESS"),
    (TrainerSettings, {"SAMFORGE_K8S_CPU_PER_PROCESS": "0"}, "SAMFORGE_K8S_CPU_PER_PROCESS"),
    (TrainerSettings, {"SAMFORGE_K8S_NAMESPACE": ""}, "SAMFORGE_K8S_NAMESPACE"),
])
def test_a_bad_value_names_its_variable(kind, env, variable):
    with pytest.raises(InvalidInput) as info:
        kind.from_env(env)
    assert info.value.field == variable and str(info.value).startswith(variable)


def test_values_are_parsed_by_the_table():
    settings = EncoderSettings.from_env({"SAMFORGE_LOG_LEVEL": "debug", "SAMFORGE_BF16": "on",
                                         "SAMFORGE_MAX_WAIT_MS": "2.5", "SAMFORGE_CACHE_BYTES": "0"})
    assert (settings.log_level, settings.bf16, settings.max_wait_ms, settings.cache_bytes) == ("DEBUG", True, 2.5, 0)


def environment_reads(tree: ast.Module) -> list[tuple[int, str | None]]:
    """(line, name or None when not a literal) of ``os.environ.get(..)``, ``os.getenv(..)``, ``os.environ[..]``."""
    found: list[tuple[int, str | None]] = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args and ast.unparse(node.func) in ("os.environ.get", "os.getenv"):
            key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        if key is not None:
            literal = isinstance(key, ast.Constant) and isinstance(key.value, str)
            found.append((node.lineno, key.value if literal else None))
    return found


def test_every_samforge_variable_the_code_reads_or_names_is_in_the_table():
    outside: dict[str, str] = {}
    for path in source_files():
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        for line, name in environment_reads(ast.parse(text, filename=where)):
            assert name is not None, f"{where}:{line}: environment variable read by a computed name"
        for name in NAME.findall(text):
            if name not in ENV_BY_NAME:
                outside[name] = where
    assert outside == OUTSIDE_THE_TABLE


def test_the_scan_finds_reads_and_names():
    tree = ast.parse('import os\nos.environ.get("SAMFORGE_A")\nos.getenv("B", "1")\nos.environ["C"]\n'
                     'os.environ.get(name)\n')
    assert environment_reads(tree) == [(2, "SAMFORGE_A"), (3, "B"), (4, "C"), (5, None)]
    assert NAME.findall('"$SAMFORGE_ONNX_CACHE", f"SAMFORGE_{x}_PORT"') == ["SAMFORGE_ONNX_CACHE"]


@pytest.mark.parametrize("kind", SETTINGS, ids=lambda k: k.SERVICE)
@pytest.mark.parametrize("model", ["sam2.1_hiera_t", "sam2.1_hiera_b+", "sam2_hiera_l", "vit_b"])
def test_a_model_without_bundled_weights_needs_samforge_checkpoint(kind, model):
    with pytest.raises(InvalidInput) as info:
        kind.from_env({"SAMFORGE_MODEL": model})
    assert info.value.field == "SAMFORGE_CHECKPOINT" and f"SAMFORGE_MODEL={model}" in str(info.value)
    assert kind.from_env({"SAMFORGE_MODEL": model, "SAMFORGE_CHECKPOINT": "/models/weights.pt"}).model == model


def test_an_unknown_model_names_samforge_model_and_the_sam2_ids():
    with pytest.raises(InvalidInput) as info:
        EncoderSettings.from_env({"SAMFORGE_MODEL": "sam3"})
    assert info.value.field == "SAMFORGE_MODEL" and "sam2.1_hiera_t" in str(info.value)
    for name in ("SAMFORGE_MODEL", "SAMFORGE_CHECKPOINT"):
        assert "sam2" in ENV_BY_NAME[name].help


def test_the_checkpoint_rule_agrees_with_the_model_registry():
    """A model the settings let start without SAMFORGE_CHECKPOINT builds without one, and the others do not."""
    from sam_core.errors import ModelLoadError
    from sam_core.modeling.registry import MODEL_REGISTRY, load_model
    from services.common.settings import MODELS, needs_checkpoint

    assert set(MODELS) == set(MODEL_REGISTRY)
    for name in MODEL_REGISTRY:
        if needs_checkpoint(name):
            with pytest.raises(ModelLoadError):
                load_model(name)
        elif name != "litemedsam":  # the bundled weights: loads (slower), covered by the services' tests
            assert load_model(name).spec.name == name
