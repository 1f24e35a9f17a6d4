"""INT8 post-training quantization of an ONNX model: static, QDQ format, weights per channel.

One quantized graph serves both CPU runtimes: ONNX Runtime fuses each QuantizeLinear /
DequantizeLinear pair around a conv or a matmul into an int8 kernel, and OpenVINO reads the pairs
as FakeQuantize and runs its low-precision transformations on them. The scales come from
calibration inputs: a shipped model's from training images (never test ones); a model measured
only for its latency (a layer unit, a search candidate) from seeded random inputs, since an int8
kernel's time does not depend on its scales.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.progress import progress_bar

RANDOM_SAMPLES = 4  # random calibration inputs for a model quantized for its latency alone


def is_quantized(model) -> bool:
    """Whether the ONNX model (a path or a ModelProto) already holds quantization nodes."""
    import onnx

    graph = (onnx.load(str(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) else model).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for n in graph.node)


class _Inputs:
    """onnxruntime.quantization's CalibrationDataReader over a sequence of input arrays;
    `on_next()` is called as each is handed over (progress)."""

    def __init__(self, name: str, arrays: Iterable[np.ndarray], on_next=None) -> None:
        self.name, self.arrays, self.on_next = name, iter(arrays), on_next

    def get_next(self) -> dict | None:
        x = next(self.arrays, None)
        if x is not None and self.on_next is not None:
            self.on_next()
        return None if x is None else {self.name: np.ascontiguousarray(x, dtype=np.float32)}


def random_inputs(input_shape: tuple[int, ...], samples: int = RANDOM_SAMPLES, seed: int = 0) -> list[np.ndarray]:
    """Seeded standard-normal inputs: calibration for a model measured for its latency alone."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(input_shape, dtype=np.float32) for _ in range(samples)]


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    calibration: Sequence[np.ndarray],
    per_channel: bool = True,
    progress: bool = False,
) -> Path:
    """Write `src` quantized to int8 (QDQ; weights int8 per output channel, activations uint8 with
    min-max ranges over `calibration`, each an array of the model's input shape) to `dst`."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    src, dst = Path(src), Path(dst)
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="edgeprune-int8-") as tmp:
        try:
            # shapes inferred and batch norms folded into their convs first, as onnxruntime's
            # quantization guide asks: a norm left beside its conv would be quantized apart
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(src), str(prepared))
            with progress_bar(enabled=progress) as bar:
                task = bar.add_task("int8 calibration", total=len(calibration), status="")
                reader = _Inputs(name, calibration, on_next=lambda: bar.update(task, advance=1))
                _quantize_static(str(prepared), str(dst), reader, per_channel)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise EdgepruneError(f"cannot quantize {src} to int8: {first}") from None
    return dst


# Activations unsigned, weights signed (U8S8), which x86's VNNI instructions multiply natively:
# with signed activations (S8S8) ONNX Runtime leaves every conv after a residual add, and the adds,
# in fp32 between Dequantize and Quantize nodes, and its int8 resnet20 at 28x28 ran slower than
# fp32; U8S8 fuses them all (QLinearConv, QLinearAdd). OpenVINO runs either alike (bench/README.md).
def _quantize_static(src: str, dst: str, reader: _Inputs, per_channel: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        src,
        dst,
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


@contextlib.contextmanager
def as_int8(onnx_path: str | os.PathLike, input_shape: tuple[int, ...]) -> Iterator[Path]:
    """The model as an int8 device runs it: itself where it is quantized already (an exported
    int8 model, calibrated on training images), else quantized on random inputs into a temporary
    file that lives as long as the context (a runtime reads it when it loads the model)."""
    path = Path(onnx_path)
    if is_quantized(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="edgeprune-int8-") as tmp:
        yield quantize_int8(path, Path(tmp) / "model.int8.onnx", calibration=random_inputs(tuple(input_shape)))
