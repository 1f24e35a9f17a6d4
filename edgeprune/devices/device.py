"""A device: a profile plus a transport. Local devices measure in a worker process of their own
(edgeprune/backends/worker.py: only the runtime loaded, as in deployment); remote ones send the
work to an agent, which does the same on the device. The profiler and validator use
`measure`/`measure_many` and never know which. Every measurement waits for the physical
device's turn (devices/queue.py): never two at once on one device."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeprune.devices.queue import DeviceQueue, physical_key
from edgeprune.devices.spec import DeviceSpec
from edgeprune.latency.measurement import Measurement, Protocol


class Device:
    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self._backend = None
        self._client = None
        self._worker = None
        self._fingerprint: dict | None = None
        self.queue = DeviceQueue(physical_key(spec))

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> Device:
        return cls(DeviceSpec.load(name_or_path))

    def at_precision(self, precision: str | None) -> Device:
        """This device at `precision` (DeviceSpec.at_precision); itself for None or its own."""
        if precision is None or precision == self.spec.precision:
            return self
        return Device(self.spec.at_precision(precision))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def remote(self) -> bool:
        return bool(self.spec.agent)

    @property
    def backend(self):
        if self._backend is None:
            self._backend = self.spec.make_backend()
        return self._backend

    @property
    def client(self):
        if self._client is None:
            from edgeprune.agent.client import AgentClient

            self._client = AgentClient.from_spec(self.spec)
        return self._client

    def _measure_local(self, onnx_path, input_shape, protocol: Protocol) -> Measurement:
        from edgeprune.backends.worker import JobTimeout, Worker, WorkerDied
        from edgeprune.errors import EdgepruneError

        if self._worker is None:
            self._worker = Worker(self.spec.to_dict())
            weakref.finalize(self, self._worker.stop)  # the process ends with the device
        path = Path(onnx_path).resolve()
        try:
            with self.queue.turn():
                status, payload = self._worker.run(str(path), tuple(input_shape), protocol.to_dict())
        except (WorkerDied, JobTimeout) as e:
            raise EdgepruneError(f"measuring {path.name} on {self.name}: {e}") from None
        if status != "ok":
            raise EdgepruneError(f"measuring {path.name} on {self.name}: {payload}")
        return Measurement.from_dict(payload)

    def close(self) -> None:
        """Stop the measuring process now (it also stops when the device is garbage-collected)."""
        if self._worker is not None:
            self._worker.stop()

    def fingerprint(self) -> dict:
        """Runtime, version, hardware and settings; asked once (a device behind an agent answers over the network)."""
        if self._fingerprint is None:
            self._fingerprint = self.client.info()["fingerprint"] if self.remote else self.backend.fingerprint()
        # how one run is timed is this profile's choice (its protocol travels to an agent with each request)
        return {**self._fingerprint, "timing": self.spec.protocol.timing}

    def measure(
        self,
        onnx_path: str | os.PathLike,
        input_shape: Sequence[int],
        protocol: Protocol | None = None,
        *,
        fresh: bool = False,
    ) -> Measurement:
        """Latency of one ONNX model with this device's profile and protocol.

        An agent answers a model it has measured before from its cache; `fresh` measures it again
        (what a comparison or a drift check needs). A local device always measures."""
        protocol = protocol or self.spec.protocol
        if self.remote:
            data = Path(onnx_path).read_bytes()
            with self.queue.turn():
                return self.client.measure(data, tuple(input_shape), protocol, fresh=fresh)
        return self._measure_local(onnx_path, input_shape, protocol)

    def measure_many(
        self,
        items: Sequence[tuple[str | os.PathLike, Sequence[int]]],
        protocol: Protocol | None = None,
        *,
        on_result: Callable[[int, Measurement], None] | None = None,
        fresh: bool = False,
    ) -> list[Measurement]:
        """Measure several models; `on_result(i, m)` is called as each one finishes (`fresh`: see measure)."""
        protocol = protocol or self.spec.protocol
        if self.remote:
            models = [(Path(p).read_bytes(), tuple(s)) for p, s in items]
            with self.queue.turn():
                return self.client.measure_many(models, protocol, on_result=on_result, fresh=fresh)
        results = []
        for i, (path, shape) in enumerate(items):
            m = self._measure_local(path, shape, protocol)
            results.append(m)
            if on_result:
                on_result(i, m)
        return results
