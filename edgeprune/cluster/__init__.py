"""Scale-out on Ray: candidate scoring and finetunes on workers, the device measured by the driver alone."""

from edgeprune.cluster.session import ClusterOptions, RaySession

__all__ = ["ClusterOptions", "RaySession"]
