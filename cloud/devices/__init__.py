"""The fleet's devices: enrolment, liveness, capabilities, desired and reported state."""

from cloud.devices.selector import Selector
from cloud.devices.store import Device, DeviceStore

__all__ = ["Device", "DeviceStore", "Selector"]
