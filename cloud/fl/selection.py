"""Who takes part in a federated run: the fleet decides, each skip has a reason."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgefleet.cloud.devices import Device
from edgefleet.cloud.fl.store import FlNode
from edgefleet.models.fl.numpy_task import NUMPY_ARCHS, TORCH_CPU
from edgefleet.protos.flower import parse_fl_features

BUSY_STATES = ("downloading", "verifying", "loading", "self_test")


@dataclass(frozen=True)
class Selection:
    chosen: dict[str, int] = field(default_factory=dict)  # device id -> Flower node id
    skipped: dict[str, str] = field(default_factory=dict)  # device id -> why


def select_participants(
    devices: Sequence[Device],
    nodes: Mapping[str, FlNode],
    *,
    min_samples: int,
    idle_only: bool = False,
    arch: str = "mlp",
) -> Selection:
    """Online devices enrolled for FL whose sidecar is ready with enough local samples (and
    PyTorch, when the run's `arch` is not one the ClientApp trains in numpy)."""
    sel = Selection()
    for d in devices:
        node = nodes.get(d.device_id)
        fl = parse_fl_features(list(d.capabilities.features if d.capabilities else ()))
        if node is None:
            why = f"not enrolled for federated learning (fleet devices enroll {d.device_id} --fl)"
        elif node.node_id is None:
            why = "node key not registered with the SuperLink yet (coordinator started with --fl?)"
        elif not d.online:
            why = "offline"
        elif fl is None:
            why = "agent reports no federated sidecar (install edgefleet-agent[fl] on the device)"
        elif not fl.get("ready"):
            why = f"sidecar not ready: {fl.get('reason') or 'no reason given'}"
        elif int(str(fl["samples"])) < min_samples:
            why = f"{fl['samples']} local samples; --min-samples is {min_samples}"
        elif arch not in NUMPY_ARCHS and fl.get("torch") is False:
            why = f"PyTorch missing on the device; arch {arch!r} trains with it: {TORCH_CPU}"
        elif idle_only and d.state in BUSY_STATES:
            why = f"busy ({d.state}) and --idle-only was given"
        else:
            sel.chosen[d.device_id] = node.node_id
            continue
        sel.skipped[d.device_id] = why
    return sel
