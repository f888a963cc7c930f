"""RegistryStore contract: one suite, run against SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgefleet.cloud.registry import (
    STAGES,
    Lineage,
    ModelRef,
    NewVariant,
    NewVersion,
    RegistryStore,
    open_registry,
)
from edgefleet.cloud.registry.entities import check_stage
from edgefleet.protos.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from edgefleet.protos.manifest import TensorSpec

# -- helpers --------------------------------------------------------------------------


def new_version(
    arch: str = "tiny_mlp", *, acc: float = 0.9, parent: int | None = None
) -> NewVersion:
    return NewVersion(
        arch=arch,
        inputs=(TensorSpec("x", "float32", (-1, 64)),),
        outputs=(TensorSpec("logits", "float32", (-1, 10)),),
        classes=tuple(str(i) for i in range(10)),
        metrics={"accuracy": acc, "loss": 0.25},
        lineage=Lineage(
            source="train",
            parent_version=parent,
            dataset_name="digits",
            dataset_digest="d" * 64,
            training_config={"epochs": 3, "lr": 0.01},
            code_version="abc123",
        ),
        checkpoint_sha256="c" * 64,
        evalset_sha256="e" * 64,
    )


def new_variant(
    name: str = "fp32", *, sha: str = "a" * 64, manifest: bytes = b"manifest"
) -> NewVariant:
    return NewVariant(
        name=name,
        runtime="onnxruntime",
        sha256=sha,
        size=1234,
        accuracy=0.91,
        latency_ms={"b1": 0.5, "b64": 3.25},
        quantization={"mode": name},
        deployable=True,
        reason="",
        signed_manifest=manifest,
    )


def versions_of(reg: RegistryStore, model: str) -> list[int]:
    return [v.version for v in reg.list_versions(model)]


def model_names(reg: RegistryStore) -> list[str]:
    return [m.name for m in reg.list_models()]


# -- create_version -------------------------------------------------------------------


def test_create_version_roundtrips_every_field(registry: RegistryStore) -> None:
    manifest = b"\x00\x01signed\xff"
    made = registry.create_version(
        "digits", new_version(), lambda n: [new_variant(manifest=manifest)]
    )
    got = registry.get_version(ModelRef("digits", 1))

    for mv in (made, got):
        assert (mv.model, mv.version, mv.stage, mv.ref) == ("digits", 1, "none", "digits:1")
        assert mv.arch == "tiny_mlp"
        assert mv.inputs == (TensorSpec("x", "float32", (-1, 64)),)
        assert mv.outputs == (TensorSpec("logits", "float32", (-1, 10)),)
        assert mv.classes == tuple(str(i) for i in range(10))
        assert dict(mv.metrics) == {"accuracy": 0.9, "loss": 0.25}
        assert mv.lineage == new_version().lineage
        assert mv.checkpoint_sha256 == "c" * 64
        assert mv.evalset_sha256 == "e" * 64
        assert [v.name for v in mv.variants] == ["fp32"]
        v = mv.variant("fp32")
        assert v.signed_manifest == manifest
        assert isinstance(v.signed_manifest, bytes)
        assert (v.sha256, v.size, v.accuracy, v.deployable) == ("a" * 64, 1234, 0.91, True)
        assert dict(v.latency_ms) == {"b1": 0.5, "b64": 3.25}
        assert dict(v.quantization) == {"mode": "fp32"}


def test_versions_are_numbered_per_model(registry: RegistryStore) -> None:
    numbers = [
        (m, registry.create_version(m, new_version()).version)
        for m in ("alpha", "alpha", "beta", "alpha", "beta")
    ]
    assert numbers == [("alpha", 1), ("alpha", 2), ("beta", 1), ("alpha", 3), ("beta", 2)]
    assert versions_of(registry, "alpha") == [1, 2, 3]  # oldest first
    assert versions_of(registry, "beta") == [1, 2]


def test_variants_callable_gets_the_allocated_number(registry: RegistryStore) -> None:
    seen: list[int] = []

    def variants(n: int) -> Sequence[NewVariant]:
        seen.append(n)
        return [new_variant("fp32", manifest=f"digits:{n}".encode()), new_variant("int8")]

    registry.create_version("digits", new_version())
    mv = registry.create_version("digits", new_version(), variants)
    assert seen == [2]
    assert mv.variant("fp32").signed_manifest == b"digits:2"
    assert {v.name for v in registry.get_version(ModelRef("digits", 2)).variants} == {
        "fp32",
        "int8",
    }


def test_failing_variants_leave_no_version_and_no_model(registry: RegistryStore) -> None:
    def boom(n: int) -> Sequence[NewVariant]:
        raise RuntimeError(f"quantize failed for version {n}")

    with pytest.raises(RuntimeError, match="version 1"):
        registry.create_version("digits", new_version(), boom)

    assert "digits" not in model_names(registry)
    with pytest.raises(NotFound, match="model 'digits' not in the registry"):
        registry.list_versions("digits")


def test_failing_variants_leave_existing_versions_gap_free(registry: RegistryStore) -> None:
    registry.create_version("digits", new_version())

    def boom(n: int) -> Sequence[NewVariant]:
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        registry.create_version("digits", new_version(), boom)
    assert versions_of(registry, "digits") == [1]
    # the failed attempt's number is not burnt
    assert registry.create_version("digits", new_version()).version == 2


def test_duplicate_variant_names_reject_the_whole_version(registry: RegistryStore) -> None:
    with pytest.raises(InvalidArgument, match="variant name\\(s\\) given twice: fp32"):
        registry.create_version(
            "digits", new_version(), lambda n: [new_variant("fp32"), new_variant("fp32")]
        )
    assert "digits" not in model_names(registry)


@pytest.mark.parametrize("bad", ["Digits", "has space", "", "-leading", "x" * 64])
def test_create_version_rejects_bad_model_names(registry: RegistryStore, bad: str) -> None:
    with pytest.raises(InvalidArgument, match="model name"):
        registry.create_version(bad, new_version())
    assert model_names(registry) == []


# -- reads --------------------------------------------------------------------------------


def test_get_version_by_number_latest_and_stage(registry: RegistryStore) -> None:
    for acc in (0.7, 0.8, 0.9):
        registry.create_version("digits", new_version(acc=acc))
    registry.set_stage("digits", 2, "production")

    assert registry.get_version(ModelRef.parse("digits:1")).metrics["accuracy"] == 0.7
    assert registry.get_version(ModelRef.parse("digits")).version == 3
    assert registry.get_version(ModelRef.parse("digits:latest")).version == 3
    prod = registry.get_version(ModelRef.parse("digits@production"))
    assert (prod.version, prod.stage, prod.metrics["accuracy"]) == (2, "production", 0.8)


def test_unknown_version_names_the_versions_that_exist(registry: RegistryStore) -> None:
    registry.create_version("digits", new_version())
    registry.create_version("digits", new_version())
    registry.set_stage("digits", 1, "staging")

    with pytest.raises(
        NotFound, match=re.escape("model 'digits' has no version 7; versions: 1 (staging), 2")
    ):
        registry.get_version(ModelRef("digits", 7))
    with pytest.raises(
        NotFound, match=re.escape("no version in stage 'production'; versions: 1 (staging), 2")
    ):
        registry.get_version(ModelRef.parse("digits@production"))


def test_unknown_model_names_the_models_that_exist(registry: RegistryStore) -> None:
    with pytest.raises(NotFound, match="model 'ghost' not in the registry; models: none yet"):
        registry.get_version(ModelRef("ghost"))
    registry.create_version("beta", new_version())
    registry.create_version("alpha", new_version())
    with pytest.raises(
        NotFound, match=re.escape("model 'ghost' not in the registry; models: alpha, beta")
    ):
        registry.get_version(ModelRef("ghost", 1))
    with pytest.raises(NotFound, match="models: alpha, beta"):
        registry.list_versions("ghost")


def test_unknown_variant_names_the_variants_that_exist(registry: RegistryStore) -> None:
    mv = registry.create_version(
        "digits", new_version(), lambda n: [new_variant("fp32"), new_variant("int8")]
    )
    with pytest.raises(
        NotFound, match=re.escape("digits:1 has no variant 'fp16'; variants: fp32, int8")
    ):
        mv.variant("fp16")


def test_list_models_summarises_each_model(registry: RegistryStore) -> None:
    assert registry.list_models() == []
    for m in ("beta", "alpha", "alpha", "alpha"):
        registry.create_version(m, new_version())
    registry.set_stage("alpha", 2, "production")

    summaries = {s.name: s for s in registry.list_models()}
    assert [s.name for s in registry.list_models()] == ["alpha", "beta"]  # by name
    a, b = summaries["alpha"], summaries["beta"]
    assert (a.versions, a.latest_version, a.production_version) == (3, 3, 2)
    assert (b.versions, b.latest_version, b.production_version) == (1, 1, None)


def test_timestamps_are_timezone_aware_utc(registry: RegistryStore, registry_url: str) -> None:
    before = datetime.now(UTC)
    made = registry.create_version("digits", new_version(), lambda n: [new_variant()])
    got = registry.get_version(ModelRef("digits", 1))
    stamps = {
        "created version": made.created_at,
        "created variant": made.variants[0].created_at,
        "read version": got.created_at,
        "read variant": got.variants[0].created_at,
        "model summary": registry.list_models()[0].created_at,
    }
    naive = sorted(what for what, ts in stamps.items() if ts.tzinfo is None)
    assert naive == [], f"naive datetimes from {registry_url.split(':')[0]}: {naive}"
    for ts in stamps.values():  # and they are the same instant on every backend
        assert before - timedelta(seconds=5) <= ts <= datetime.now(UTC)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(new_variant("v" * 33), id="name-33-chars"),
        pytest.param(dataclasses.replace(new_variant(), runtime="r" * 33), id="runtime-33-chars"),
    ],
)
def test_over_long_variant_fields_are_invalid_on_every_backend(
    registry: RegistryStore, variant: NewVariant
) -> None:
    with pytest.raises(InvalidArgument):
        registry.create_version("digits", new_version(), lambda n: [variant])
    assert model_names(registry) == []


# -- add_variants ---------------------------------------------------------------------


def test_add_variants_attaches_to_an_existing_version(registry: RegistryStore) -> None:
    registry.create_version("digits", new_version(), lambda n: [new_variant("fp32")])
    mv = registry.add_variants("digits", 1, [new_variant("int8", sha="b" * 64)])
    assert {v.name for v in mv.variants} == {"fp32", "int8"}
    stored = registry.get_version(ModelRef("digits", 1))
    assert stored.variant("int8").sha256 == "b" * 64


def test_add_variants_clash_raises_already_exists_and_changes_nothing(
    registry: RegistryStore,
) -> None:
    registry.create_version("digits", new_version(), lambda n: [new_variant("fp32", sha="a" * 64)])
    with pytest.raises(AlreadyExists, match="digits:1 already has variant\\(s\\) fp32"):
        registry.add_variants(
            "digits", 1, [new_variant("int8", sha="b" * 64), new_variant("fp32", sha="f" * 64)]
        )
    after = registry.get_version(ModelRef("digits", 1))
    assert [v.name for v in after.variants] == ["fp32"]  # all or none: int8 not added either
    assert after.variant("fp32").sha256 == "a" * 64


def test_add_variants_replace_rebuilds_the_clashing_ones(registry: RegistryStore) -> None:
    registry.create_version(
        "digits", new_version(), lambda n: [new_variant("fp32", sha="a" * 64), new_variant("int8")]
    )
    mv = registry.add_variants("digits", 1, [new_variant("fp32", sha="f" * 64)], replace=True)
    by_name = {v.name: v for v in mv.variants}
    assert sorted(by_name) == ["fp32", "int8"]
    assert by_name["fp32"].sha256 == "f" * 64
    stored = registry.get_version(ModelRef("digits", 1))
    assert len(stored.variants) == 2
    assert stored.variant("fp32").sha256 == "f" * 64


def test_add_variants_to_unknown_version_is_not_found(registry: RegistryStore) -> None:
    registry.create_version("digits", new_version())
    with pytest.raises(NotFound, match=re.escape("has no version 5; versions: 1")):
        registry.add_variants("digits", 5, [new_variant()])


def test_add_variants_with_duplicate_names_is_invalid(registry: RegistryStore) -> None:
    registry.create_version("digits", new_version())
    with pytest.raises(InvalidArgument, match="given twice: int8"):
        registry.add_variants("digits", 1, [new_variant("int8"), new_variant("int8")])
    assert registry.get_version(ModelRef("digits", 1)).variants == ()


# -- stages ---------------------------------------------------------------------------


def test_set_stage_archives_the_previous_production_version(registry: RegistryStore) -> None:
    for _ in range(3):
        registry.create_version("digits", new_version())
    mv, archived = registry.set_stage("digits", 1, "production")
    assert (mv.version, mv.stage, archived) == (1, "production", [])

    mv, archived = registry.set_stage("digits", 2, "production")
    assert (mv.version, mv.stage, archived) == (2, "production", [1])
    stages = {v.version: v.stage for v in registry.list_versions("digits")}
    assert stages == {1: "archived", 2: "production", 3: "none"}
    assert registry.get_version(ModelRef.parse("digits@production")).version == 2
    assert registry.get_version(ModelRef.parse("digits@archived")).version == 1


def test_set_stage_without_archiving_keeps_both(registry: RegistryStore) -> None:
    registry.create_version("digits", new_version())
    registry.create_version("digits", new_version())
    registry.set_stage("digits", 1, "staging")
    _, archived = registry.set_stage("digits", 2, "staging", archive_existing=False)
    assert archived == []
    assert {v.version: v.stage for v in registry.list_versions("digits")} == {
        1: "staging",
        2: "staging",
    }
    assert registry.get_version(ModelRef.parse("digits@staging")).version == 2  # newest wins


def test_set_stage_only_touches_its_own_model(registry: RegistryStore) -> None:
    registry.create_version("alpha", new_version())
    registry.create_version("beta", new_version())
    registry.set_stage("alpha", 1, "production")
    _, archived = registry.set_stage("beta", 1, "production")
    assert archived == []
    assert registry.get_version(ModelRef.parse("alpha@production")).version == 1


def test_set_stage_rejects_an_unknown_stage(registry: RegistryStore) -> None:
    registry.create_version("digits", new_version())
    with pytest.raises(
        InvalidArgument,
        match=re.escape("stage 'prod' unknown; accepted: none, staging, production, archived"),
    ):
        registry.set_stage("digits", 1, "prod")
    assert registry.get_version(ModelRef("digits", 1)).stage == "none"


def test_set_stage_of_unknown_version_is_not_found(registry: RegistryStore) -> None:
    registry.create_version("digits", new_version())
    with pytest.raises(NotFound, match=re.escape("model 'digits' has no version 2; versions: 1")):
        registry.set_stage("digits", 2, "production")


def test_check_stage() -> None:
    for stage in STAGES:
        assert check_stage(stage) == stage
    for bad in ("Production", "prod", "", "latest"):
        with pytest.raises(
            InvalidArgument, match=f"stage {re.escape(repr(bad))} unknown; accepted: none, staging"
        ):
            check_stage(bad)


# -- ModelRef -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref", "shown"),
    [
        ("digits", ModelRef("digits"), "digits:latest"),
        ("digits:latest", ModelRef("digits"), "digits:latest"),
        (" digits:12 ", ModelRef("digits", 12), "digits:12"),
        ("digits@production", ModelRef("digits", stage="production"), "digits@production"),
        ("kws-v2.small_1", ModelRef("kws-v2.small_1"), "kws-v2.small_1:latest"),
    ],
)
def test_model_ref_parse(text: str, ref: ModelRef, shown: str) -> None:
    assert ModelRef.parse(text) == ref
    assert str(ModelRef.parse(text)) == shown
    assert ModelRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "digits:0",
            "version '0' is not a positive number; accepted: NAME, NAME:N, NAME:latest, NAME@stage",
        ),
        ("digits:-1", "version '-1' is not a positive number"),
        ("digits:abc", "version 'abc' is not a positive number"),
        ("digits:", "version '' is not a positive number"),
        ("digits@prod", "stage 'prod' unknown; accepted: none, staging, production, archived"),
        ("Digits:1", "model name 'Digits'"),
        ("", "model name ''"),
        ("@production", "model name ''"),
    ],
)
def test_model_ref_parse_errors(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(match)):
        ModelRef.parse(text)


# -- concurrency ----------------------------------------------------------------------


def test_concurrent_writers_get_distinct_gap_free_numbers(
    registry: RegistryStore, registry_url: str
) -> None:
    threads_n, per_thread = 4, 5
    barrier = threading.Barrier(threads_n)
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        reg = open_registry(registry_url)  # its own engine and connections
        try:
            barrier.wait(timeout=30)
            mine = got.setdefault(i, [])
            for _ in range(per_thread):
                mv = reg.create_version(
                    "race", new_version(), lambda n: [new_variant(manifest=f"race:{n}".encode())]
                )
                assert mv.variant("fp32").signed_manifest == f"race:{mv.version}".encode()
                mine.append(mv.version)
        except BaseException as e:
            errors.append(e)
        finally:
            reg.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert errors == []

    total = threads_n * per_thread
    numbers = sorted(n for ns in got.values() for n in ns)
    assert numbers == list(range(1, total + 1))  # distinct and gap-free
    for ns in got.values():
        assert ns == sorted(ns)  # each writer sees its own numbers increase
    assert versions_of(registry, "race") == list(range(1, total + 1))
    for mv in registry.list_versions("race"):
        assert mv.variant("fp32").signed_manifest == f"race:{mv.version}".encode()
    assert model_names(registry) == ["race"]


# -- opening --------------------------------------------------------------------------


def test_unreachable_database_is_unavailable_quickly() -> None:
    url = "postgresql://fleet:s3cret@127.0.0.1:1/registry"  # port 1: nothing listens
    t0 = time.monotonic()
    with pytest.raises(
        Unavailable, match=r"registry database .*127\.0\.0\.1:1/registry unreachable"
    ) as ei:
        open_registry(url)
    assert time.monotonic() - t0 < 10
    assert "s3cret" not in str(ei.value)
    assert "fleet:***@" in str(ei.value)


def test_sqlite_in_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "registry.db"
    with pytest.raises(
        Unavailable, match=re.escape(f"registry database sqlite:///{path} unreachable")
    ):
        open_registry(f"sqlite:///{path}")


@pytest.mark.parametrize("url", ["mysql://u:pw@127.0.0.1/db", "mongodb://127.0.0.1/db"])
def test_unsupported_database_backend_is_invalid(url: str) -> None:
    with pytest.raises(InvalidArgument, match="not supported; accepted: sqlite, postgresql") as ei:
        open_registry(url)
    assert ":pw@" not in str(ei.value)


def test_database_url_that_is_not_a_url_is_invalid() -> None:
    with pytest.raises(
        InvalidArgument, match="is not a URL; expected sqlite:///PATH or postgresql://"
    ):
        open_registry("registry.db")
