"""The fleet's devices: enrolment, liveness, capabilities, desired and reported state."""

from edgefleet.cloud.devices.filters import DeviceFilter
from edgefleet.cloud.devices.selector import Selector
from edgefleet.cloud.devices.store import Device, DeviceEvent, DeviceStore
from edgefleet.cloud.devices.values import DeviceSpec

__all__ = ["Device", "DeviceEvent", "DeviceFilter", "DeviceSpec", "DeviceStore", "Selector"]
