"""SqlRegistryStore: SQLite (default) or PostgreSQL, chosen by URL."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import stamina
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from edgefleet.cloud.db import DatabaseUser
from edgefleet.cloud.registry.entities import (
    Lineage,
    ModelRef,
    ModelSummary,
    ModelVersion,
    NewVariant,
    NewVersion,
    Variant,
    check_model_name,
    check_stage,
)
from edgefleet.cloud.registry.store import RegistryStore
from edgefleet.cloud.registry.tables import ModelRow, VariantRow, VersionRow
from edgefleet.protos.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from edgefleet.protos.manifest import AGENT_KIND, RUNTIMES, TensorSpec

logger = logging.getLogger(__name__)

_RETRIES = 20


class SqlRegistryStore(DatabaseUser, RegistryStore):
    what = "registry database"

    def close(self) -> None:
        DatabaseUser.close(self)

    def _session(self) -> AbstractContextManager[Session]:
        return self._db.session()

    # -- writes -------------------------------------------------------------------

    def create_version(
        self,
        model: str,
        new: NewVersion,
        variants: Callable[[int], Sequence[NewVariant]] | None = None,
    ) -> ModelVersion:
        check_model_name(model)
        if not 0 < len(new.arch) <= 64:
            raise InvalidArgument(f"arch {new.arch!r}: 1-64 characters")
        try:
            # another writer may take this number (or create the model) first: try again
            for attempt in stamina.retry_context(
                on=IntegrityError, attempts=_RETRIES, wait_initial=0.01, wait_max=0.5, timeout=None
            ):
                with attempt:
                    return self._create_version_once(model, new, variants)
        except IntegrityError:
            raise Conflict(
                f"could not allocate a version of {model!r} after {_RETRIES} attempts"
            ) from None
        raise AssertionError("unreachable: stamina retries or raises")

    def _create_version_once(
        self,
        model: str,
        new: NewVersion,
        variants: Callable[[int], Sequence[NewVariant]] | None,
    ) -> ModelVersion:
        with self._session() as s:
            m = s.exec(select(ModelRow).where(ModelRow.name == model)).first()
            if m is None:
                m = ModelRow(name=model)
                s.add(m)
                s.flush()
            assert m.id is not None
            top = s.exec(
                select(func.max(VersionRow.version)).where(VersionRow.model_id == m.id)
            ).one()
            row = VersionRow(
                model_id=m.id,
                version=(top or 0) + 1,
                arch=new.arch,
                spec={
                    "inputs": [t.to_dict() for t in new.inputs],
                    "outputs": [t.to_dict() for t in new.outputs],
                    "classes": list(new.classes),
                },
                metrics=dict(new.metrics),
                lineage=new.lineage.to_dict(),
                checkpoint_sha256=new.checkpoint_sha256,
                evalset_sha256=new.evalset_sha256,
            )
            s.add(row)
            s.flush()
            assert row.id is not None
            made = variants(row.version) if variants else ()
            _check_variant_names(made)
            for v in made:
                s.add(_variant_row(row.id, v))
            s.commit()
            logger.info("registered %s:%d", model, row.version)
            return self._load(s, m, row)

    def add_variants(
        self, model: str, version: int, variants: Sequence[NewVariant], *, replace: bool = False
    ) -> ModelVersion:
        _check_variant_names(variants)
        with self._session() as s:
            m, row = self._find(s, ModelRef(model, version))
            assert row.id is not None
            existing = {
                r.name: r for r in s.exec(select(VariantRow).where(VariantRow.version_id == row.id))
            }
            clash = sorted(set(existing) & {v.name for v in variants})
            if clash and not replace:
                raise AlreadyExists(
                    f"{model}:{version} already has variant(s) {', '.join(clash)}; "
                    "pass --force to rebuild them"
                )
            for name in clash:
                s.delete(existing[name])
            s.flush()
            for v in variants:
                s.add(_variant_row(row.id, v))
            try:
                s.commit()
            except IntegrityError:
                raise Conflict(
                    f"{model}:{version}: variants changed concurrently; try again"
                ) from None
            return self._load(s, m, row)

    def set_stage(
        self, model: str, version: int, stage: str, *, archive_existing: bool = True
    ) -> tuple[ModelVersion, list[int]]:
        check_stage(stage)
        with self._session() as s:
            m, row = self._find(s, ModelRef(model, version))
            archived: list[int] = []
            if archive_existing and stage in ("staging", "production"):
                others = s.exec(
                    select(VersionRow).where(
                        VersionRow.model_id == m.id,
                        VersionRow.stage == stage,
                        VersionRow.id != row.id,
                    )
                ).all()
                for o in others:
                    o.stage = "archived"
                    s.add(o)
                    archived.append(o.version)
            row.stage = stage
            s.add(row)
            s.commit()
            return self._load(s, m, row), sorted(archived)

    # -- reads ----------------------------------------------------------------------

    def get_version(self, ref: ModelRef) -> ModelVersion:
        with self._session() as s:
            m, row = self._find(s, ref)
            return self._load(s, m, row)

    def list_models(self) -> list[ModelSummary]:
        with self._session() as s:
            out = []
            for m in s.exec(select(ModelRow).order_by(col(ModelRow.name))):
                rows = s.exec(select(VersionRow).where(VersionRow.model_id == m.id)).all()
                prod = [r.version for r in rows if r.stage == "production"]
                out.append(
                    ModelSummary(
                        name=m.name,
                        created_at=m.created_at,
                        versions=len(rows),
                        latest_version=max((r.version for r in rows), default=None),
                        production_version=max(prod, default=None),
                    )
                )
            return out

    def list_versions(self, model: str) -> list[ModelVersion]:
        with self._session() as s:
            m = self._model(s, model)
            rows = s.exec(
                select(VersionRow)
                .where(VersionRow.model_id == m.id)
                .order_by(col(VersionRow.version))
            ).all()
            return [self._load(s, m, r) for r in rows]

    # -- helpers --------------------------------------------------------------------

    def _model(self, s: Session, name: str) -> ModelRow:
        m = s.exec(select(ModelRow).where(ModelRow.name == name)).first()
        if m is None:
            names = [r for r in s.exec(select(ModelRow.name).order_by(col(ModelRow.name)))]
            have = ", ".join(names) if names else "none yet (fleet train or fleet models import)"
            raise NotFound(f"model {name!r} not in the registry; models: {have}")
        return m

    def _find(self, s: Session, ref: ModelRef) -> tuple[ModelRow, VersionRow]:
        m = self._model(s, ref.name)
        q = select(VersionRow).where(VersionRow.model_id == m.id)
        if ref.version is not None:
            q = q.where(VersionRow.version == ref.version)
        elif ref.stage is not None:
            q = q.where(VersionRow.stage == ref.stage)
        row = s.exec(q.order_by(col(VersionRow.version).desc())).first()
        if row is None:
            versions = s.exec(
                select(VersionRow.version, VersionRow.stage)
                .where(VersionRow.model_id == m.id)
                .order_by(col(VersionRow.version))
            ).all()
            have = ", ".join(f"{v}" + (f" ({st})" if st != "none" else "") for v, st in versions)
            what = (
                f"no version {ref.version}"
                if ref.version is not None
                else f"no version in stage {ref.stage!r}"
            )
            raise NotFound(f"model {ref.name!r} has {what}; versions: {have or 'none'}")
        return m, row

    def _load(self, s: Session, m: ModelRow, row: VersionRow) -> ModelVersion:
        vrows = s.exec(
            select(VariantRow).where(VariantRow.version_id == row.id).order_by(col(VariantRow.id))
        ).all()
        spec = row.spec
        return ModelVersion(
            model=m.name,
            version=row.version,
            stage=row.stage,
            created_at=row.created_at,
            arch=row.arch,
            inputs=tuple(TensorSpec.from_dict(t) for t in spec["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in spec["outputs"]),
            classes=tuple(spec.get("classes", [])),
            metrics=dict(row.metrics),
            lineage=Lineage.from_dict(row.lineage),
            checkpoint_sha256=row.checkpoint_sha256,
            evalset_sha256=row.evalset_sha256,
            variants=tuple(
                Variant(
                    name=v.name,
                    runtime=v.runtime,
                    sha256=v.sha256,
                    size=v.size,
                    accuracy=v.accuracy,
                    latency_ms=dict(v.latency_ms),
                    quantization=dict(v.quantization),
                    deployable=v.deployable,
                    reason=v.reason,
                    signed_manifest=bytes(v.signed_manifest),
                    created_at=v.created_at,
                )
                for v in vrows
            ),
        )


def _variant_row(version_id: int, v: NewVariant) -> VariantRow:
    return VariantRow(
        version_id=version_id,
        name=v.name,
        runtime=v.runtime,
        sha256=v.sha256,
        size=v.size,
        accuracy=v.accuracy,
        latency_ms=dict(v.latency_ms),
        quantization=dict(v.quantization),
        deployable=v.deployable,
        reason=v.reason,
        signed_manifest=v.signed_manifest,
    )


_VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_variant_names(variants: Sequence[NewVariant]) -> None:
    for v in variants:
        if not _VARIANT_NAME.match(v.name):
            raise InvalidArgument(
                f"variant name {v.name!r}: use 1-32 lowercase letters, digits, '.', '_' or '-'"
            )
        if v.runtime not in RUNTIMES and v.runtime != AGENT_KIND:  # agent releases: no runtime
            raise InvalidArgument(
                f"variant {v.name!r}: runtime {v.runtime!r} unknown; accepted: {', '.join(RUNTIMES)}"
            )
        if not _SHA256.match(v.sha256):
            raise InvalidArgument(
                f"variant {v.name!r}: sha256 {v.sha256!r} is not 64 lowercase hex"
            )
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidArgument(f"variant name(s) given twice: {', '.join(dup)}")
