"""Drift on the coordinator: PSI per device, per group and fleet-wide, and alerts.

Agents send a sketch of their live traffic with every telemetry window
(`Telemetry.drift`, binned with the edges of the serving version's reference;
`models.sketch`); the ingest writer stores them in `drift_sketches`. `DriftMonitor`
sums the sketches of the last `window_s` seconds per device, per group and for
the whole fleet, for each model version, and scores them against the version's
reference (shipped in its signed manifests): PSI for each input feature (the
"inputs" metric is the largest) and for the predicted classes ("predictions").

`evaluate()` (run every `drift_interval` seconds by `fleet serve`) opens an alert
for each device or group whose PSI exceeds the threshold on at least
`min_samples` rows, and resolves it once PSI falls back; fleet-wide PSI is
reported (`fleet drift`, `/metrics`) but not alerted on, so drift confined to
one group raises that group's alerts only. Subjects with fewer rows in the
window leave their alerts as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.cloud.drift.alerts import Alert, AlertStore, Finding, check_threshold
from edgefleet.cloud.registry import ModelRef, RegistryStore
from edgefleet.cloud.telemetry.store import SketchRow, TelemetryStore
from edgefleet.models.sketch import MIN_SAMPLES, Counts, WorstInput, score
from edgefleet.protos.errors import InvalidArgument, NotFound
from edgefleet.protos.manifest import DriftReference, SignedManifest, decode_manifest

logger = logging.getLogger(__name__)

BY = ("device", "group", "fleet")
NO_GROUP = "(no group)"
FLEET = "*"
DEFAULT_THRESHOLD = 0.2
DEFAULT_WINDOW_S = 600.0


@dataclass(frozen=True)
class DriftRow(WorstInput):
    """PSI of one subject's traffic on one model version over the window."""

    scope: str  # device | group | fleet
    subject: str  # device id, group name, or "*"
    model: str
    version: int
    devices: int
    rows: int
    inputs: Mapping[str, float]  # PSI per input feature
    predictions: float  # PSI of the predicted classes
    threshold: float
    min_samples: int

    @property
    def enough(self) -> bool:
        return self.rows >= self.min_samples

    @property
    def drifting(self) -> bool:
        return self.enough and max(self.input_psi, self.predictions) > self.threshold


def check_by(by: str) -> str:
    if by not in BY:
        raise InvalidArgument(f"--by {by!r} unknown; accepted: {', '.join(BY)}")
    return by


class DriftMonitor:
    def __init__(
        self,
        *,
        telemetry: TelemetryStore,
        alerts: AlertStore,
        registry: RegistryStore,
        devices: Any,
        threshold: float = DEFAULT_THRESHOLD,
        window_s: float = DEFAULT_WINDOW_S,
        min_samples: int = MIN_SAMPLES,
    ) -> None:
        self.telemetry = telemetry
        self.alerts = alerts
        self.registry = registry
        self.devices = devices
        self.threshold = check_threshold(threshold)
        if window_s <= 0:
            raise InvalidArgument(f"drift window {window_s}s must be > 0")
        self.window_s = window_s
        self.min_samples = max(1, min_samples)
        self._refs: dict[tuple[str, int, str], DriftReference] = {}
        self.last: list[DriftRow] = []  # the latest evaluate(), for /metrics
        self.evaluations = 0

    # -- references -------------------------------------------------------------------

    def reference(self, model: str, version: int, variant: str = "") -> DriftReference | None:
        """The drift reference of `model:version` (its `variant`'s manifest; without a
        variant, fp32's or else the first variant that has one). None: none shipped."""
        key = (model, version, variant)
        if key in self._refs:
            return self._refs[key]
        try:
            mv = self.registry.get_version(ModelRef(model, version))
        except NotFound:
            return None
        variants = sorted(mv.variants, key=lambda v: (v.name != "fp32", v.name))
        if variant:
            variants = [v for v in variants if v.name == variant]
        for v in variants:
            ref = decode_manifest(SignedManifest.from_bytes(v.signed_manifest).manifest_bytes).drift
            if ref is not None:
                self._refs[key] = ref  # versions are immutable: cache for good
                return ref
        return None

    # -- scoring ----------------------------------------------------------------------

    def report(
        self,
        *,
        by: str = "group",
        model: str | None = None,
        version: int | None = None,
        now_ms: int | None = None,
    ) -> list[DriftRow]:
        """Fleet-wide rows, then one per `by` subject (device or group), per model version."""
        check_by(by)
        rows = self._window(model, version, now_ms)
        scopes = ("fleet",) if by == "fleet" else ("fleet", by)
        return self._score(rows, scopes)

    def evaluate(self, *, now_ms: int | None = None) -> tuple[list[Alert], list[Alert]]:
        """Score every device and group and open/resolve their alerts. Returns (opened, resolved)."""
        now = _now_ms() if now_ms is None else now_ms
        scored = self._score(self._window(None, None, now), ("fleet", "group", "device"))
        findings = [
            Finding(r.scope, r.subject, r.model, r.version, metric, psi, r.rows, detail)
            for r in scored
            if r.scope != "fleet" and r.enough
            for metric, psi, detail in (
                ("inputs", r.input_psi, f"worst feature {r.worst_feature}"),
                ("predictions", r.predictions, "predicted classes"),
            )
        ]
        opened, resolved = self.alerts.apply(findings, threshold=self.threshold, now_ms=now)
        self.last = scored
        self.evaluations += 1
        return opened, resolved

    def _window(
        self, model: str | None, version: int | None, now_ms: int | None
    ) -> list[SketchRow]:
        now = _now_ms() if now_ms is None else now_ms
        return self.telemetry.drift_window(
            since_ms=now - int(self.window_s * 1000), model=model, version=version
        )

    def _score(self, rows: Sequence[SketchRow], scopes: Iterable[str]) -> list[DriftRow]:
        groups = {d.device_id: (d.group or NO_GROUP) for d in self.devices.find()}
        # (scope, subject, model, version) -> (counts, devices)
        sums: dict[tuple[str, str, str, int], tuple[Counts, set[str]]] = {}
        wanted = set(scopes)
        for r in rows:
            ref = self.reference(r.model, r.version)
            if ref is None:
                continue
            c = Counts(
                r.rows,
                [np.asarray(x, dtype=np.int64) for x in r.inputs],
                np.asarray(r.predictions, dtype=np.int64),
            )
            if not c.fits(ref):
                continue
            subjects = {
                "fleet": FLEET,
                "group": groups.get(r.device_id, NO_GROUP),
                "device": r.device_id,
            }
            for scope in wanted:
                key = (scope, subjects[scope], r.model, r.version)
                have = sums.get(key)
                if have is None:
                    sums[key] = (Counts.empty(ref), set())
                    have = sums[key]
                have[0].add(c)
                have[1].add(r.device_id)
        order = {s: i for i, s in enumerate(("fleet", "group", "device"))}
        out = []
        for (scope, subject, model, version), (counts, devs) in sorted(
            sums.items(), key=lambda kv: (order[kv[0][0]], kv[0][2], kv[0][3], kv[0][1])
        ):
            ref = self.reference(model, version)
            assert ref is not None
            s = score(ref, counts)
            out.append(
                DriftRow(
                    scope=scope,
                    subject=subject,
                    model=model,
                    version=version,
                    devices=len(devs),
                    rows=s.rows,
                    inputs=s.inputs,
                    predictions=s.predictions,
                    threshold=self.threshold,
                    min_samples=self.min_samples,
                )
            )
        return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def parse_model(text: str | None) -> tuple[str | None, int | None]:
    """``NAME`` or ``NAME:V`` (as in `fleet drift --model`) as (name, version)."""
    if not text:
        return None, None
    ref = ModelRef.parse(text)
    if ref.stage is not None:
        raise InvalidArgument(f"--model {text!r}: give NAME or NAME:VERSION, not a stage")
    return ref.name, ref.version


__all__ = [
    "BY",
    "DEFAULT_THRESHOLD",
    "DEFAULT_WINDOW_S",
    "FLEET",
    "NO_GROUP",
    "DriftMonitor",
    "DriftRow",
    "check_by",
    "parse_model",
]
