"""OpenVINO backend: threads, inference precision (f32 / bf16 / f16, or int8: the model quantized,
formats/quantize.py, its QDQ pairs run as OpenVINO's int8 kernels), latency hint, one stream."""

from __future__ import annotations

import os

import numpy as np

from edgeprune.backends.base import Backend, cpu_model
from edgeprune.checks import POSITIVE, Rule
from edgeprune.errors import EdgepruneError

PRECISIONS = ("f32", "bf16", "f16", "int8")


class OpenVinoBackend(Backend):
    name = "openvino"
    package = "openvino"
    OPTIONS = {
        "threads": POSITIVE,
        "precision": Rule(str, choices=PRECISIONS),
        "device": Rule(str),
        "pinning": Rule(bool),
    }

    def __init__(self, *, threads: int = 1, precision: str = "f32", device: str = "CPU", pinning: bool = False):
        if precision not in PRECISIONS:
            raise EdgepruneError(f"unknown OpenVINO precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.threads = threads
        self.precision = precision
        self.device = device
        self.pinning = pinning

    def config(self) -> dict:
        # Precision is explicit: on AVX-512 CPUs OpenVINO would otherwise choose bf16 by itself.
        return {
            "INFERENCE_NUM_THREADS": self.threads,
            # int8 is the quantized model's: what its QDQ pairs leave in float runs in f32
            "INFERENCE_PRECISION_HINT": "f32" if self.precision == "int8" else self.precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "ENABLE_CPU_PINNING": self.pinning,
        }

    def fingerprint(self) -> dict:
        import openvino as ov

        return {
            "runtime": "openvino",
            "version": ov.get_version(),
            "cpu": cpu_model(),
            "device": self.device,
            "threads": self.threads,
            "precision": self.precision,
        }

    def session(self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...]):
        import openvino as ov

        core = ov.Core()
        try:
            with self.loadable(onnx_path, input_shape) as path:
                compiled = core.compile_model(core.read_model(str(path)), self.device, self.config())
        except EdgepruneError:
            raise
        except Exception as e:
            raise EdgepruneError(f"OpenVINO cannot load {onnx_path}: {str(e).strip().splitlines()[0][:200]}") from None
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> np.ndarray:
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        def outputs(x: np.ndarray) -> list[np.ndarray]:
            request.infer({0: x})
            return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

        def native(x: np.ndarray):
            # benchmark_app's loop: the input tensor set once, then infer() and the request's own
            # latency (timed in the runtime, around the inference alone)
            request.set_input_tensor(ov.Tensor(np.ascontiguousarray(x)))

            def one() -> float:
                request.infer()
                return request.latency

            return one

        run.outputs = outputs  # every output, in the model's order
        run.native = native
        return run
