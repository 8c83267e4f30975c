"""Settings: one frozen object per service, built from environment variables at start-up.

Every variable is declared once in :data:`ENV` with its default and meaning; ``deploy/README.md`` and the
Kubernetes ConfigMap are checked against this table by the tests. Nothing here runs at import time
except building the table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sam_core.errors import InvalidInput


@dataclass(frozen=True)
class Var:
    name: str
    default: str
    help: str
    services: tuple[str, ...] = ("encoder", "decoder", "trainer")


ENV: tuple[Var, ...] = (
    # --- every service
    Var("SAMFORGE_HOST", "127.0.0.1", "address the gRPC server binds (0.0.0.0 in containers)"),
    Var("SAMFORGE_TLS_CERT", "", "PEM certificate chain; with SAMFORGE_TLS_KEY enables TLS"),
    Var("SAMFORGE_TLS_KEY", "", "PEM private key for SAMFORGE_TLS_CERT"),
    Var("SAMFORGE_AUTH_TOKENS_FILE", "", "JSON file {token: tenant}; empty disables auth (tenant from requests)"),
    Var("SAMFORGE_GRACE_SECONDS", "10", "drain time on SIGTERM before in-flight calls are cancelled"),
    Var("SAMFORGE_MAX_MESSAGE_BYTES", "67108864", "max gRPC message size, both directions"),
    Var("SAMFORGE_WORKERS", "8", "gRPC worker threads"),
    Var("SAMFORGE_LOG_LEVEL", "INFO", "logging level (logs are JSON lines on stderr)"),
    Var("SAMFORGE_MODEL", "litemedsam", "base model: litemedsam | vit_b | vit_l | vit_h | tiny"),
    Var("SAMFORGE_CHECKPOINT", "", "weights file for vit_b/vit_l/vit_h (litemedsam is bundled)"),
    Var("SAMFORGE_DEVICE", "auto", "auto | cpu | cuda | cuda:N"),
    Var("SAMFORGE_THREADS", "0", "torch intra-op threads (0 = torch default)"),
    Var("SAMFORGE_REGISTRY_DIR", "./var/registry", "adapter registry root (shared volume in Kubernetes)"),
    Var("SAMFORGE_ADAPTER_CACHE", "4", "loaded adapters kept in memory (LRU, evicts before loading)",
        ("encoder", "decoder")),
    Var("SAMFORGE_MAX_IMAGE_BYTES", "33554432", "largest accepted encoded image", ("encoder", "decoder")),
    Var("SAMFORGE_MAX_PIXELS", "64000000", "largest accepted image (decompression-bomb guard)", ("encoder", "decoder")),
    # --- encoder
    Var("SAMFORGE_ENCODER_PORT", "50051", "encoder gRPC port", ("encoder", "decoder")),
    Var("SAMFORGE_ENCODER_METRICS_PORT", "9101", "encoder Prometheus /metrics port", ("encoder",)),
    Var("SAMFORGE_CACHE_BYTES", "1073741824", "embedding cache budget in bytes (GPU memory on CUDA)", ("encoder",)),
    Var("SAMFORGE_MAX_BATCH", "4", "dynamic batching: most images per encoder call", ("encoder",)),
    Var("SAMFORGE_MAX_WAIT_MS", "5", "dynamic batching: longest wait for a batch to fill", ("encoder",)),
    Var("SAMFORGE_QUEUE_SIZE", "32", "pending encodes before RESOURCE_EXHAUSTED", ("encoder",)),
    Var("SAMFORGE_REDIS_URL", "", "redis://host:port/db for the shared L2 embedding cache (empty = off)",
        ("encoder",)),
    Var("SAMFORGE_REDIS_TTL_SECONDS", "86400", "L2 entry lifetime", ("encoder",)),
    Var("SAMFORGE_BF16", "false", "bf16 autocast for the image encoder (torch backend only)", ("encoder",)),
    Var("SAMFORGE_ENCODER_BACKEND", "torch", "what runs the base image encoder: torch (in-process), onnx (in-process "
        "ONNX Runtime) or triton (Triton Inference Server; encoder-side adapters refused)", ("encoder",)),
    Var("SAMFORGE_ENCODER_CONCURRENCY", "0", "encoder batches in flight (0 = 1 for torch/onnx, 4 for triton)",
        ("encoder",)),
    Var("SAMFORGE_TRITON_URL", "127.0.0.1:8001", "Triton gRPC address (host:port) for the triton backend",
        ("encoder",)),
    Var("SAMFORGE_TRITON_MODEL", "sam_encoder", "Triton model serving the image encoder", ("encoder",)),
    Var("SAMFORGE_TRITON_MODEL_VERSION", "", "Triton model version (empty = the server's version policy)",
        ("encoder",)),
    Var("SAMFORGE_TRITON_TIMEOUT_SECONDS", "30", "deadline of one Triton call, retries included", ("encoder",)),
    Var("SAMFORGE_TRITON_RETRIES", "3", "retries (exponential backoff) when Triton answers UNAVAILABLE",
        ("encoder",)),
    # --- decoder
    Var("SAMFORGE_DECODER_PORT", "50052", "decoder gRPC port", ("decoder",)),
    Var("SAMFORGE_DECODER_METRICS_PORT", "9102", "decoder Prometheus /metrics port", ("decoder",)),
    Var("SAMFORGE_ENCODER_ADDRESS", "127.0.0.1:50051", "where the decoder reaches the encoder", ("decoder",)),
    Var("SAMFORGE_DECODER_RUNTIME", "torch", "torch (re-associated decoder, fastest here) or onnx (ONNX Runtime)",
        ("decoder",)),
    Var("SAMFORGE_DECODER_CACHE_BYTES", "268435456", "decoder's local LRU of fetched embeddings", ("decoder",)),
    Var("SAMFORGE_MAX_PROMPTS", "256", "prompts per Segment call", ("decoder",)),
    Var("SAMFORGE_ONNX_CACHE_DIR", "./var/onnx", "exported ONNX graphs (decoder runtime onnx, encoder backend onnx)",
        ("encoder", "decoder")),
    Var("SAMFORGE_ENCODER_TIMEOUT_SECONDS", "30", "deadline of the decoder's calls to the encoder", ("decoder",)),
    # --- trainer
    Var("SAMFORGE_TRAINER_PORT", "50053", "trainer + adapter registry gRPC port", ("trainer",)),
    Var("SAMFORGE_TRAINER_METRICS_PORT", "9103", "trainer Prometheus /metrics port", ("trainer",)),
    Var("SAMFORGE_DATA_DIR", "./var/data", "training data root; tenants see <root>/<tenant>/", ("trainer",)),
    Var("SAMFORGE_JOBS_DIR", "./var/jobs", "job folders (checkpoints, reports); a restart resumes them", ("trainer",)),
    Var("SAMFORGE_MAX_CONCURRENT_JOBS", "1", "training jobs run at once (others queue)", ("trainer",)),
    Var("SAMFORGE_MAX_UPLOAD_BYTES", "1073741824", "largest data set upload", ("trainer",)),
)

ENV_BY_NAME: dict[str, Var] = {v.name: v for v in ENV}


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name, ENV_BY_NAME[name].default)


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = _get(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"must be an integer, got {raw!r}", field=name) from None
    if value < minimum:
        raise InvalidInput(f"must be >= {minimum}, got {value}", field=name)
    return value


def _float(env: Mapping[str, str], name: str) -> float:
    raw = _get(env, name)
    try:
        return float(raw)
    except ValueError:
        raise InvalidInput(f"must be a number, got {raw!r}", field=name) from None


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = _get(env, name).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise InvalidInput(f"must be true or false, got {raw!r}", field=name)


@dataclass(frozen=True)
class CommonSettings:
    host: str
    port: int
    metrics_port: int
    tls_cert: str
    tls_key: str
    auth_tokens_file: str
    grace_seconds: float
    max_message_bytes: int
    workers: int
    log_level: str
    model: str
    checkpoint: str
    device: str
    threads: int
    registry_dir: str

    @staticmethod
    def common(env: Mapping[str, str], port_var: str, metrics_var: str) -> dict:
        if bool(_get(env, "SAMFORGE_TLS_CERT")) != bool(_get(env, "SAMFORGE_TLS_KEY")):
            raise InvalidInput("set both SAMFORGE_TLS_CERT and SAMFORGE_TLS_KEY, or neither", field="SAMFORGE_TLS_KEY")
        return dict(
            host=_get(env, "SAMFORGE_HOST"), port=_int(env, port_var), metrics_port=_int(env, metrics_var),
            tls_cert=_get(env, "SAMFORGE_TLS_CERT"), tls_key=_get(env, "SAMFORGE_TLS_KEY"),
            auth_tokens_file=_get(env, "SAMFORGE_AUTH_TOKENS_FILE"),
            grace_seconds=_float(env, "SAMFORGE_GRACE_SECONDS"),
            max_message_bytes=_int(env, "SAMFORGE_MAX_MESSAGE_BYTES", 1 << 20),
            workers=_int(env, "SAMFORGE_WORKERS", 1),
            log_level=_get(env, "SAMFORGE_LOG_LEVEL"), model=_get(env, "SAMFORGE_MODEL"),
            checkpoint=_get(env, "SAMFORGE_CHECKPOINT"), device=_get(env, "SAMFORGE_DEVICE"),
            threads=_int(env, "SAMFORGE_THREADS"), registry_dir=_get(env, "SAMFORGE_REGISTRY_DIR"),
        )


@dataclass(frozen=True)
class EncoderSettings(CommonSettings):
    cache_bytes: int = 0
    max_batch: int = 4
    max_wait_ms: float = 5.0
    queue_size: int = 32
    redis_url: str = ""
    redis_ttl_seconds: int = 86400
    bf16: bool = False
    adapter_cache: int = 4
    max_image_bytes: int = 0
    max_pixels: int = 0
    backend: str = "torch"
    concurrency: int = 0
    onnx_cache_dir: str = ""
    triton_url: str = ""
    triton_model: str = "sam_encoder"
    triton_model_version: str = ""
    triton_timeout_seconds: float = 30.0
    triton_retries: int = 3

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> EncoderSettings:
        env = os.environ if env is None else env
        backend = _get(env, "SAMFORGE_ENCODER_BACKEND")
        if backend not in ("torch", "onnx", "triton"):
            raise InvalidInput(f"must be torch, onnx or triton, got {backend!r}", field="SAMFORGE_ENCODER_BACKEND")
        if backend != "torch" and _bool(env, "SAMFORGE_BF16"):
            raise InvalidInput(f"bf16 autocast applies to the torch encoder backend only, not {backend}",
                               field="SAMFORGE_BF16")
        timeout = _float(env, "SAMFORGE_TRITON_TIMEOUT_SECONDS")
        if timeout <= 0:
            raise InvalidInput(f"must be > 0, got {timeout}", field="SAMFORGE_TRITON_TIMEOUT_SECONDS")
        return EncoderSettings(
            **CommonSettings.common(env, "SAMFORGE_ENCODER_PORT", "SAMFORGE_ENCODER_METRICS_PORT"),
            cache_bytes=_int(env, "SAMFORGE_CACHE_BYTES"), max_batch=_int(env, "SAMFORGE_MAX_BATCH", 1),
            max_wait_ms=_float(env, "SAMFORGE_MAX_WAIT_MS"), queue_size=_int(env, "SAMFORGE_QUEUE_SIZE", 1),
            redis_url=_get(env, "SAMFORGE_REDIS_URL"), redis_ttl_seconds=_int(env, "SAMFORGE_REDIS_TTL_SECONDS", 1),
            bf16=_bool(env, "SAMFORGE_BF16"), adapter_cache=_int(env, "SAMFORGE_ADAPTER_CACHE", 1),
            max_image_bytes=_int(env, "SAMFORGE_MAX_IMAGE_BYTES", 1), max_pixels=_int(env, "SAMFORGE_MAX_PIXELS", 1),
            backend=backend, concurrency=_int(env, "SAMFORGE_ENCODER_CONCURRENCY"),
            onnx_cache_dir=_get(env, "SAMFORGE_ONNX_CACHE_DIR"), triton_url=_get(env, "SAMFORGE_TRITON_URL"),
            triton_model=_get(env, "SAMFORGE_TRITON_MODEL"),
            triton_model_version=_get(env, "SAMFORGE_TRITON_MODEL_VERSION"), triton_timeout_seconds=timeout,
            triton_retries=_int(env, "SAMFORGE_TRITON_RETRIES"),
        )


@dataclass(frozen=True)
class DecoderSettings(CommonSettings):
    encoder_address: str = ""
    runtime: str = "torch"
    cache_bytes: int = 0
    max_prompts: int = 256
    onnx_cache_dir: str = ""
    encoder_timeout_seconds: float = 30.0
    adapter_cache: int = 4
    max_image_bytes: int = 0
    max_pixels: int = 0

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> DecoderSettings:
        env = os.environ if env is None else env
        runtime = _get(env, "SAMFORGE_DECODER_RUNTIME")
        if runtime not in ("onnx", "torch"):
            raise InvalidInput(f"must be onnx or torch, got {runtime!r}", field="SAMFORGE_DECODER_RUNTIME")
        return DecoderSettings(
            **CommonSettings.common(env, "SAMFORGE_DECODER_PORT", "SAMFORGE_DECODER_METRICS_PORT"),
            encoder_address=_get(env, "SAMFORGE_ENCODER_ADDRESS"), runtime=runtime,
            cache_bytes=_int(env, "SAMFORGE_DECODER_CACHE_BYTES"), max_prompts=_int(env, "SAMFORGE_MAX_PROMPTS", 1),
            onnx_cache_dir=_get(env, "SAMFORGE_ONNX_CACHE_DIR"),
            encoder_timeout_seconds=_float(env, "SAMFORGE_ENCODER_TIMEOUT_SECONDS"),
            adapter_cache=_int(env, "SAMFORGE_ADAPTER_CACHE", 1),
            max_image_bytes=_int(env, "SAMFORGE_MAX_IMAGE_BYTES", 1),
            max_pixels=_int(env, "SAMFORGE_MAX_PIXELS", 1),
        )


@dataclass(frozen=True)
class TrainerSettings(CommonSettings):
    data_dir: str = ""
    jobs_dir: str = ""
    max_concurrent_jobs: int = 1
    max_upload_bytes: int = 0

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> TrainerSettings:
        env = os.environ if env is None else env
        return TrainerSettings(
            **CommonSettings.common(env, "SAMFORGE_TRAINER_PORT", "SAMFORGE_TRAINER_METRICS_PORT"),
            data_dir=_get(env, "SAMFORGE_DATA_DIR"), jobs_dir=_get(env, "SAMFORGE_JOBS_DIR"),
            max_concurrent_jobs=_int(env, "SAMFORGE_MAX_CONCURRENT_JOBS", 1),
            max_upload_bytes=_int(env, "SAMFORGE_MAX_UPLOAD_BYTES", 1),
        )


def env_table_markdown() -> str:
    """The documented variable table (deploy/README.md embeds it; a test compares them)."""
    lines = ["| variable | default | services | meaning |", "|---|---|---|---|"]
    for var in ENV:
        lines.append(f"| `{var.name}` | `{var.default}` | {', '.join(var.services)} | {var.help} |")
    return "\n".join(lines) + "\n"
