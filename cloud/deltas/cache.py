"""Deltas built on demand (at deploy time) and kept: bytes in the artifact store,
records in `DeltaStore`. A pair whose delta is not worth sending is remembered as such."""

from __future__ import annotations

import logging

from edgefleet.cloud.artifacts import ArtifactStore
from edgefleet.cloud.deltas.build import KEEP_RATIO, build_delta
from edgefleet.cloud.deltas.store import NONE, DeltaRecord, DeltaStore
from edgefleet.protos.errors import DataLoss, NotFound

logger = logging.getLogger(__name__)


class DeltaCache:
    def __init__(
        self, store: ArtifactStore, records: DeltaStore, *, keep_ratio: float = KEEP_RATIO
    ) -> None:
        self.store = store
        self.records = records
        self.keep_ratio = keep_ratio

    def get_or_build(self, base_sha256: str, target_sha256: str) -> DeltaRecord | None:
        """The delta from base to target, built now if never tried; None when none is
        worth sending or the base is not in the artifact store (blocking)."""
        if base_sha256 == target_sha256:
            return None
        rec = self.records.get(base_sha256, target_sha256)
        if rec is not None and (not rec.usable or self.store.exists(rec.sha256)):
            return rec if rec.usable else None
        try:
            base = self.store.get(base_sha256)
            target = self.store.get(target_sha256)
        except (NotFound, DataLoss) as e:
            logger.info("no delta %s -> %s: %s", base_sha256[:12], target_sha256[:12], e)
            return None
        built = build_delta(base, target, keep_ratio=self.keep_ratio)
        if built is None:
            rec = DeltaRecord(base_sha256, target_sha256, NONE, "", 0, len(target))
            logger.info(
                "no delta %s -> %s is under %.0f%% of %d bytes: full artifact",
                base_sha256[:12],
                target_sha256[:12],
                100 * self.keep_ratio,
                len(target),
            )
        else:
            ref = self.store.put(built.data)
            rec = DeltaRecord(
                base_sha256,
                target_sha256,
                built.format.label,
                ref.sha256,
                ref.size,
                len(target),
                int(built.build_s * 1000),
            )
            logger.info(
                "delta %s -> %s: %s, %d of %d bytes (%.1f%%)",
                base_sha256[:12],
                target_sha256[:12],
                rec.format,
                rec.size,
                rec.target_size,
                100 * rec.ratio,
            )
        self.records.put(rec)
        return rec if rec.usable else None

    def load(self, rec: DeltaRecord) -> bytes:
        """The delta's bytes; `DataLoss` if the stored blob was altered (then forgotten,
        so the next deploy builds it again)."""
        try:
            return self.store.get(rec.sha256)
        except (DataLoss, NotFound):
            self.records.forget(rec.base_sha256, rec.target_sha256)
            raise
