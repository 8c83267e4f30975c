"""The reliability suite's stack and clients, shared by its tests, ``bench/fuzz.py`` and ``bench/fault_recovery.py``.

* :data:`LIMITS`: the settings the suite's stack runs with (small limits, so "over the limit" inputs are cheap);
* :func:`prepare` writes the tokens file (tenants ``acme`` and ``bravo``) and the data folders the cases use;
* :func:`stack_specs`: encoder + decoder + trainer on the tiny model, auth on, as specs for
  ``tests.integration.conftest.started``;
* :func:`own_objects`: what tenant acme owns that the cases refer to (an embedding key, adapters, a job, an upload);
* :class:`Clients`: one channel per service and the stubs; :func:`call` runs any RPC (unary, server stream, client
  stream) and returns its :class:`Outcome` (status code, details, reply) instead of raising.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sam_core.adapters.filesystem import FileSystemAdapterStore
from services._generated.sam.v1 import decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.conftest import noise_png, save_perturbed_adapter, tar_bytes, write_blob_dataset

MIB = 1 << 20
LIMITS: dict[str, str] = {
    "SAMFORGE_MODEL": "tiny",
    "SAMFORGE_MAX_MESSAGE_BYTES": str(8 * MIB),
    "SAMFORGE_MAX_IMAGE_BYTES": str(2 * MIB),
    "SAMFORGE_MAX_PIXELS": "4000000",
    "SAMFORGE_MAX_PROMPTS": "16",
    "SAMFORGE_MAX_UPLOAD_BYTES": str(1 * MIB),
    "SAMFORGE_CACHE_BYTES": str(64 * MIB),
    "SAMFORGE_DECODER_CACHE_BYTES": str(16 * MIB),
    "SAMFORGE_ENCODER_TIMEOUT_SECONDS": "20",
    "SAMFORGE_GRACE_SECONDS": "5",
    "SAMFORGE_THREADS": "1",
}
TOKENS = {"token-a": "acme", "token-b": "bravo"}
AS_A: tuple[tuple[str, str], ...] = (("authorization", "Bearer token-a"),)
AS_B: tuple[tuple[str, str], ...] = (("authorization", "Bearer token-b"),)
EMPTY_DATASET = "empty"  # a data folder of tenant acme with no images: a job on it fails at once
SERVICES = ("encoder", "decoder", "trainer")


def prepare(root: Path) -> dict[str, str]:
    """Folders, tokens file and data of the suite's stack under ``root``; returns the shared environment."""
    for sub in ("registry", "data", "jobs", "onnx"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "data" / "acme" / EMPTY_DATASET).mkdir(parents=True, exist_ok=True)
    (root / "data" / "bravo").mkdir(parents=True, exist_ok=True)
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    return {**LIMITS, "SAMFORGE_REGISTRY_DIR": str(root / "registry"), "SAMFORGE_DATA_DIR": str(root / "data"),
            "SAMFORGE_JOBS_DIR": str(root / "jobs"), "SAMFORGE_ONNX_CACHE_DIR": str(root / "onnx"),
            "SAMFORGE_AUTH_TOKENS_FILE": str(tokens)}


def stack_specs(root: Path, env: Mapping[str, str], encoder_port: int,
                ) -> dict[str, tuple[str, dict[str, str], Path, int | None]]:
    """Specs for ``tests.integration.conftest.started``: the encoder on ``encoder_port``, the decoder pointed at it."""
    decoder_env = {**env, "SAMFORGE_ENCODER_ADDRESS": f"127.0.0.1:{encoder_port}"}
    return {"encoder": ("encoder", dict(env), root, encoder_port), "decoder": ("decoder", decoder_env, root, None),
            "trainer": ("trainer", dict(env), root, None)}


@dataclass
class Clients:
    """Stubs of the three services (the trainer's address also serves the adapter registry)."""

    addresses: Mapping[str, str]
    channels: list[grpc.Channel] = field(default_factory=list)

    def __post_init__(self) -> None:
        options = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]
        self.channels = [grpc.insecure_channel(self.addresses[name], options=options) for name in SERVICES]
        encoder, decoder, trainer = self.channels
        self.encoder = encoder_pb2_grpc.EncoderServiceStub(encoder)
        self.decoder = decoder_pb2_grpc.DecoderServiceStub(decoder)
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(trainer)
        self.registry = trainer_pb2_grpc.AdapterRegistryStub(trainer)

    def method(self, rpc: str) -> Callable[..., Any]:
        """The stub method of ``rpc`` ("Embed", "Segment", "CreateJob", "GetAdapter", ...)."""
        for stub in (self.encoder, self.decoder, self.trainer, self.registry):
            if hasattr(stub, rpc):
                return getattr(stub, rpc)  # type: ignore[no-any-return]
        raise KeyError(rpc)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    reply: Any = None  # the reply (a list of messages for a server stream) when the call succeeded


def call(method: Callable[..., Any], request: Any, *, metadata: Iterable[tuple[str, str]] = AS_A,
         timeout: float = 60.0, wait_for_ready: bool = False) -> Outcome:
    """Run one RPC to its end; a client stream is given as a list of messages, a server stream is read fully.
    ``wait_for_ready``: wait (up to ``timeout``) for a channel that is reconnecting instead of failing UNAVAILABLE."""
    if isinstance(request, list):
        request = iter(request)
    try:
        reply = method(request, metadata=tuple(metadata), timeout=timeout, wait_for_ready=wait_for_ready)
        if hasattr(reply, "__next__"):
            reply = list(reply)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    return Outcome(grpc.StatusCode.OK, "", reply)


def health(address: str, timeout: float = 5.0) -> int:
    """grpc.health.v1 status of the whole server at ``address`` (public: no token)."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return int(reply.status)


SERVING = int(health_pb2.HealthCheckResponse.SERVING)


def upload_chunks(payload: bytes, *, tenant: str = "", filename: str = "data.tar.gz",
                  size: int = 64 << 10) -> list[trainer_pb2.DatasetChunk]:
    chunks = [trainer_pb2.DatasetChunk(tenant=tenant, filename=filename, data=payload[:size])]
    chunks += [trainer_pb2.DatasetChunk(data=payload[start:start + size]) for start in range(size, len(payload), size)]
    return chunks


@dataclass(frozen=True)
class Owned:
    """What tenant acme owns: an embedding key, adapter ``ships`` (v1, v2, ``ships@prod`` -> 2), ``broken`` (v1
    whose weights changed on disk after publishing), a job (on the empty data set: it fails) and an upload."""

    key: str
    job_id: str
    upload_id: str


def own_objects(root: Path, clients: Clients, model: Any, workdir: Path) -> Owned:
    """Create tenant acme's objects in the stack prepared under ``root`` (``model``: the stack's tiny model)."""
    store = FileSystemAdapterStore(root / "registry")
    for version in (1, 2):
        store.publish("acme", "ships", save_perturbed_adapter(model, "decoder", workdir / f"v{version}",
                                                              seed=version, name="ships"))
    store.promote("acme", "ships", "prod", 2)
    broken = store.publish("acme", "broken", save_perturbed_adapter(model, "decoder", workdir / "broken",
                                                                    seed=3, name="broken"))
    weights = broken.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    key = clients.encoder.Embed(encoder_pb2.EmbedRequest(image=noise_png(1)), metadata=AS_A, timeout=60).embedding.key
    job = clients.trainer.CreateJob(trainer_pb2.CreateJobRequest(dataset=EMPTY_DATASET, method="decoder",
                                                                 adapter_name="never"), metadata=AS_A, timeout=30)
    blobs = write_blob_dataset(workdir / "blobs", n_images=2, height=64, width=64)
    payload = tar_bytes({p.relative_to(blobs).as_posix(): p.read_bytes() for p in sorted(blobs.rglob("*.png"))})
    upload = clients.trainer.UploadDataset(iter(upload_chunks(payload)), metadata=AS_A, timeout=60)
    return Owned(key=key, job_id=job.id, upload_id=upload.id)
