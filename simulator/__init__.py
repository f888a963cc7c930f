"""Device simulator: many real agents in one process, with hardware profiles, local data
partitions and faults on demand (`SimulatedFleet`)."""

from edgefleet.simulator.fleet import SimulatedDevice, SimulatedFleet
from edgefleet.simulator.plan import Enrollment, plan
from edgefleet.simulator.profiles import Mix, Profile, parse_profile

__all__ = [
    "Enrollment",
    "Mix",
    "Profile",
    "SimulatedDevice",
    "SimulatedFleet",
    "parse_profile",
    "plan",
]
