"""Shared fixtures. Nothing here reads the workplace data folder: a fresh clone must pass."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from collections.abc import Iterable, Mapping

# The processes the tests start (services, training workers, CLIs) run torch next to this one and each other on
# two cores. OpenMP's default busy-waiting lets one process's idle worker threads spin on cores another process
# needs; passive waiting yields them. Alone, passive waiting costs (a woken thread starts later), so a serial
# pytest process, which computes alone most of the time, keeps the default: the variable is set after torch
# loaded (OpenMP reads it once, then). Under pytest-xdist (`make test` runs two workers) no worker computes
# alone, so workers wait passively too. bench/results/omp_wait_policy.md measures both cases.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402,F401

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import services.common.net  # noqa: E402

# Ports for the servers the tests start. services.common.net.free_port asks the kernel for a free port (bind to 0),
# closes it, and the server binds it seconds later. Under pytest-xdist the other worker's servers, clients and
# their kernel-chosen ports live in the same range meanwhile, and one CI run lost that race ("Address already in
# use"). Here each worker draws from its own band just below the kernel's ephemeral range (read from /proc), where
# no kernel-chosen port and no other worker's port can land, and never hands out a port twice.
PORT_BAND_SIZE = 2000
_free_port_from_kernel = services.common.net.free_port
_issued_ports: set[int] = set()


def _worker_free_port(host: str = "127.0.0.1") -> int:
    import random
    import socket

    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    try:  # the kernel's ephemeral range starts here; the bands sit just below it, worker 0 highest
        ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low = max(1024, ephemeral - (worker + 1) * PORT_BAND_SIZE)
    candidates = [port for port in range(low, low + PORT_BAND_SIZE) if port not in _issued_ports]
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _issued_ports.add(port)
        return port
    return _free_port_from_kernel(host)


services.common.net.free_port = _worker_free_port

# Session fixtures shared across the files of one folder (a running stack): pytest-xdist keeps such a folder on
# one worker, so the stack starts once. Every other file is its own group (`--dist loadgroup`: a file's tests
# stay together and share its module fixtures).
SHARED_SESSION_FOLDERS = ("tests/reliability",)


def xdist_group_of(item: pytest.Item) -> str:
    path = item.nodeid.split("::", 1)[0]
    return next((folder for folder in SHARED_SESSION_FOLDERS if path.startswith(folder + "/")), path)


def _weight(item: pytest.Item) -> int:
    """2 for a test that starts servers, 1 for another slow one, 0 otherwise."""
    return 2 if item.get_closest_marker("integration") else 1 if item.get_closest_marker("slow") else 0


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its xdist group and order the groups heaviest first (groups that start servers, then
    other slow ones, each in collection order; tests keep their order within a group), so that with two workers
    (`make test`: `--no-loadscope-reorder`) the long groups do not end up last, on one worker."""
    weight: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        group = xdist_group_of(item)
        item.add_marker(pytest.mark.xdist_group(group))
        weight[group] = max(weight.get(group, 0), _weight(item))
        first.setdefault(group, index)
    items.sort(key=lambda item: (-weight[xdist_group_of(item)], first[xdist_group_of(item)]))


@pytest.fixture(scope="session")
def tiny_model():
    from sam_core.modeling.registry import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def litemedsam_model():
    from sam_core.modeling.registry import load_model

    return load_model("litemedsam")


@pytest.fixture(scope="session")
def litemedsam_encoder_onnx(litemedsam_model, tmp_path_factory):
    """LiteMedSAM's image encoder exported to ONNX once per test run: the xdist workers share this run's temporary
    root, and a file lock lets the first one export while the others wait."""
    import fcntl

    from sam_core.export.onnx_encoder import encoder_export_path, export_encoder_onnx

    base = tmp_path_factory.getbasetemp()
    run_root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = encoder_export_path(litemedsam_model, run_root)  # the services' keyed cache name
    with open(run_root / "litemedsam_encoder.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            export_encoder_onnx(litemedsam_model, path)
    return path


def synthetic_scene(height: int = 240, width: int = 320, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A textured background with a few bright ellipses; returns (H x W x 3 uint8, instance masks)."""
    import cv2

    rng = np.random.default_rng(seed)
    image = rng.normal(60, 12, (height, width)).clip(0, 255)
    masks = []
    for cx, cy, ax, ay in ((0.3, 0.35, 0.12, 0.08), (0.7, 0.6, 0.09, 0.14), (0.5, 0.8, 0.05, 0.05)):
        mask = np.zeros((height, width), np.uint8)
        cv2.ellipse(mask, (int(cx * width), int(cy * height)), (int(ax * width), int(ay * height)), 20, 0, 360, 1, -1)
        image[mask > 0] = rng.normal(200, 10, int(mask.sum())).clip(0, 255)
        masks.append(mask.astype(bool))
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2), masks


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` (H x W, H x W x 3 or H x W x 4 uint8) as PNG bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def noise_png(seed: int, height: int = 64, width: int = 96) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` (no pixel data to speak of): a decompression bomb header."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def scene():
    return synthetic_scene()


def write_blob_dataset(root, n_images: int = 6, height: int = 96, width: int = 128, seed: int = 0):
    """Folder data set (images/ + masks/) of bright blobs on noise; returns the root path."""
    from pathlib import Path

    import cv2

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        image = rng.normal(50, 10, (height, width)).clip(0, 255)
        mask = np.zeros((height, width), np.uint8)
        for _ in range(1 + i % 2):
            cx, cy = int(rng.integers(25, width - 25)), int(rng.integers(25, height - 25))
            blob = np.zeros_like(mask)
            cv2.ellipse(blob, (cx, cy), (int(rng.integers(8, 18)), int(rng.integers(8, 16))), int(rng.integers(0, 180)),
                        0, 360, 255, -1)
            if (blob & mask).any():
                continue
            mask |= blob
        image[mask > 0] = rng.normal(190, 10, int((mask > 0).sum())).clip(0, 255)
        cv2.imwrite(str(root / "images" / f"img{i:02d}.png"), image.astype(np.uint8))
        cv2.imwrite(str(root / "masks" / f"img{i:02d}.png"), mask)
    return root


@pytest.fixture(scope="session")
def blob_dataset_dir(tmp_path_factory):
    return write_blob_dataset(tmp_path_factory.mktemp("blobs"))


def save_perturbed_adapter(model, method: str, folder, *, seed: int = 1, name: str | None = None,
                           metrics: dict | None = None):
    """Save an adapter artifact of ``method`` whose trainable tensors were moved away from the base
    (seeded), so it predicts differently from the base model; returns the folder."""

    from sam_core.adapters.artifact import adapted_net, save_adapter
    from sam_core.training.methods import MethodConfig, trainable_state

    cfg = MethodConfig(method)
    sam = adapted_net(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sam.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    save_adapter(folder, model, trainable_state(sam), cfg, name=name, metrics=metrics)
    return folder


def tar_bytes(members: Mapping[str, bytes] | Iterable[tuple[str, bytes]], *, mode: str = "w:gz",
              symlinks: Mapping[str, str] | None = None) -> bytes:
    """A tar archive (``mode``: tarfile's write mode) of regular ``members`` (a mapping, or pairs when a name is to
    repeat), then ``symlinks`` {name: target}."""
    pairs = members.items() if isinstance(members, Mapping) else members
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in pairs:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch at one intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on shared 2-core machines, 2 intra-op threads under load are far slower than 1 for the tiny model."""

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto) on a free loopback port, for the whole session (see tests/s3_server.py)."""
    from tests import s3_server as s3

    server = s3.start()
    yield server
    server.server.stop()


@pytest.fixture()
def s3_url(s3_server) -> str:
    """``s3://<fresh bucket>/registry`` on :func:`s3_server`."""
    return f"s3://{s3_server.new_bucket()}/registry"
