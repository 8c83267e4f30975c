"""The Triton model repository the gpu overlay deploys agrees with the encoder that calls it.

config.pbtxt is parsed as Triton's own ``inference.ModelConfig`` (the proto tritonclient ships) with
``google.protobuf.text_format``, which rejects unknown fields and enum values — as tritonserver does when it
loads the file. The values are compared with the encoder's triton backend (tensor names, model name, batch
size) and with the model the init container exports (input and embedding shapes).
"""

from __future__ import annotations

import shlex

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from sam_core.modeling.registry import SPECS
from services.encoder.backends import TRITON_INPUT, TRITON_OUTPUT

from .k8s import DEPLOY, mount_for, of_kind, samforge_containers
from .test_policy import arg_value, settings_env, triton_workload

CONFIG = DEPLOY / "triton" / "model_repository" / "sam_encoder" / "config.pbtxt"
# SAM's prompt/mask embedding width: 256 channels for every variant (sam_core.modeling.registry builds every prompt
# encoder with embed_dim 256); the spatial sizes come from sam_core.modeling.registry.SPECS.
EMBED_DIM = 256


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def gpu(rendered) -> list[dict]:
    return rendered["gpu"]


@pytest.fixture(scope="module")
def rendered_config(gpu) -> str:
    maps = [m for m in of_kind(gpu, "ConfigMap") if m["metadata"]["name"].startswith("samforge-triton-model-")]
    assert len(maps) == 1
    return maps[0]["data"]["config.pbtxt"]


@pytest.fixture(scope="module")
def config(rendered_config) -> model_config_pb2.ModelConfig:
    return parse(rendered_config)


@pytest.fixture(scope="module")
def encoder_env(gpu) -> dict[str, str]:
    container = [c for _, c, service in samforge_containers(gpu) if service == "encoder"][0]
    return settings_env(gpu, container, "encoder")


def test_the_configmap_carries_the_repository_file(rendered_config):
    assert rendered_config == CONFIG.read_text()


def test_config_serves_the_encoder_on_the_gpu_with_dynamic_batching(config, encoder_env):
    assert config.backend == "onnxruntime"
    assert config.platform in ("", "onnxruntime_onnx")
    assert config.default_model_filename in ("", "model.onnx"), "the init container writes model.onnx"
    assert config.HasField("dynamic_batching")
    assert all(0 < size <= config.max_batch_size for size in config.dynamic_batching.preferred_batch_size)
    groups = config.instance_group
    assert groups and all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in groups)
    # the encoder sends up to SAMFORGE_MAX_BATCH images per call; Triton rejects batches above max_batch_size
    assert 0 < int(encoder_env["SAMFORGE_MAX_BATCH"]) <= config.max_batch_size


def test_config_matches_the_encoder_backend_and_the_exported_model(config, encoder_env):
    assert encoder_env["SAMFORGE_ENCODER_BACKEND"] == "triton"
    assert config.name == encoder_env["SAMFORGE_TRITON_MODEL"]
    assert encoder_env["SAMFORGE_TRITON_MODEL_VERSION"] in ("", "1"), "the init container exports version 1"
    spec = SPECS[encoder_env["SAMFORGE_MODEL"]]  # litemedsam: 256 px in, 64 x 64 embedding out
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == \
        [(TRITON_INPUT, fp32, [3, spec.img_size, spec.img_size])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == \
        [(TRITON_OUTPUT, fp32, [EMBED_DIM, spec.embedding_size, spec.embedding_size])]


def test_init_container_fills_the_repository_triton_loads(gpu, config, encoder_env):
    """The init container copies config.pbtxt to <repo>/<name>/ and exports the encoder's model, version 1,
    to <repo>/<name>/1/model.onnx, where <repo> is Triton's --model-repository on a shared emptyDir."""
    workload = triton_workload(gpu)
    triton = workload.pod_spec["containers"][0]
    repo = arg_value([*triton.get("command", []), *triton["args"]], "--model-repository")
    (init,) = workload.pod_spec["initContainers"]
    assert mount_for(init, repo)["name"] == mount_for(triton, repo)["name"]
    script = " ".join(init["args"]).replace("\\\n", " ")
    lines = [shlex.split(line) for line in script.splitlines() if line.strip()]
    export = [cmd for cmd in lines if "export-onnx" in cmd]
    assert len(export) == 1
    argv = export[0]
    assert argv[:4] == ["exec", "python", "-m", "services.cli"] or argv[:2] == ["exec", "samforge"]
    assert arg_value(argv, "--part") == "encoder"
    assert arg_value(argv, "--model") == encoder_env["SAMFORGE_MODEL"]
    assert arg_value(argv, "--out") == f"{repo}/{config.name}/1/model.onnx"
    copy = [cmd for cmd in lines if cmd[0] == "cp"]
    assert len(copy) == 1 and copy[0][2] == f"{repo}/{config.name}/config.pbtxt"
    source = copy[0][1]
    volume = workload.volume(mount_for(init, source)["name"])
    assert volume["configMap"]["name"].startswith("samforge-triton-model-")
    assert source.rsplit("/", 1)[1] == "config.pbtxt"
    assert init["command"][:2] == ["sh", "-ec"], "a failed copy or export must fail the init container"


@pytest.mark.parametrize("bad", [
    pytest.param(("max_batch_size: 8", "max_batch_sizes: 8"), id="unknown-field"),
    pytest.param(("kind: KIND_GPU", "kind: KIND_GPUS"), id="unknown-enum-value"),
    pytest.param(("dims: [ 3, 256, 256 ]", "dims: [ 3, 256, 256.5 ]"), id="wrong-type"),
])
def test_the_parse_is_strict(rendered_config, bad):
    """Guards the checks above: a config tritonserver would refuse does not parse here either."""
    old, new = bad
    assert old in rendered_config
    with pytest.raises(text_format.ParseError):
        parse(rendered_config.replace(old, new))


SAM2_CONFIG = DEPLOY / "triton" / "model_repository" / "sam2_encoder" / "config.pbtxt"
SAM2_KEY = "sam2_encoder.config.pbtxt"


@pytest.fixture(scope="module")
def sam2_config(gpu) -> model_config_pb2.ModelConfig:
    (config_map,) = [m for m in of_kind(gpu, "ConfigMap") if m["metadata"]["name"].startswith("samforge-triton-model-")]
    text = config_map["data"][SAM2_KEY]
    assert text == SAM2_CONFIG.read_text()
    return parse(text)


def test_sam2_config_declares_every_level_of_the_exported_sam2_1_encoder(sam2_config, config):
    """The SAM 2.1 configuration's input and outputs are the encoder graph samforge exports for sam2.1_hiera_t (names
    from encoder_output_names, shapes from the family's feature_shapes), and it batches like the SAM 1 one."""
    from sam_core.export.onnx_encoder import encoder_output_names
    from sam_core.modeling.sam2 import from_config

    net = from_config("configs/sam2.1/sam2.1_hiera_t.yaml")
    spec = SPECS["sam2.1_hiera_t"]
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    assert sam2_config.name == "sam2_encoder" != config.name and sam2_config.backend == "onnxruntime"
    assert [(i.name, i.data_type, list(i.dims)) for i in sam2_config.input] == \
        [(TRITON_INPUT, fp32, [3, spec.img_size, spec.img_size])]
    shapes = net.feature_shapes()
    assert [(o.name, o.data_type, list(o.dims)) for o in sam2_config.output] == \
        [(name, fp32, list(shapes[level]))
         for name, level in zip(encoder_output_names(net), net.feature_names, strict=True)]
    assert len(sam2_config.output) == 3
    assert sam2_config.HasField("dynamic_batching")
    assert all(0 < size <= sam2_config.max_batch_size for size in sam2_config.dynamic_batching.preferred_batch_size)
    groups = sam2_config.instance_group
    assert groups and all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in groups)
    assert sam2_config.dynamic_batching.default_queue_policy == config.dynamic_batching.default_queue_policy
