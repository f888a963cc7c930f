"""The fleet's devices: enrolment, liveness, capabilities, desired and reported state."""

from cloud.devices.filters import DeviceFilter
from cloud.devices.selector import Selector
from cloud.devices.store import Device, DeviceEvent, DeviceStore

__all__ = ["Device", "DeviceEvent", "DeviceFilter", "DeviceStore", "Selector"]
