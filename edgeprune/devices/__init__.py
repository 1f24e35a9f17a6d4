"""Device profiles and devices (local or through an agent)."""

from edgeprune.devices.device import Device
from edgeprune.devices.spec import DeviceSpec, list_profiles

__all__ = ["Device", "DeviceSpec", "list_profiles"]
