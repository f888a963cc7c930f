"""Every gRPC conversion in cloud/api/convert.py round-trips: value -> message -> value.

What the contract does not carry is named where it is dropped (a version's evalset
digest, a rollout device's artifact digest, a device's enrolment time); times travel
in milliseconds, so generated times have millisecond precision.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.cloud.api import convert
from edgefleet.cloud.client import EnrollmentBundle
from edgefleet.cloud.devices import Device, Selector
from edgefleet.cloud.devices.values import (
    Accelerator,
    Capabilities,
    ReasonCode,
    Reported,
    ServedModel,
    UpdateState,
)
from edgefleet.cloud.fl.federation import FlEnrollment, RunRequest
from edgefleet.cloud.fl.store import FlRun
from edgefleet.cloud.registry import ModelRef, ModelSummary, ModelVersion
from edgefleet.cloud.registry.entities import Lineage, Variant
from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice, Stage
from edgefleet.cloud.rollouts.model import (
    DevicePhase,
    GateResult,
    RolloutState,
    StageState,
)
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.manifest import DTYPES, RUNTIMES, TensorSpec

MS = st.integers(min_value=1, max_value=4_102_444_800_000)  # up to 2100
WHEN = MS.map(lambda ms: datetime.fromtimestamp(ms / 1000, UTC))
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
NAME = st.from_regex(r"[a-z][a-z0-9-]{0,11}", fullmatch=True)
HEX = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
FLOAT = st.floats(allow_nan=False, allow_infinity=False, width=64)
JSONISH = st.dictionaries(
    NAME, st.one_of(st.integers(-1000, 1000), TEXT, st.booleans()), max_size=3
)


@given(MS)
def test_times_round_trip(ms: int) -> None:
    assert convert._ms(convert._dt(ms)) == ms
    assert convert._ms_s(convert._s_ms(ms)) == ms
    assert convert._ms(None) == 0 and convert._s_ms(0) == 0.0


specs = st.builds(
    TensorSpec,
    NAME,
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(-1, 4096), max_size=4).map(tuple),
)


@st.composite
def versions(draw: st.DrawFn) -> ModelVersion:
    created = draw(WHEN)
    variants = tuple(
        Variant(
            name=name,
            runtime=draw(st.sampled_from(sorted(RUNTIMES))),
            sha256=draw(HEX),
            size=draw(st.integers(0, 2**40)),
            accuracy=draw(st.none() | st.floats(0, 1)),
            latency_ms=draw(st.dictionaries(NAME, st.floats(0, 1e6), max_size=3)),
            quantization=draw(JSONISH),
            deployable=draw(st.booleans()),
            reason=draw(TEXT),
            signed_manifest=draw(st.binary(max_size=64)),
            created_at=created,  # the contract carries the version's time for its variants
        )
        for name in draw(st.lists(NAME, max_size=3, unique=True))
    )
    return ModelVersion(
        arch=draw(NAME),
        inputs=tuple(draw(st.lists(specs, min_size=1, max_size=2))),
        outputs=tuple(draw(st.lists(specs, min_size=1, max_size=2))),
        classes=tuple(draw(st.lists(TEXT, max_size=4))),
        metrics=draw(st.dictionaries(NAME, FLOAT, max_size=3)),
        lineage=Lineage(
            source=draw(st.sampled_from(["train", "import", "federated"])),
            parent_version=draw(st.none() | st.integers(1, 10_000)),
            dataset_name=draw(TEXT),
            dataset_digest=draw(HEX),
            training_config=draw(JSONISH),
            code_version=draw(TEXT),
            federated=draw(st.none() | JSONISH),
            origin=draw(JSONISH),
        ),
        checkpoint_sha256=draw(st.none() | HEX),
        evalset_sha256=None,  # stays on the coordinator
        model=draw(NAME),
        version=draw(st.integers(1, 10_000)),
        stage=draw(st.sampled_from(["none", "staging", "production", "archived"])),
        created_at=created,
        variants=variants,
    )


@settings(max_examples=60)
@given(versions())
def test_model_version_round_trips(mv: ModelVersion) -> None:
    assert convert.version_from_pb(convert.version_to_pb(mv)) == mv


@given(NAME, WHEN, st.integers(0, 1000), st.none() | st.integers(1, 1000))
def test_model_summary_round_trips(name: str, when: datetime, n: int, prod: int | None) -> None:
    s = ModelSummary(name, when, n, n or None, prod)
    assert convert.summary_from_pb(convert.summary_to_pb(s)) == s


@given(
    st.builds(
        EnrollmentBundle,
        device_id=NAME,
        broker_url=st.just("mqtts://broker.example:8883"),
        signing_public_key=TEXT,
        topic_prefix=NAME,
        group=NAME,
        tags=st.dictionaries(NAME, NAME, max_size=3),
        username=st.none() | NAME,
        password=st.none() | NAME,
        ca_certificate=st.none() | NAME,
    )
)
def test_enrollment_bundle_round_trips(b: EnrollmentBundle) -> None:
    assert convert.bundle_from_pb(convert.bundle_to_pb(b)) == b


U32 = st.integers(0, 2**32 - 1)
U63 = st.integers(0, 2**63 - 1)
served = st.builds(ServedModel, NAME, U32, NAME, HEX)
capabilities = st.builds(
    Capabilities,
    machine=NAME,
    runtimes=st.lists(NAME, max_size=3).map(tuple),
    providers=st.lists(NAME, max_size=3).map(tuple),
    accelerator=st.sampled_from(Accelerator),
    memory_mb=U63,
    tflite_runtime_legacy=st.booleans(),
    features=st.lists(NAME, max_size=3).map(tuple),
)
reports = st.builds(
    Reported,
    device_id=NAME,
    generation=U63,
    state=st.sampled_from(UpdateState),
    reason=st.sampled_from(ReasonCode),
    detail=TEXT,
    active=st.none() | served,
    last_known_good=st.none() | served,
    chunks_have=U32,
    chunks_total=U32,
    provider=NAME,
    timestamp_ms=MS,
)


@given(st.sampled_from(UpdateState), st.sampled_from(ReasonCode))
def test_update_states_and_reasons_round_trip(state: UpdateState, reason: ReasonCode) -> None:
    assert convert.update_state_from_pb(convert.update_state_to_pb(state)) is state
    assert convert.reason_from_pb(convert.reason_to_pb(reason)) is reason


def test_every_protobuf_enum_number_has_a_value_and_unknown_ones_are_refused() -> None:
    from edgefleet.protos.fleet.v1 import device_pb2

    assert {convert.update_state_to_pb(s) for s in UpdateState} == set(
        device_pb2.UpdateState.values()
    )
    assert {convert.reason_to_pb(r) for r in ReasonCode} == set(device_pb2.ReasonCode.values())
    with pytest.raises(InvalidArgument, match="update state 99 unknown; accepted: 0..9"):
        convert.update_state_from_pb(99)
    with pytest.raises(
        InvalidArgument,
        match=f"reason code 1234 unknown; accepted: 0..{max(device_pb2.ReasonCode.values())}",
    ):
        convert.reason_from_pb(1234)
    with pytest.raises(InvalidArgument, match="accelerator 'quantum' unknown; accepted: cpu"):
        convert.capabilities_from_pb(device_pb2.Capabilities(accelerator="quantum"))


@given(capabilities, reports)
def test_device_values_round_trip(caps: Capabilities, rep: Reported) -> None:
    assert convert.capabilities_from_pb(convert.capabilities_to_pb(caps)) == caps
    assert convert.reported_from_pb(convert.reported_to_pb(rep)) == rep


@given(
    st.builds(
        Device,
        device_id=NAME,
        group=NAME,
        tags=st.dictionaries(NAME, TEXT, max_size=2),
        enrolled_at=st.just(datetime.fromtimestamp(0, UTC)),  # not carried: the epoch comes back
        online=st.booleans(),
        last_seen=st.none() | WHEN,
        agent_version=NAME,
        capabilities=st.none() | capabilities,
        active=st.none() | served,
        reported=st.none() | reports,
        desired_generation=U63,
        rollout_id=st.just(""),  # not carried
    )
)
def test_device_round_trips_what_the_contract_carries(d: Device) -> None:
    assert convert.device_from_pb(convert.device_to_pb(d)) == d


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    canary, waves = draw(
        st.sampled_from([(1.0, ()), (0.05, (1.0,)), (0.1, (0.5, 1.0)), (0.25, (0.5, 0.75, 1.0))])
    )
    return Policy(
        canary=canary,
        waves=waves,
        bake_s=draw(st.floats(0, 3600)),
        max_failure_rate=draw(st.floats(0, 1)),
        max_latency_regression=draw(st.none() | st.floats(0, 99)),
        max_memory_mb=draw(st.none() | st.floats(1, 4096)),
        min_agreement=draw(st.none() | st.floats(0.01, 1)),
        min_accuracy=draw(st.none() | st.floats(0.01, 1)),
        on_failure=draw(st.sampled_from(["rollback", "pause"])),
        min_samples=draw(st.integers(1, 1000)),
        stage_timeout_s=draw(st.floats(1, 3600)),
        sample_rate=draw(st.floats(0.01, 1)),
    )


@given(policies())
def test_rollout_policy_round_trips(p: Policy) -> None:
    assert convert.policy_from_pb(convert.policy_to_pb(p)) == p


SECONDS = st.integers(0, 4_102_444_800_000).map(lambda ms: ms / 1000)  # ms precision
gates = st.builds(GateResult, NAME, st.booleans(), FLOAT, FLOAT, TEXT)
stages = st.builds(
    Stage,
    name=NAME,
    fraction=st.floats(0.01, 1),
    devices=st.integers(0, 10_000),
    state=st.sampled_from(StageState),
    started_at=SECONDS,
    bake_started_at=SECONDS,
    finished_at=SECONDS,
    gates=st.lists(gates, max_size=2).map(tuple),
    samples=st.integers(0, 10_000),
    by_state=st.dictionaries(NAME, st.integers(0, 10_000), max_size=3),
)


@st.composite
def rollouts(draw: st.DrawFn) -> tuple[Rollout, list[RolloutDevice]]:
    rid, model, version = draw(NAME), draw(NAME), draw(st.integers(1, 1000))
    r = Rollout(
        rollout_id=rid,
        ref=f"{model}:{version}",
        model=model,
        version=version,
        selector=draw(st.sampled_from(["all", "group=lab", "tag=site=paris"])),
        policy=draw(policies()),
        state=draw(st.sampled_from(RolloutState)),
        stages=tuple(draw(st.lists(stages, min_size=1, max_size=3))),
        stage=draw(st.integers(0, 2)),
        reason=draw(TEXT),
        created_at=draw(SECONDS),
        updated_at=draw(SECONDS),
        finished_at=draw(SECONDS),
        skipped=draw(st.dictionaries(NAME, TEXT, max_size=2)),
        dry_run=draw(st.booleans()),
    )
    devices = draw(
        st.lists(
            st.builds(
                RolloutDevice,
                rollout_id=st.just(rid),
                device_id=NAME,
                stage=st.integers(0, 2),
                variant=NAME,
                sha256=st.just(""),  # not carried
                previous=st.none() | served,
                phase=st.sampled_from(DevicePhase),
                action=st.just(""),  # not carried
                generation=U63,
                state=st.none() | st.sampled_from(UpdateState),
                reason=NAME,
                detail=TEXT,
                last_seen=SECONDS,
                shadow=st.dictionaries(NAME, FLOAT, max_size=2),
            ),
            max_size=3,
        )
    )
    return r, devices


@settings(max_examples=50)
@given(rollouts())
def test_rollout_and_its_devices_round_trip(pair: tuple[Rollout, list[RolloutDevice]]) -> None:
    r, devices = pair
    back, back_devices = convert.rollout_from_pb(convert.rollout_to_pb(r, devices, now=1.0e9))
    # activated_at and eta are the controller's own bookkeeping: not carried
    assert back == dataclasses.replace(
        r, stages=tuple(dataclasses.replace(s, activated_at=0.0, eta=0.0) for s in r.stages)
    )
    assert back_devices == devices


@given(
    st.builds(
        FlRun,
        run_id=NAME,
        model=NAME,
        parent_version=st.integers(1, 100),
        strategy=st.sampled_from(["fedavg", "fedmedian"]),
        rounds=st.integers(1, 50),
        config=JSONISH,
        status=st.sampled_from(["pending", "running", "succeeded", "failed"]),
        reason=TEXT,
        participants=st.lists(NAME, max_size=3).map(tuple),
        skipped=st.dictionaries(NAME, TEXT, max_size=2),
        history=st.lists(JSONISH, max_size=2).map(tuple),
        flower_run_id=st.none() | st.integers(1, 2**64 - 1),
        result_version=st.none() | st.integers(1, 100),
        deploy=JSONISH,
        created_at=WHEN,
        finished_at=st.none() | WHEN,
    )
)
def test_federated_run_round_trips(run: FlRun) -> None:
    assert convert.run_from_pb(convert.run_to_pb(run)) == run


def test_federated_run_request_and_enrollment_round_trip() -> None:
    req = RunRequest(
        ref=ModelRef("digits", 3),
        rounds=5,
        strategy="fedmedian",
        min_clients=3,
        fraction=0.5,
        local_epochs=2,
        lr=0.01,
        dp_clip=1.0,
        dp_noise=0.1,
        selector=Selector.parse("group=shops"),
        then_deploy="canary=10%",
        round_timeout=30.0,
        join_timeout=20.0,
        min_samples=50,
        idle_only=True,
        variants=("int8",),
        deploy_timeout=60.0,
    )
    assert convert.request_from_pb(convert.request_to_pb(req)) == req
    # unset fields come back as the defaults
    assert convert.request_from_pb(
        convert.request_to_pb(RunRequest(ModelRef("digits", 1)))
    ) == dataclasses.replace(RunRequest(ModelRef("digits", 1)))
    e = FlEnrollment("dev-1", "10.0.0.1:9092", "CA PEM", "KEY PEM", 18_446_744_073_709_551_615)
    assert convert.enrollment_from_pb(convert.enrollment_to_pb(e)) == e
