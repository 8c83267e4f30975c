"""Encoder resident memory under load: idle RSS, peak RSS and the rise, against the service's memory budget.

Starts ``python -m services.encoder`` (LiteMedSAM by default, ``SAMFORGE_CACHE_BYTES`` 64 MiB), lets ``--clients``
threads each send ``--images`` distinct images (``--size`` px, random noise PNG) over real gRPC, then prints idle
RSS (after start-up), peak RSS (``VmHWM``) and the rise, with the ``samforge_memory_budget_bytes`` gauge when the
service exports it. Extra ``--env NAME=VALUE`` pairs go to the service (e.g. ``MALLOC_ARENA_MAX=2``,
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4``).

    PYTHONPATH=$PWD .venv/bin/python bench/encoder_rss.py --clients 8 --images 3
"""

from __future__ import annotations

import argparse
import io
import re
import tempfile
import threading
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench.soakparts.memory import scrape
from services._generated.sam.v1 import encoder_pb2, encoder_pb2_grpc
from tests.integration.conftest import start_service

MIB = 1 << 20


def noise_png(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def budget(metrics_port: int) -> float | None:
    samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics").get("samforge_memory_budget_bytes")
    return samples[0][1] if samples else None


def load(address: str, clients: int, images: list[list[bytes]]) -> dict[str, int]:
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)]) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            for image in images[i]:
                try:
                    stub.Embed(encoder_pb2.EmbedRequest(image=image, tenant=f"t{i % 2}"), timeout=600)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=3, help="distinct images per client")
    parser.add_argument("--size", type=int, default=1500, help="image height in pixels (width 4/3 of it)")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service")
    args = parser.parse_args()
    images = [[noise_png(1000 * c + i, args.size) for i in range(args.images)] for c in range(args.clients)]
    env = {"SAMFORGE_MODEL": args.model, "SAMFORGE_CACHE_BYTES": str(64 * MIB), "SAMFORGE_LOG_LEVEL": "WARNING",
           **dict(item.split("=", 1) for item in args.env)}
    with tempfile.TemporaryDirectory() as workdir:
        env["SAMFORGE_REGISTRY_DIR"] = str(Path(workdir) / "registry")
        service = start_service("encoder", env, Path(workdir))
        try:
            pid = service.proc.pid
            idle = status_kib(pid, "VmRSS")
            gauge = budget(service.metrics_port)
            codes = load(service.address, args.clients, images)
            peak, after = status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")
        finally:
            service.stop()
    print(f"{args.clients} clients x {args.images} distinct {args.size}px images, {args.model}, {env}")
    print(f"replies {codes}")
    print(f"idle RSS {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, rise {(peak - idle) / 1024:.0f} MiB, "
          f"after load {after / 1024:.0f} MiB")
    print("memory budget gauge: " + (f"{gauge / MIB:.0f} MiB" if gauge is not None else "not exported"))


if __name__ == "__main__":
    main()
