"""TensorRT backend: an engine built from the ONNX file (fp32, fp16, or int8), timed with CUDA events.

int8 is TensorRT's explicit quantization: the engine is built from the model's QDQ form (an
exported int8 ONNX as it is; an fp32 one quantized first, formats/quantize.py), with the int8
and fp16 flags, so the quantized layers run int8 at the scales in the file and the rest fp16.
No implicit-quantization calibrator: TensorRT 10 deprecates it in favour of QDQ graphs.

Runs on an NVIDIA GPU host or a Jetson (usually through `edgeprune agent serve` there). Where
`tensorrt` does not import, every use raises one clear error saying what to install and where.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeprune.backends.base import Backend
from edgeprune.checks import POSITIVE, Rule
from edgeprune.errors import EdgepruneError

MISSING = (
    "TensorRT is not available here: it needs an NVIDIA GPU with CUDA. Install it on that machine "
    "(`pip install 'edgeprune[tensorrt]'` on x86-64, JetPack's python3-libnvinfer on a Jetson), or run "
    "`edgeprune agent serve` there and set `agent:` in the device profile"
)

PRECISIONS = ("fp32", "fp16", "int8")


class TensorRtBackend(Backend):
    name = "tensorrt"
    package = "tensorrt"
    OPTIONS = {
        "precision": Rule(str, choices=PRECISIONS),
        "workspace_mb": POSITIVE,
        "device_index": Rule(int, lo=0),
    }

    def __init__(self, *, precision: str = "fp16", workspace_mb: int = 1024, device_index: int = 0) -> None:
        if precision not in PRECISIONS:
            raise EdgepruneError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.workspace_mb = workspace_mb
        self.device_index = device_index

    @classmethod
    def available(cls) -> bool:
        try:
            import tensorrt  # noqa: F401
            import torch

            return torch.cuda.is_available()
        except ImportError:
            return False

    def _require(self):
        if not self.available():
            raise EdgepruneError(MISSING)
        import tensorrt as trt

        return trt

    def fingerprint(self) -> dict:
        trt = self._require()
        import torch

        return {
            "runtime": "tensorrt",
            "version": trt.__version__,
            "gpu": torch.cuda.get_device_name(self.device_index),
            "precision": self.precision,
        }

    def build_engine(self, onnx_path: str | os.PathLike) -> bytes:
        """A serialized engine for the ONNX file (what `export --format tensorrt` writes)."""
        trt = self._require()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        with open(onnx_path, "rb") as f:
            if not parser.parse(f.read()):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise EdgepruneError(f"TensorRT cannot parse {onnx_path}: {errors[:200]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if self.precision == "int8":  # the QDQ pairs' layers in int8 (explicit quantization)
            config.set_flag(trt.BuilderFlag.INT8)
        else:  # TF32 is on by default on Ampere and later: fp32 convolutions would round inputs to 10 bits
            config.clear_flag(trt.BuilderFlag.TF32)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise EdgepruneError(f"TensorRT could not build an engine for {onnx_path}")
        return bytes(engine)

    def session(self, path: str | os.PathLike, input_shape: tuple[int, ...]):
        """run(x) -> logits: an ONNX file is built into an engine here; a serialized engine (`.engine`,
        what `export` writes) is loaded as it is, so a parity check runs the very file that ships."""
        trt = self._require()
        import torch

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if str(path).endswith(".engine"):
            engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if engine is None:
                raise EdgepruneError(
                    f"TensorRT {trt.__version__} cannot load {path}: an engine runs only on the TensorRT "
                    "version and GPU model that built it; export it again on this machine"
                )
        else:
            with self.loadable(path, input_shape) as onnx_path:  # int8: the QDQ form
                engine = runtime.deserialize_cuda_engine(self.build_engine(onnx_path))
        context = engine.create_execution_context()
        device = torch.device("cuda", self.device_index)
        buffers = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(context.get_tensor_shape(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT and shape != tuple(input_shape):
                raise EdgepruneError(f"model input {name} has shape {shape}, not {tuple(input_shape)}")
            buffers[name] = torch.empty(shape, dtype=torch.float32, device=device)
            context.set_tensor_address(name, buffers[name].data_ptr())
        inputs = [n for n in buffers if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in buffers if n not in inputs]
        stream = torch.cuda.Stream(device)

        def run(x: np.ndarray) -> np.ndarray:
            buffers[inputs[0]].copy_(torch.from_numpy(x))
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            return buffers[outputs[0]].cpu().numpy()

        def all_outputs(x: np.ndarray) -> list[np.ndarray]:
            run(x)
            return [buffers[n].cpu().numpy() for n in outputs]

        run.outputs = all_outputs  # every output, in the engine's order

        def native(x: np.ndarray):  # trtexec's figure: the input copied once, GPU time by CUDA events
            buffers[inputs[0]].copy_(torch.from_numpy(x))
            return lambda: _timed(context, stream)

        run.native = native
        return run


def _timed(context, stream) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    context.execute_async_v3(stream.cuda_stream)
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end)
