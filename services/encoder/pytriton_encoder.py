"""A real Triton Inference Server on this machine, serving samforge's exported image encoder.

Run with the *Triton test environment's* Python (``make triton-env`` builds ``.venv-triton``:
``nvidia-pytriton`` bundles a ``tritonserver`` binary that runs on CPU, and needs numpy<2 and protobuf<7,
so it cannot share samforge's environment). This script imports only numpy, onnxruntime and pytriton:

    .venv-triton/bin/python services/encoder/pytriton_encoder.py --onnx encoder.onnx \
        --grpc-port 8001 --http-port 8000 --metrics-port 8002

It binds the ONNX graph of ``samforge export-onnx --part encoder`` as model ``sam_encoder`` (``--model-name``)
with the graph's tensor names and shapes and dynamic batching, as ``deploy/triton/model_repository/*/config.pbtxt``
declare them (``images`` B x 3 x S x S FP32 -> every output of the graph, B x C_l x h_l x w_l FP32: SAM 1's
one ``image_embeddings``, SAM 2's three levels ``image_embed``, ``high_res_feat_s0``, ``high_res_feat_s1``),
through Triton's Python backend instead of its onnxruntime backend (which PyPI does not ship). Every batch
Triton forms is appended to ``--batch-log`` (one size per line), so tests can see the dynamic batcher at work.

:class:`PyTritonServer` starts and stops that process from samforge's own environment (tests, benchmarks).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

MODEL_NAME = "sam_encoder"


class PyTritonServer:
    """This script as a child process (own process group) on fixed loopback ports.

    ``python``: the Triton environment's interpreter. :meth:`start` returns once Triton reports the model
    ready (polled through tritonclient, which samforge's environment has); :meth:`kill` SIGKILLs the whole
    process group (tritonserver and its Python backend stub included), as a crash would.
    """

    def __init__(self, python: str, onnx_path: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                 max_batch: int = 8, max_queue_delay_us: int = 20000, threads: int = 0) -> None:
        from services.common.net import free_port  # not at the top: the script runs without samforge installed

        self.python, self.onnx_path, self.workdir = python, str(onnx_path), Path(workdir)
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.max_batch, self.max_queue_delay_us, self.threads = max_batch, max_queue_delay_us, threads
        self.batch_log = self.workdir / "batches.log"
        self.log_path = self.workdir / "pytriton.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 180.0) -> PyTritonServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [self.python, str(Path(__file__).resolve()), "--onnx", self.onnx_path,
                   "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                   "--metrics-port", str(self.metrics_port), "--max-batch", str(self.max_batch),
                   "--max-queue-delay-us", str(self.max_queue_delay_us), "--threads", str(self.threads),
                   "--batch-log", str(self.batch_log)]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as triton_grpc

        deadline = time.monotonic() + timeout
        client = triton_grpc.InferenceServerClient(self.url)
        try:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"pytriton exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
                try:
                    if client.is_model_ready(MODEL_NAME, client_timeout=2.0):
                        return
                except Exception:  # nosec B110  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Triton not ready after {timeout:.0f} s:\n{self.log()[-4000:]}")
                time.sleep(0.1)
        finally:
            client.close()

    def batch_sizes(self) -> list[int]:
        """Sizes of the batches Triton executed so far (from ``--batch-log``)."""
        if not self.batch_log.exists():
            return []
        return [int(line) for line in self.batch_log.read_text().split()]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> PyTritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", required=True, help="encoder graph from `samforge export-onnx --part encoder`")
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    parser.add_argument("--batch-log", default="", help="append each executed batch size to this file")
    args = parser.parse_args()

    # The Python backend stub links libpython dynamically: point it at this interpreter's library.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if libdir and libdir not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    in_shape = tuple(int(d) for d in image_input.shape[1:])
    out_shapes = {output.name: tuple(int(d) for d in output.shape[1:]) for output in session.get_outputs()}

    @batch  # type: ignore[untyped-decorator]  # pytriton has no type information
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(inputs[image_input.name], dtype=np.float32)
        if args.batch_log:
            with open(args.batch_log, "a") as log_file:
                log_file.write(f"{len(images)}\n")
        levels = session.run(list(out_shapes), {image_input.name: images})
        return dict(zip(out_shapes, levels, strict=True))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                          grpc_address="127.0.0.1", http_address="127.0.0.1", metrics_address="127.0.0.1",
                          exit_on_error=True, log_verbose=0)
    # statistics stay open so that tests and benchmarks can read the batch counts through tritonclient
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=[Tensor(name=image_input.name, dtype=np.float32, shape=in_shape)],
            outputs=[Tensor(name=name, dtype=np.float32, shape=shape) for name, shape in out_shapes.items()],
            config=ModelConfig(max_batch_size=args.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
