"""The ModelHolder observer hook and on-device shadow evaluation, with real ONNX models."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from edgefleet.agent import serde
from edgefleet.agent.inference import ModelHolder, Observation, load
from edgefleet.agent.serde import ShadowSettings
from edgefleet.agent.shadow import ShadowEvaluator
from edgefleet.cloud.inbound import decode_shadow_report
from edgefleet.protos.errors import InvalidArgument
from tests.unit.test_inference_server import Built, _export, _manifest, _x


@pytest.fixture(scope="module")
def v1() -> Built:
    data = _export(seed=1)
    return Built(_manifest(data, 1), data)


@pytest.fixture(scope="module")
def v2() -> Built:
    data = _export(seed=2)
    return Built(_manifest(data, 2), data)


def test_observers_see_each_successful_prediction_with_its_labels(v1: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))
    seen: list[Observation] = []
    remove = holder.add_observer(seen.append)

    def broken(_obs: Observation) -> None:
        raise RuntimeError("observer bug")

    holder.add_observer(broken)
    x = _x(2)
    y, model = holder.predict(x, labels=(3, 4))  # the broken observer does not fail it
    assert len(seen) == 1 and seen[0].labels == (3, 4) and seen[0].model is model
    assert np.array_equal(seen[0].outputs, y) and seen[0].inputs is x
    with pytest.raises(InvalidArgument):
        holder.predict(np.zeros((1, 3), np.float32))
    assert len(seen) == 1  # failures are not observed
    remove()
    holder.predict(x)
    assert len(seen) == 1


def test_labels_must_match_the_rows() -> None:
    req = serde.encode_predict_request(_x(3), request_id="r", labels=[1, 2])
    with pytest.raises(InvalidArgument, match="2 labels for 3 input rows"):
        serde.decode_predict_request(req)


def _evaluate(holder: ModelHolder, candidate: Built, rate: float, rows: int) -> bytes:
    published: list[bytes] = []

    async def publish(p: bytes) -> None:
        published.append(p)

    shadow = ShadowEvaluator(
        device_id="dev-1",
        holder=holder,
        candidate=holder.prepare(load(candidate.manifest, candidate.data)),
        generation=7,
        rollout_id="r1",
        settings=ShadowSettings(sample_rate=rate, report_interval=0.0),
        publish=publish,
        rng=random.Random(0),
    )
    shadow.start()
    x = _x(rows, seed=5)
    active = holder.active
    assert active is not None
    labels = active.run(x).argmax(1)
    for i in range(rows):
        holder.predict(x[i : i + 1], labels=(int(labels[i]),))

    async def drain() -> None:
        for _ in range(10):
            await shadow.step()

    asyncio.run(drain())
    shadow.stop()
    holder.predict(x[:1])  # no longer sampled
    assert published
    return published[-1]


def test_a_candidate_identical_to_the_active_model_agrees_everywhere(v1: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))
    rep = decode_shadow_report(None, _evaluate(holder, v1, rate=1.0, rows=60))
    s = rep.summary
    assert (rep.device_id, rep.generation, rep.rollout_id) == ("dev-1", 7, "r1")
    assert s["samples"] == 60 and s["agreed"] == 60 and s["labelled"] == 60
    assert s["active_correct"] == s["candidate_correct"] == 60  # labels were its own answers
    assert s["active_p50_us"] > 0 and s["candidate_p50_us"] > 0 and s["rss_mb"] > 0


def test_a_different_candidate_is_measured_on_a_sample(v1: Built, v2: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))
    s = decode_shadow_report(None, _evaluate(holder, v2, rate=0.5, rows=200)).summary
    assert 60 <= s["samples"] <= 140  # about half were sampled
    assert s["agreed"] < s["samples"]  # two random networks disagree somewhere
    assert s["candidate_correct"] == s["agreed"]  # the labels are the active model's answers
