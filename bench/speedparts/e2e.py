"""End-to-end part: the local gRPC stack (encoder + decoder services, ``services.stack``) against a naive gRPC
server written here, both serving the same DecoderService API on loopback.

Baseline: the naive server (``--child naive-server PORT``) decodes and encodes the image on every request (eager
fp32 encoder and decoder, no cache, no batching). Measured for each server on one image and 100 random box
prompts: the first call (which embeds), the 100 prompts one by one with the image in every call, one by one by
embedding key (samforge only), all 100 in one call; then 8 concurrent clients sending one-box calls for
``--seconds`` (p50/p99 latency, throughput, errors). Both servers run with tcmalloc when it is installed.

Result keys: ``samforge`` and ``naive (encodes every request; baseline)`` (``first_call_s``,
``100_one_by_one_s``, ``100_one_by_one_by_key_s``, ``100_in_one_call_s``, ``load_8_clients``), and the ratios
``speedup_100_one_by_one``, ``speedup_100_one_by_one_by_key``, ``speedup_100_batched_vs_naive_one_by_one``,
``speedup_100_batched``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.speedparts.common import Box, benchmark_image, child_command, random_boxes, tcmalloc_path

if TYPE_CHECKING:
    from services.client import BoxPrompt

NAIVE = "naive (encodes every request; baseline)"
N_PROMPTS = 100
LOAD_CLIENTS = 8
CALL_TIMEOUT_S = 300
LOAD_CALL_TIMEOUT_S = 120


def child_naive_server(port: int) -> None:
    """Baseline server: same DecoderService API, but decodes the image and encodes it on every request
    (eager fp32 encoder and decoder, no cache, no batching). Its model runs on one compute thread, as
    samforge's does, so the baseline does not pay for several OpenMP teams (services/common/compute.py).
    Serves on 127.0.0.1:``port`` until terminated."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from sam_core.inference.predictor import Predictor
    from sam_core.io.images import decode_image
    from sam_core.modeling.registry import load_model
    from services._generated.sam.v1 import decoder_pb2, decoder_pb2_grpc
    from services.common import compute
    from services.decoder import codec
    from services.decoder.engine import PromptOutput, SegmentResult
    from services.decoder.masks import describe_batch

    model = compute.shared().run(load_model, "litemedsam")
    predictor = compute.shared().run(Predictor, model, fast_decoder=False, optimize_encoder=False)

    class Naive(decoder_pb2_grpc.DecoderServiceServicer):
        def Segment(self, request: decoder_pb2.SegmentRequest,
                    context: grpc.ServicerContext) -> decoder_pb2.SegmentResponse:
            return compute.shared().run(self.segment, request)

        def segment(self, request: decoder_pb2.SegmentRequest) -> decoder_pb2.SegmentResponse:
            image = decode_image(request.image)
            embedding = predictor.encode_one(image)
            prompts = [codec.prompt_from_proto(p, f"prompts[{i}]") for i, p in enumerate(request.prompts)]
            t0 = time.perf_counter()
            result = predictor.decode(embedding, prompts, multimask=request.multimask)
            described = describe_batch(result.masks, result.iou_scores, result.stability_scores, "rle")
            return codec.segment_response(SegmentResult([PromptOutput(m) for m in described], image.shape[:2], "",
                                                        model.model_id, "", True,
                                                        1e3 * (time.perf_counter() - t0)))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    decoder_pb2_grpc.add_DecoderServiceServicer_to_server(Naive(), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def percentile_ms(sorted_seconds: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank, rounded down) of sorted latencies, in ms; None when there are none."""
    if not sorted_seconds:
        return None
    return round(1e3 * sorted_seconds[min(len(sorted_seconds) - 1, int(q * len(sorted_seconds)))], 1)


def load_test(address: str, image: bytes, boxes: list[Box], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads, each sending one-box Segment calls for ``seconds``: latency percentiles."""
    from services.client import BoxPrompt, SamforgeClient

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(k: int) -> None:
        with SamforgeClient(decoder=address) as client:
            i = k
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    client.segment([BoxPrompt(*boxes[i % len(boxes)])], image=image, timeout=LOAD_CALL_TIMEOUT_S)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                except Exception:  # counted, reported
                    with lock:
                        errors[0] += 1
                i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(lat), "errors": errors[0],
            "throughput_rps": round(len(lat) / wall, 2), "p50_ms": percentile_ms(lat, 0.5),
            "p99_ms": percentile_ms(lat, 0.99)}


@dataclass(frozen=True)
class Workload:
    """What every server is measured on: one PNG-encoded image, its box prompts and the load-test duration."""

    png: bytes
    boxes: list[Box]
    seconds: float

    @property
    def prompts(self) -> list[BoxPrompt]:
        from services.client import BoxPrompt

        return [BoxPrompt(*b) for b in self.boxes]


def measure(address: str, workload: Workload) -> dict[str, Any]:
    """First call, 100 prompts one by one (image; embedding key), 100 in one call, then the load test."""
    from services.client import SamforgeClient

    prompts, png = workload.prompts, workload.png
    with SamforgeClient(decoder=address) as client:
        t0 = time.perf_counter()
        key = client.segment(prompts[:1], image=png, timeout=CALL_TIMEOUT_S).embedding_key  # first call: embeds
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in prompts:
            client.segment([p], image=png, timeout=CALL_TIMEOUT_S)
        one_by_one = time.perf_counter() - t0
        by_key = None
        if key:  # what a client does after the first call: send the embedding key, not the image
            t0 = time.perf_counter()
            for p in prompts:
                client.segment([p], embedding_key=key, timeout=CALL_TIMEOUT_S)
            by_key = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        client.segment(prompts, image=png, timeout=CALL_TIMEOUT_S)
        batched = time.perf_counter() - t0
    row: dict[str, Any] = {"first_call_s": round(first, 3), "100_one_by_one_s": round(one_by_one, 2),
                           "100_one_by_one_by_key_s": by_key, "100_in_one_call_s": round(batched, 2)}
    row["load_8_clients"] = load_test(address, png, workload.boxes, LOAD_CLIENTS, workload.seconds)
    return row


def preload_env() -> dict[str, str]:
    """LD_PRELOAD=tcmalloc when it is installed, else nothing."""
    lib = tcmalloc_path()
    return {"LD_PRELOAD": lib} if lib else {}


def measure_samforge(workload: Workload) -> dict[str, Any]:
    """``measure`` against a freshly started local stack in a temporary var folder."""
    from services.stack import start_stack

    with tempfile.TemporaryDirectory() as var:
        stack = start_stack(var, extra_env=preload_env())
        try:
            return measure(stack.addresses["decoder"], workload)
        finally:
            stack.stop()


def measure_naive(workload: Workload) -> dict[str, Any]:
    """``measure`` against the naive server, started as a child process on a free port."""
    from services.common.net import free_port
    from services.stack import wait_serving

    port = free_port()
    proc = subprocess.Popen(child_command(["naive-server", str(port)]), env={**os.environ, **preload_env()})
    try:
        wait_serving(f"127.0.0.1:{port}", proc=proc)
        return measure(f"127.0.0.1:{port}", workload)
    finally:
        proc.terminate()
        proc.wait(30)


def speedups(naive: dict[str, Any], ours: dict[str, Any]) -> dict[str, float]:
    """The naive server's times over samforge's."""
    return {"speedup_100_one_by_one": round(naive["100_one_by_one_s"] / ours["100_one_by_one_s"], 1),
            "speedup_100_one_by_one_by_key": round(naive["100_one_by_one_s"] / ours["100_one_by_one_by_key_s"], 1),
            "speedup_100_batched_vs_naive_one_by_one": round(naive["100_one_by_one_s"] / ours["100_in_one_call_s"], 1),
            "speedup_100_batched": round(naive["100_in_one_call_s"] / ours["100_in_one_call_s"], 1)}


def part_e2e(seconds: float) -> dict[str, Any]:
    """samforge's stack, then the naive server, on the benchmark image and 100 random boxes."""
    import cv2

    image = benchmark_image()
    png = cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()
    h, w = image.shape[:2]
    workload = Workload(png, random_boxes(N_PROMPTS, h, w, seed=1), seconds)
    results: dict[str, Any] = {"samforge": measure_samforge(workload)}
    print(json.dumps({"samforge": results["samforge"]}), flush=True)
    results[NAIVE] = measure_naive(workload)
    results.update(speedups(results[NAIVE], results["samforge"]))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("speedup")}), flush=True)
    return results
