"""ONNX Runtime backend: threads, execution providers, graph optimisation level, precision (fp32,
or int8: static QDQ quantization, formats/quantize.py)."""

from __future__ import annotations

import os

import numpy as np

from edgeprune.backends.base import Backend, cpu_model
from edgeprune.checks import POSITIVE, Rule
from edgeprune.errors import EdgepruneError

OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
PRECISIONS = ("fp32", "int8")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    package = "onnxruntime"
    OPTIONS = {
        "threads": POSITIVE,
        "providers": Rule(list, optional=True),
        "graph_optimization": Rule(str, choices=tuple(OPT_LEVELS)),
        "precision": Rule(str, choices=PRECISIONS),
    }

    def __init__(
        self,
        *,
        threads: int = 1,
        providers: list[str] | None = None,
        graph_optimization: str = "all",
        precision: str = "fp32",
    ):
        if graph_optimization not in OPT_LEVELS:
            raise EdgepruneError(f"unknown graph_optimization {graph_optimization!r}; choose one of {list(OPT_LEVELS)}")
        if precision not in PRECISIONS:
            raise EdgepruneError(f"unknown ONNX Runtime precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.threads = threads
        self.providers = providers or ["CPUExecutionProvider"]
        self.graph_optimization = graph_optimization

    def fingerprint(self) -> dict:
        import onnxruntime as ort

        return {
            "runtime": "onnxruntime",
            "version": ort.__version__,
            "cpu": cpu_model(),
            "threads": self.threads,
            "providers": self.providers,
            "precision": self.precision,
            "graph_optimization": self.graph_optimization,
        }

    def session(self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[self.graph_optimization])
        try:
            with self.loadable(onnx_path, input_shape) as path:
                sess = ort.InferenceSession(str(path), opts, providers=self.providers)
        except EdgepruneError:
            raise
        except Exception as e:
            raise EdgepruneError(f"ONNX Runtime cannot load {onnx_path}: {str(e).splitlines()[0][:200]}") from None
        name = sess.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: x})[0]

        run.outputs = lambda x: sess.run(None, {name: x})  # every output, in the model's order
        run.native = lambda x: _bound(sess, name, x)
        return run


def _bound(sess, name: str, x: np.ndarray):
    """`x` bound once and every output given a preallocated buffer (io binding); then one inference
    timed around `run_with_iobinding` alone: ONNX Runtime's own perf test loop, without the dict
    and the output copies of `sess.run`."""
    import time

    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_cpu_input(name, x)
    for out, value in zip(sess.get_outputs(), sess.run(None, {name: x})):
        binding.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_numpy(np.empty_like(value)))
    clock, infer = time.perf_counter, sess.run_with_iobinding

    def one() -> float:
        t0 = clock()
        infer(binding)
        return (clock() - t0) * 1000.0

    return one
