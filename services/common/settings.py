"""Settings: one frozen object per service, built from environment variables at start-up.

Every variable is declared once in :data:`ENV`: its name, default, meaning, the services that read it and how
its text is parsed and checked. The table is the only source of defaults: a settings field names its variable
(:func:`setting`) and has no default of its own, so ``EncoderSettings.from_env({})`` is the table's defaults,
parsed. ``deploy/README.md`` and the Kubernetes ConfigMap are checked against this table by the tests. A bad
value raises :class:`~sam_core.errors.InvalidInput` whose ``field`` is the variable's name. Nothing here runs
at import time except building the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self

from sam_core.adapters.store import parse_s3_url
from sam_core.errors import InvalidInput
from services.common.memory import DECODE_BYTES_PER_PIXEL

SERVICES = ("encoder", "decoder", "trainer")
_FIELD_VARIABLE = "samforge_variable"  # dataclass field metadata key: the variable a field is read from


class Parser(Protocol):
    """Turns a variable's text into its value; raises InvalidInput with ``field=name`` when it is unusable."""

    def __call__(self, raw: str, name: str) -> Any: ...


@dataclass(frozen=True)
class Text:
    """The text as is (``required``: must not be empty)."""

    required: bool = False

    def __call__(self, raw: str, name: str) -> str:
        if self.required and not raw.strip():
            raise InvalidInput("must not be empty", field=name)
        return raw


@dataclass(frozen=True)
class Integer:
    minimum: int = 0

    def __call__(self, raw: str, name: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise InvalidInput(f"must be an integer, got {raw!r}", field=name) from None
        if value < self.minimum:
            raise InvalidInput(f"must be >= {self.minimum}, got {value}", field=name)
        return value


@dataclass(frozen=True)
class Number:
    """A finite float (``above``: strictly greater than this)."""

    above: float | None = None

    def __call__(self, raw: str, name: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise InvalidInput(f"must be a number, got {raw!r}", field=name) from None
        if not math.isfinite(value):
            raise InvalidInput(f"must be a finite number, got {raw!r}", field=name)
        if self.above is not None and value <= self.above:
            raise InvalidInput(f"must be > {self.above:g}, got {value:g}", field=name)
        return value


@dataclass(frozen=True)
class Flag:
    def __call__(self, raw: str, name: str) -> bool:
        text = raw.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise InvalidInput(f"must be true or false, got {raw!r}", field=name)


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (``ignore_case``: matched case-insensitively, returned as listed)."""

    options: tuple[str, ...]
    ignore_case: bool = False

    def __call__(self, raw: str, name: str) -> str:
        for option in self.options:
            if raw == option or (self.ignore_case and raw.lower() == option.lower()):
                return option
        listed = ", ".join(self.options[:-1]) + " or " + self.options[-1]
        raise InvalidInput(f"must be {listed}, got {raw!r}", field=name)


@dataclass(frozen=True)
class RegistryUrl:
    """Empty (the file-system registry) or an ``s3://bucket[/prefix]`` URL."""

    def __call__(self, raw: str, name: str) -> str:
        if raw:
            parse_s3_url(raw, name)
        return raw


@dataclass(frozen=True)
class Json:
    """A JSON document of type ``kind`` (dict: an object, list: an array); lists hold objects only."""

    kind: type

    def __call__(self, raw: str, name: str) -> Any:
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise InvalidInput(f"must be JSON: {exc}", field=name) from None
        if not isinstance(value, self.kind):
            raise InvalidInput(f"must be a JSON {'object' if self.kind is dict else 'array'}, got {raw!r}", field=name)
        if isinstance(value, list) and not all(isinstance(item, dict) for item in value):
            raise InvalidInput(f"must be a JSON array of objects, got {raw!r}", field=name)
        return value


_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?", re.ASCII)


@dataclass(frozen=True)
class Quantity:
    """A positive Kubernetes resource quantity (``500m``, ``4``, ``16Gi``)."""

    def __call__(self, raw: str, name: str) -> str:
        if not _QUANTITY.fullmatch(raw) or float(re.sub(r"[a-zA-Z]+$", "", raw)) <= 0:
            raise InvalidInput(f"must be a positive Kubernetes quantity such as 500m, 4 or 16Gi, got {raw!r}",
                               field=name)
        return raw


LOG_LEVELS = Choice(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), ignore_case=True)


@dataclass(frozen=True)
class Var:
    """One environment variable: ``default`` is text, parsed by ``parse`` like a value from the environment."""

    name: str
    default: str
    help: str
    services: tuple[str, ...] = SERVICES
    parse: Parser = Text()

    def read(self, env: Mapping[str, str]) -> Any:
        return self.parse(env.get(self.name, self.default), self.name)


_SIZES = ("t", "s", "b+", "l")
CHECKPOINT_MODELS = ("vit_b", "vit_l", "vit_h", *(f"{generation}_hiera_{size}" for generation in ("sam2.1", "sam2")
                                                   for size in _SIZES))
"""sam_core's registry ids that have no bundled or random weights (a test checks this against the registry,
which settings do not import: it loads torch)."""
MODELS = ("litemedsam", "tiny", "tiny_sam2", *CHECKPOINT_MODELS)


def needs_checkpoint(model: str) -> bool:
    """Whether ``model`` can only start from a SAMFORGE_CHECKPOINT file."""
    return model in CHECKPOINT_MODELS


ENV: tuple[Var, ...] = (
    # --- every service
    Var("SAMFORGE_HOST", "127.0.0.1", "address the gRPC server binds (0.0.0.0 in containers)"),
    Var("SAMFORGE_TLS_CERT", "", "PEM certificate chain; with SAMFORGE_TLS_KEY enables TLS"),
    Var("SAMFORGE_TLS_KEY", "", "PEM private key for SAMFORGE_TLS_CERT"),
    Var("SAMFORGE_AUTH_TOKENS_FILE", "", "JSON file {token: tenant}; empty disables auth (tenant from requests)"),
    Var("SAMFORGE_GRACE_SECONDS", "10", "drain time on SIGTERM before in-flight calls are cancelled", parse=Number()),
    Var("SAMFORGE_MAX_MESSAGE_BYTES", "67108864", "max gRPC message size, both directions", parse=Integer(1 << 20)),
    Var("SAMFORGE_WORKERS", "8", "gRPC worker threads", parse=Integer(1)),
    Var("SAMFORGE_LOG_LEVEL", "INFO", "logging level (logs are JSON lines on stderr)", parse=LOG_LEVELS),
    Var("SAMFORGE_MODEL", "litemedsam", "base model: litemedsam, vit_b, vit_l, vit_h, sam2.1_hiera_t, "
        "sam2.1_hiera_s, sam2.1_hiera_b+, sam2.1_hiera_l, sam2_hiera_t/s/b+/l, tiny or tiny_sam2",
        parse=Choice(MODELS)),
    Var("SAMFORGE_CHECKPOINT", "", "weights file; required for vit_* and sam2*_hiera_* (official .pth / .pt, "
        "mounted read-only), optional for litemedsam (bundled) and tiny / tiny_sam2 (random)"),
    Var("SAMFORGE_DEVICE", "auto", "auto | cpu | cuda | cuda:N"),
    Var("SAMFORGE_THREADS", "0", "torch intra-op threads (0 = torch default)", parse=Integer()),
    Var("SAMFORGE_REGISTRY_DIR", "./var/registry", "adapter registry root (shared volume in Kubernetes)"),
    Var("SAMFORGE_REGISTRY_URL", "", "empty: the registry is SAMFORGE_REGISTRY_DIR; s3://bucket/prefix: an "
        "S3-compatible store, SAMFORGE_REGISTRY_DIR is then its writable download cache", parse=RegistryUrl()),
    Var("SAMFORGE_S3_ENDPOINT_URL", "", "S3 API endpoint for a non-AWS server (MinIO, Ceph); empty: AWS. "
        "Credentials: the standard AWS_* variables"),
    Var("SAMFORGE_ADAPTER_CACHE", "4", "loaded adapters kept in memory (LRU, evicts before loading)",
        ("encoder", "decoder"), parse=Integer(1)),
    Var("SAMFORGE_MAX_IMAGE_BYTES", "33554432", "largest accepted encoded image", ("encoder", "decoder"),
        parse=Integer(1)),
    Var("SAMFORGE_MAX_PIXELS", "64000000", "largest accepted image (decompression-bomb guard)", ("encoder", "decoder"),
        parse=Integer(1)),
    # --- encoder
    Var("SAMFORGE_ENCODER_PORT", "50051", "encoder gRPC port", ("encoder", "decoder"), parse=Integer()),
    Var("SAMFORGE_ENCODER_METRICS_PORT", "9101", "encoder Prometheus /metrics port", ("encoder",), parse=Integer()),
    Var("SAMFORGE_CACHE_BYTES", "1073741824", "embedding cache budget in bytes (GPU memory on CUDA)", ("encoder",),
        parse=Integer()),
    Var("SAMFORGE_MAX_BATCH", "4", "dynamic batching: most images per encoder call", ("encoder",), parse=Integer(1)),
    Var("SAMFORGE_MAX_WAIT_MS", "5", "dynamic batching: longest wait for a batch to fill", ("encoder",),
        parse=Number()),
    Var("SAMFORGE_QUEUE_SIZE", "32", "pending encodes before RESOURCE_EXHAUSTED", ("encoder",), parse=Integer(1)),
    Var("SAMFORGE_QUEUE_BYTES", "268435456", "bytes of images the encoder holds queued or encoding (resized to the "
        "model's input; tiled: full size) before RESOURCE_EXHAUSTED", ("encoder",), parse=Integer(1)),
    Var("SAMFORGE_DECODE_BYTES", "640000000", "bytes of images being decoded at once (10 a pixel, from the image "
        "header; >= 10 x SAMFORGE_MAX_PIXELS); a request waits for room until its deadline, then "
        "RESOURCE_EXHAUSTED", ("encoder",), parse=Integer(1)),
    Var("SAMFORGE_REDIS_URL", "", "redis://host:port/db for the shared L2 embedding cache (empty = off)",
        ("encoder",)),
    Var("SAMFORGE_REDIS_TTL_SECONDS", "86400", "L2 entry lifetime", ("encoder",), parse=Integer(1)),
    Var("SAMFORGE_BF16", "false", "bf16 autocast for the image encoder (torch backend only)", ("encoder",),
        parse=Flag()),
    Var("SAMFORGE_ENCODER_BACKEND", "torch", "what runs the base image encoder: torch (in-process), onnx (in-process "
        "ONNX Runtime) or triton (Triton Inference Server; encoder-side adapters refused)", ("encoder",),
        parse=Choice(("torch", "onnx", "triton"))),
    Var("SAMFORGE_ENCODER_CONCURRENCY", "0", "encoder batches in flight (0 = 1 for torch/onnx, 4 for triton)",
        ("encoder",), parse=Integer()),
    Var("SAMFORGE_TRITON_URL", "127.0.0.1:8001", "Triton gRPC address (host:port) for the triton backend",
        ("encoder",)),
    Var("SAMFORGE_TRITON_MODEL", "sam_encoder", "Triton model serving the image encoder", ("encoder",)),
    Var("SAMFORGE_TRITON_MODEL_VERSION", "", "Triton model version (empty = the server's version policy)",
        ("encoder",)),
    Var("SAMFORGE_TRITON_TIMEOUT_SECONDS", "30", "deadline of one Triton call, retries included", ("encoder",),
        parse=Number(above=0.0)),
    Var("SAMFORGE_TRITON_RETRIES", "3", "retries (exponential backoff) when Triton answers UNAVAILABLE",
        ("encoder",), parse=Integer()),
    # --- decoder
    Var("SAMFORGE_DECODER_PORT", "50052", "decoder gRPC port", ("decoder",), parse=Integer()),
    Var("SAMFORGE_DECODER_METRICS_PORT", "9102", "decoder Prometheus /metrics port", ("decoder",), parse=Integer()),
    Var("SAMFORGE_ENCODER_ADDRESS", "127.0.0.1:50051", "where the decoder reaches the encoder", ("decoder",)),
    Var("SAMFORGE_DECODER_RUNTIME", "torch", "torch (re-associated decoder, fastest here) or onnx (ONNX Runtime)",
        ("decoder",), parse=Choice(("torch", "onnx"))),
    Var("SAMFORGE_DECODER_CACHE_BYTES", "268435456", "decoder's local LRU of fetched embeddings", ("decoder",),
        parse=Integer()),
    Var("SAMFORGE_MAX_PROMPTS", "256", "prompts per Segment call", ("decoder",), parse=Integer(1)),
    Var("SAMFORGE_ONNX_CACHE_DIR", "./var/onnx", "exported ONNX graphs (decoder runtime onnx, encoder backend onnx)",
        ("encoder", "decoder"), parse=Text(required=True)),
    Var("SAMFORGE_ENCODER_TIMEOUT_SECONDS", "30", "deadline of the decoder's calls to the encoder", ("decoder",),
        parse=Number()),
    # --- trainer
    Var("SAMFORGE_TRAINER_PORT", "50053", "trainer + adapter registry gRPC port", ("trainer",), parse=Integer()),
    Var("SAMFORGE_TRAINER_METRICS_PORT", "9103", "trainer Prometheus /metrics port", ("trainer",), parse=Integer()),
    Var("SAMFORGE_DATA_DIR", "./var/data", "training data root; tenants see <root>/<tenant>/", ("trainer",)),
    Var("SAMFORGE_JOBS_DIR", "./var/jobs", "job folders (checkpoints, reports); a restart resumes them", ("trainer",)),
    Var("SAMFORGE_MAX_CONCURRENT_JOBS", "1", "training jobs run at once (others queue)", ("trainer",),
        parse=Integer(1)),
    Var("SAMFORGE_MAX_UPLOAD_BYTES", "1073741824", "largest data set upload", ("trainer",), parse=Integer(1)),
    Var("SAMFORGE_TRAINER_EXECUTOR", "process", "where a training job runs: process (its own worker process, "
        "`samforge train`, under torchrun when it asks for several processes) or inline (a thread of the trainer; "
        "mechanics tests only) or kubernetes (a batch/v1 Indexed Job per job; deploy/components/kubernetes-executor)",
        ("trainer",), parse=Choice(("process", "inline", "kubernetes"))),
    Var("SAMFORGE_MAX_RESUMES", "3", "times a job whose worker died (killed, crashed) is resumed from its "
        "checkpoints before it is FAILED", ("trainer",), parse=Integer()),
    Var("SAMFORGE_DETACH_WORKERS", "true", "process executor: on SIGTERM the trainer leaves job workers running and "
        "re-attaches at its next start; false: it stops them (they checkpoint; jobs resume at the next start). "
        "`samforge up` sets false", ("trainer",), parse=Flag()),
    Var("SAMFORGE_MAX_NODES", "1", "largest CreateJob resources.nodes (the process executor runs one node; raise it "
        "for the kubernetes executor)", ("trainer",), parse=Integer(1)),
    Var("SAMFORGE_MAX_PROCESSES_PER_NODE", "4", "largest CreateJob resources.processes_per_node (torchrun ranks "
        "per node)", ("trainer",), parse=Integer(1)),
    Var("SAMFORGE_MAX_GPUS_PER_PROCESS", "1", "largest CreateJob resources.gpus_per_process", ("trainer",),
        parse=Integer()),
    Var("SAMFORGE_METRICS_JOB_LABELS", "false", "per-job gauges (step, loss, val Dice) labelled job=<id> on the "
        "trainer's /metrics; exposes every tenant's job ids and progress to whoever reads /metrics", ("trainer",),
        parse=Flag()),
    Var("SAMFORGE_MAX_EXTRACTED_BYTES", "2147483648", "largest extracted size of an upload, counted while "
        "extracting (decompression-bomb guard; >= SAMFORGE_MAX_UPLOAD_BYTES)", ("trainer",), parse=Integer(1)),
    Var("SAMFORGE_MAX_EXTRACT_RATIO", "100", "largest extracted / compressed size of an upload and of each zip "
        "entry, past 1 MiB extracted (decompression-bomb guard)", ("trainer",), parse=Number(above=1.0)),
    # --- trainer, kubernetes executor: the Indexed Job + headless Service of services/trainer/k8s_job.py
    Var("SAMFORGE_K8S_NAMESPACE", "samforge", "namespace of the training Jobs", ("trainer",),
        parse=Text(required=True)),
    Var("SAMFORGE_K8S_IMAGE", "", "image of the training pods (required by the kubernetes executor); the "
        "overlays set it to the trainer's own pinned image", ("trainer",)),
    Var("SAMFORGE_K8S_SERVICE_ACCOUNT", "samforge-training", "service account of the training pods (no API "
        "rights; no token mounted)", ("trainer",), parse=Text(required=True)),
    Var("SAMFORGE_K8S_NODE_SELECTOR", "{}", "node selector of the training pods, a JSON object", ("trainer",),
        parse=Json(dict)),
    Var("SAMFORGE_K8S_TOLERATIONS", "[]", "tolerations of the training pods, a JSON array of objects",
        ("trainer",), parse=Json(list)),
    Var("SAMFORGE_K8S_JOBS_PVC", "samforge-jobs", "claim the training pods mount at SAMFORGE_JOBS_DIR "
        "(checkpoints, events, result.json)", ("trainer",), parse=Text(required=True)),
    Var("SAMFORGE_K8S_DATA_PVC", "samforge-data", "claim the training pods mount read-only at SAMFORGE_DATA_DIR",
        ("trainer",), parse=Text(required=True)),
    Var("SAMFORGE_K8S_MODELS_PVC", "", "claim the training pods mount read-only at the folder of "
        "SAMFORGE_CHECKPOINT (required with a checkpoint; deploy/components/model-checkpoint sets it)", ("trainer",)),
    Var("SAMFORGE_K8S_CPU_PER_PROCESS", "4", "CPU request = limit of a training pod, per torchrun process",
        ("trainer",), parse=Quantity()),
    Var("SAMFORGE_K8S_MEMORY_PER_PROCESS", "16Gi", "memory request = limit of a training pod, per torchrun "
        "process", ("trainer",), parse=Quantity()),
)

ENV_BY_NAME: dict[str, Var] = {v.name: v for v in ENV}


def setting(variable: str) -> Any:
    """A settings field read from ``variable`` (a name in :data:`ENV`; ``{SERVICE}`` is the class's service).

    The field has no default: the table's default applies when the variable is not set.
    """
    return dataclasses.field(metadata={_FIELD_VARIABLE: variable})


@dataclass(frozen=True)
class CommonSettings:
    """What every service reads; ``SERVICE`` names the service a subclass configures (its ports)."""

    SERVICE: ClassVar[str] = ""

    host: str = setting("SAMFORGE_HOST")
    port: int = setting("SAMFORGE_{SERVICE}_PORT")
    metrics_port: int = setting("SAMFORGE_{SERVICE}_METRICS_PORT")
    tls_cert: str = setting("SAMFORGE_TLS_CERT")
    tls_key: str = setting("SAMFORGE_TLS_KEY")
    auth_tokens_file: str = setting("SAMFORGE_AUTH_TOKENS_FILE")
    grace_seconds: float = setting("SAMFORGE_GRACE_SECONDS")
    max_message_bytes: int = setting("SAMFORGE_MAX_MESSAGE_BYTES")
    workers: int = setting("SAMFORGE_WORKERS")
    log_level: str = setting("SAMFORGE_LOG_LEVEL")
    model: str = setting("SAMFORGE_MODEL")
    checkpoint: str = setting("SAMFORGE_CHECKPOINT")
    device: str = setting("SAMFORGE_DEVICE")
    threads: int = setting("SAMFORGE_THREADS")
    registry_dir: str = setting("SAMFORGE_REGISTRY_DIR")
    registry_url: str = setting("SAMFORGE_REGISTRY_URL")
    s3_endpoint_url: str = setting("SAMFORGE_S3_ENDPOINT_URL")

    @classmethod
    def variables(cls) -> dict[str, str]:
        """{field name: the variable it is read from} for this service."""
        return {f.name: f.metadata[_FIELD_VARIABLE].format(SERVICE=cls.SERVICE.upper())
                for f in dataclasses.fields(cls)}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """Parse every field's variable from ``env`` (default: ``os.environ``), then the cross-field checks."""
        env = os.environ if env is None else env
        settings = cls(**{name: ENV_BY_NAME[variable].read(env) for name, variable in cls.variables().items()})
        settings.check()
        return settings

    def check(self) -> None:
        """Rules between variables (a subclass extends it); InvalidInput names the variable to change."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInput("set both SAMFORGE_TLS_CERT and SAMFORGE_TLS_KEY, or neither", field="SAMFORGE_TLS_KEY")
        if needs_checkpoint(self.model) and not self.checkpoint:
            raise InvalidInput(f"SAMFORGE_MODEL={self.model} has no bundled weights: set SAMFORGE_CHECKPOINT to the "
                               "path of its official checkpoint file", field="SAMFORGE_CHECKPOINT")


@dataclass(frozen=True)
class EncoderSettings(CommonSettings):
    SERVICE: ClassVar[str] = "encoder"

    cache_bytes: int = setting("SAMFORGE_CACHE_BYTES")
    max_batch: int = setting("SAMFORGE_MAX_BATCH")
    max_wait_ms: float = setting("SAMFORGE_MAX_WAIT_MS")
    queue_size: int = setting("SAMFORGE_QUEUE_SIZE")
    queue_bytes: int = setting("SAMFORGE_QUEUE_BYTES")
    decode_bytes: int = setting("SAMFORGE_DECODE_BYTES")
    redis_url: str = setting("SAMFORGE_REDIS_URL")
    redis_ttl_seconds: int = setting("SAMFORGE_REDIS_TTL_SECONDS")
    bf16: bool = setting("SAMFORGE_BF16")
    adapter_cache: int = setting("SAMFORGE_ADAPTER_CACHE")
    max_image_bytes: int = setting("SAMFORGE_MAX_IMAGE_BYTES")
    max_pixels: int = setting("SAMFORGE_MAX_PIXELS")
    backend: str = setting("SAMFORGE_ENCODER_BACKEND")
    concurrency: int = setting("SAMFORGE_ENCODER_CONCURRENCY")
    onnx_cache_dir: str = setting("SAMFORGE_ONNX_CACHE_DIR")
    triton_url: str = setting("SAMFORGE_TRITON_URL")
    triton_model: str = setting("SAMFORGE_TRITON_MODEL")
    triton_model_version: str = setting("SAMFORGE_TRITON_MODEL_VERSION")
    triton_timeout_seconds: float = setting("SAMFORGE_TRITON_TIMEOUT_SECONDS")
    triton_retries: int = setting("SAMFORGE_TRITON_RETRIES")

    def check(self) -> None:
        super().check()
        if self.bf16 and self.backend != "torch":
            raise InvalidInput(f"bf16 autocast applies to the torch encoder backend only, not {self.backend}",
                               field="SAMFORGE_BF16")
        one_image = DECODE_BYTES_PER_PIXEL * self.max_pixels
        if self.decode_bytes < one_image:
            raise InvalidInput(f"must hold the decoding of one image of SAMFORGE_MAX_PIXELS={self.max_pixels} "
                               f"({DECODE_BYTES_PER_PIXEL} bytes a pixel: >= {one_image}), got {self.decode_bytes}",
                               field="SAMFORGE_DECODE_BYTES")

    @property
    def batches_in_flight(self) -> int:
        """``SAMFORGE_ENCODER_CONCURRENCY``, or its default: 4 for the triton backend, 1 for in-process ones."""
        return self.concurrency or (4 if self.backend == "triton" else 1)


@dataclass(frozen=True)
class DecoderSettings(CommonSettings):
    SERVICE: ClassVar[str] = "decoder"

    encoder_address: str = setting("SAMFORGE_ENCODER_ADDRESS")
    runtime: str = setting("SAMFORGE_DECODER_RUNTIME")
    cache_bytes: int = setting("SAMFORGE_DECODER_CACHE_BYTES")
    max_prompts: int = setting("SAMFORGE_MAX_PROMPTS")
    onnx_cache_dir: str = setting("SAMFORGE_ONNX_CACHE_DIR")
    encoder_timeout_seconds: float = setting("SAMFORGE_ENCODER_TIMEOUT_SECONDS")
    adapter_cache: int = setting("SAMFORGE_ADAPTER_CACHE")
    max_image_bytes: int = setting("SAMFORGE_MAX_IMAGE_BYTES")
    max_pixels: int = setting("SAMFORGE_MAX_PIXELS")


@dataclass(frozen=True)
class TrainerSettings(CommonSettings):
    SERVICE: ClassVar[str] = "trainer"

    data_dir: str = setting("SAMFORGE_DATA_DIR")
    jobs_dir: str = setting("SAMFORGE_JOBS_DIR")
    max_concurrent_jobs: int = setting("SAMFORGE_MAX_CONCURRENT_JOBS")
    max_upload_bytes: int = setting("SAMFORGE_MAX_UPLOAD_BYTES")
    max_extracted_bytes: int = setting("SAMFORGE_MAX_EXTRACTED_BYTES")
    max_extract_ratio: float = setting("SAMFORGE_MAX_EXTRACT_RATIO")
    metrics_job_labels: bool = setting("SAMFORGE_METRICS_JOB_LABELS")
    k8s_namespace: str = setting("SAMFORGE_K8S_NAMESPACE")
    k8s_image: str = setting("SAMFORGE_K8S_IMAGE")
    k8s_service_account: str = setting("SAMFORGE_K8S_SERVICE_ACCOUNT")
    k8s_node_selector: dict[str, str] = setting("SAMFORGE_K8S_NODE_SELECTOR")
    k8s_tolerations: list[dict[str, Any]] = setting("SAMFORGE_K8S_TOLERATIONS")
    k8s_jobs_pvc: str = setting("SAMFORGE_K8S_JOBS_PVC")
    k8s_data_pvc: str = setting("SAMFORGE_K8S_DATA_PVC")
    k8s_models_pvc: str = setting("SAMFORGE_K8S_MODELS_PVC")
    k8s_cpu_per_process: str = setting("SAMFORGE_K8S_CPU_PER_PROCESS")
    k8s_memory_per_process: str = setting("SAMFORGE_K8S_MEMORY_PER_PROCESS")
    executor: str = setting("SAMFORGE_TRAINER_EXECUTOR")
    max_resumes: int = setting("SAMFORGE_MAX_RESUMES")
    detach_workers: bool = setting("SAMFORGE_DETACH_WORKERS")
    max_nodes: int = setting("SAMFORGE_MAX_NODES")
    max_processes_per_node: int = setting("SAMFORGE_MAX_PROCESSES_PER_NODE")
    max_gpus_per_process: int = setting("SAMFORGE_MAX_GPUS_PER_PROCESS")

    def check(self) -> None:
        super().check()
        if self.max_extracted_bytes < self.max_upload_bytes:
            raise InvalidInput(f"must be >= SAMFORGE_MAX_UPLOAD_BYTES ({self.max_upload_bytes}): an uncompressed "
                               "archive extracts to its own size", field="SAMFORGE_MAX_EXTRACTED_BYTES")


def env_table_markdown() -> str:
    """The documented variable table (deploy/README.md embeds it; a test compares them)."""
    lines = ["| variable | default | services | meaning |", "|---|---|---|---|"]
    for var in ENV:
        lines.append(f"| `{var.name}` | `{var.default}` | {', '.join(var.services)} | {var.help} |")
    return "\n".join(lines) + "\n"
