"""Device simulator: many real agents in one process, with hardware profiles, local data
partitions and faults on demand (`SimulatedFleet`)."""

from simulator.fleet import SimulatedDevice, SimulatedFleet
from simulator.plan import Enrollment, plan
from simulator.profiles import Mix, Profile, parse_profile

__all__ = [
    "Enrollment",
    "Mix",
    "Profile",
    "SimulatedDevice",
    "SimulatedFleet",
    "parse_profile",
    "plan",
]
