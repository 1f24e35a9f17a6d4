"""The interface every inference runtime implements."""

from __future__ import annotations

import contextlib
import os
import platform
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgeprune.latency.measurement import Measurement, Protocol


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Backend(ABC):
    """An inference runtime configured for one device profile."""

    name: str = ""
    package: str = ""  # the pip package that provides it
    OPTIONS: ClassVar[dict] = {}  # option name -> edgeprune.checks.Rule: what a device profile may set

    @classmethod
    def check_options(cls, options: dict, *, where: str) -> dict:
        """A device profile's `options:` checked by the runtime's rules, without starting it: a
        wrong thread count or precision is one line when the profile is read, not a measurement
        taken with it."""
        from edgeprune.checks import check_values
        from edgeprune.errors import EdgepruneError

        try:
            return check_values(options, cls.OPTIONS, where=cls.name, as_flag=False)
        except EdgepruneError as e:
            raise EdgepruneError(f"{where}: options: {e}") from None

    @classmethod
    def available(cls) -> bool:
        """Whether the runtime imports here."""
        import importlib.util

        return importlib.util.find_spec(cls.package) is not None

    @abstractmethod
    def fingerprint(self) -> dict:
        """Runtime version, hardware and settings: what makes two measurements comparable."""

    @abstractmethod
    def session(self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...]):
        """A callable `run(x: np.ndarray) -> np.ndarray` for the model."""

    def loadable(self, model_path: str | os.PathLike, input_shape: tuple[int, ...]):
        """A context giving the file to load: the model as this backend's precision runs it. An
        int8 backend given an fp32 ONNX model quantizes it (formats/quantize.py: a unit or a
        candidate is timed as the quantized whole model will run); anything else loads as it is."""
        path = Path(model_path)
        if getattr(self, "precision", None) == "int8" and path.suffix == ".onnx":
            from edgeprune.formats.quantize import as_int8

            return as_int8(path, input_shape)
        return contextlib.nullcontext(path)

    def measure(
        self,
        onnx_path: str | os.PathLike,
        input_shape: tuple[int, ...],
        protocol: Protocol | None = None,
        *,
        run=None,
    ) -> Measurement:
        """Time the model under `protocol`; `run`: a session of it already open (see `session`).

        A session may offer `native(x)`: `x` bound once, then a call that runs one inference and
        returns its duration in ms as the runtime's own benchmark tool measures it (protocol.timing
        "native"); otherwise, and under "python-call", the Python call `run(x)` is timed."""
        from edgeprune.latency.measurement import measure_callable

        protocol = protocol or Protocol()
        run = run or self.session(onnx_path, input_shape)
        x = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)
        if protocol.timing == "native" and hasattr(run, "native"):
            one = run.native(x)
            return measure_callable(one, protocol, timed=one)
        return measure_callable(lambda: run(x), protocol)
