"""A Ray cluster for the work that parallelises: proxy scoring and finetunes.

`ClusterOptions(workers=N)` starts a local Ray for this process with N workers, bound to
loopback, without a dashboard or usage reporting; `ClusterOptions(address=...)` joins a cluster
the user already runs (`auto`, `HOST:PORT`, or `ray://HOST:10001` through Ray Client). Without
either, Ray is never imported: everything runs in this process as before.

What runs where: the driver (this process) searches, writes the run's store and measures on the
device; workers only compute (score a candidate, finetune a seed). Each worker task asks for
`worker_cpus` CPUs and `worker_gpus` GPUs, so on a cluster with GPUs a finetune lands on a GPU
node and a 0.25-GPU scoring task shares a card with three others.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from edgeprune.errors import EdgepruneError

RAY_HINT = "Ray is not installed: pip install 'edgeprune[ray]' (or pip install ray)"


@dataclass(frozen=True)
class ClusterOptions:
    """Where the parallel work runs: nowhere (None), a local Ray of `workers`, or the cluster at `address`."""

    workers: int | None = None
    address: str | None = None
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise EdgepruneError(f"--workers must be a whole number of at least 1, got {self.workers!r}")
        if self.workers is not None and self.address is not None:
            raise EdgepruneError(
                "give --workers (a local Ray started here) or --ray ADDRESS (a cluster you run), not both"
            )
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise EdgepruneError(
                f"--ray must be a cluster address (auto, HOST:PORT or ray://HOST:PORT), got {self.address!r}"
            )
        for name, value, lo in (("--worker-cpus", self.worker_cpus, 0.0), ("--worker-gpus", self.worker_gpus, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
                raise EdgepruneError(f"{name} must be a finite number of at least {lo:g}, got {value!r}")
        if self.worker_cpus == 0 and self.worker_gpus == 0:
            raise EdgepruneError("a worker needs some resource: --worker-cpus or --worker-gpus above 0")

    @property
    def enabled(self) -> bool:
        return self.workers is not None or self.address is not None

    def describe(self) -> str:
        where = (
            f"a local Ray of {self.workers} worker{'s' * (self.workers != 1)}"
            if self.address is None
            else f"the Ray cluster at {self.address}"
        )
        gpus = f", {self.worker_gpus:g} GPU" if self.worker_gpus else ""
        return f"{where} ({self.worker_cpus:g} CPU{gpus} a task)"


class RaySession:
    """Ray, connected for the duration of a `with` block (and disconnected after, where this block
    connected it). `slots`: how many worker tasks fit at once."""

    def __init__(self, options: ClusterOptions, *, log=print) -> None:
        self.options, self.log = options, log
        self.ray = None
        self._owned = False

    def __enter__(self) -> RaySession:
        ray = _import_ray()
        self.ray = ray
        if not ray.is_initialized():
            from ray._private import ray_constants

            # Ray binds its servers to loopback only where its node address is loopback, and it
            # replaces 127.0.0.1 by the host's address unless clusters are "disabled" (its switch
            # for laptops): a local cluster of this process is exactly that. A cluster the user
            # runs is joined as it was started. Ray reads the switch when it starts; it is put back after.
            self._cluster_switch = ray_constants.ENABLE_RAY_CLUSTER
            if self.options.address is None:
                ray_constants.ENABLE_RAY_CLUSTER = False
            try:
                self._connect(ray)
            finally:
                ray_constants.ENABLE_RAY_CLUSTER = self._cluster_switch
            self._owned = True
        return self

    def _connect(self, ray) -> None:
        quiet = {"log_to_driver": False, "configure_logging": False}
        ray_logger = logging.getLogger("ray")
        level = ray_logger.level
        ray_logger.setLevel(logging.ERROR)  # Ray's start-up notices are not the user's business
        try:
            if self.options.address is not None:
                ray.init(address=self.options.address, **quiet)
            else:
                o = self.options
                ray.init(
                    num_cpus=max(1, math.ceil(o.workers * o.worker_cpus)),
                    num_gpus=math.ceil(o.workers * o.worker_gpus),
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    **quiet,
                )
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = self.options.address or "a local cluster"
            raise EdgepruneError(f"could not start Ray on {where}: {error_line(e)}") from None
        finally:
            ray_logger.setLevel(level)

    def __exit__(self, *exc) -> None:
        if self._owned and self.ray is not None:
            self.ray.shutdown()

    def put(self, obj, *, code_of=()):
        """`obj` in Ray's object store, once (tasks take the reference, not a copy each). The user's
        own code among `code_of` (their model's class, their score_fn: modules that are not installed
        packages) travels by value, so workers need not import it from the driver's paths."""
        from ray import cloudpickle  # Ray's own copy is the one that pickles for the object store

        for module in {_user_module(thing) for thing in code_of} - {None}:
            cloudpickle.register_pickle_by_value(module)
        return self.ray.put(obj)

    @property
    def slots(self) -> int:
        """Worker tasks that fit at once: --workers, or what the cluster's CPUs and GPUs hold."""
        o = self.options
        if o.workers is not None:
            return o.workers
        resources = self.ray.cluster_resources()
        fits = [resources.get("CPU", 0) / o.worker_cpus] if o.worker_cpus else []
        fits += [resources.get("GPU", 0) / o.worker_gpus] if o.worker_gpus else []
        n = int(min(fits))
        if n < 1:
            raise EdgepruneError(
                f"the Ray cluster at {o.address} has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} "
                f"GPUs: not one task of {o.worker_cpus:g} CPU and {o.worker_gpus:g} GPU fits; lower "
                "--worker-cpus/--worker-gpus"
            )
        return n


def _user_module(thing):
    """The module `thing` (an object, class or function) was defined in, where it is the user's own
    code: not edgeprune, not the standard library, not an installed package; else None."""
    import sys
    import sysconfig

    name = getattr(thing, "__module__", None) or type(thing).__module__
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if module is None or name == "__main__" or name.split(".")[0] == "edgeprune" or path is None:
        return None  # __main__ is pickled by value already
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    return None if any(os.path.abspath(path).startswith(os.path.abspath(d)) for d in installed) else module


def _import_ray():
    """Ray, imported with its usage reporting off (nothing leaves this machine)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise EdgepruneError(RAY_HINT) from None
    return ray


def error_line(error) -> str:
    """The innermost error's own line (Ray wraps a worker's error in several layers of traceback)."""
    cause = error
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    named = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
    return (named or lines or [type(cause).__name__])[-1][:300]
