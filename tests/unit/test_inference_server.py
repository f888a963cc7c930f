"""The agent's inference side: ModelHolder, model swaps, the local gRPC InferenceService.

Real ONNX models (torch-exported MLPs), real ONNX Runtime sessions and a real
grpc.aio server on 127.0.0.1; the clients are the generated stubs.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent import serde
from edgefleet.agent.inference import ActiveModel, ModelHolder, load
from edgefleet.agent.serde import AgentStatus, ModelRef, UpdateState
from edgefleet.agent.server import check_address, serve
from edgefleet.models.runtime import OnnxSession, open_session
from edgefleet.protos.errors import FleetError, InvalidArgument, SelfTestFailed, Unavailable
from edgefleet.protos.fleet.v1 import inference_pb2, inference_pb2_grpc, model_pb2
from edgefleet.protos.manifest import GoldenSample, Manifest, sign_manifest, verify_manifest

FEATURES = 64
CLASSES = 10


@dataclass(frozen=True)
class Built:
    manifest: Manifest
    data: bytes


def _export(seed: int) -> bytes:
    import torch

    from edgefleet.cloud.training.export import export_onnx
    from edgefleet.models.arch import build
    from edgefleet.models.checkpoint import ArchConfig

    torch.manual_seed(seed)
    return export_onnx(build(ArchConfig("mlp", (FEATURES,), CLASSES)), (FEATURES,))


def _manifest(data: bytes, version: int, *, golden_shift: float = 0.0) -> Manifest:
    """A manifest as the device gets it: signed, verified, golden output from the model."""
    session = open_session(data, "onnxruntime")
    x = np.random.default_rng(version).normal(size=(4, FEATURES)).astype(np.float32)
    y = session.run(x).astype(np.float32) + np.float32(golden_shift)
    m = Manifest(
        model="digits",
        version=version,
        variant="fp32",
        runtime="onnxruntime",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        inputs=session.inputs,
        outputs=session.outputs,
        created_at_ms=1_700_000_000_000,
        labels={"classes": ",".join(str(i) for i in range(CLASSES))},
        golden=GoldenSample(x.tobytes(), x.shape, y.tobytes(), y.shape, 1e-4),
    )
    key = Ed25519PrivateKey.generate()
    return verify_manifest(sign_manifest(m, key), key.public_key())


@pytest.fixture(scope="module")
def v1() -> Built:
    data = _export(seed=1)
    return Built(_manifest(data, 1), data)


@pytest.fixture(scope="module")
def v2() -> Built:
    data = _export(seed=2)
    return Built(_manifest(data, 2), data)


def _x(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, FEATURES)).astype(np.float32)


def _request(x: np.ndarray, request_id: str = "") -> inference_pb2.PredictRequest:
    return serde.encode_predict_request(x, request_id=request_id)


Stub = Any  # inference_pb2_grpc.InferenceServiceStub over an aio channel


def _with_server(
    holder: ModelHolder,
    body: Callable[[Stub], Awaitable[None]],
    *,
    status: Callable[[], AgentStatus] | None = None,
) -> None:
    """Serve `holder` on 127.0.0.1, run `body(stub)`, stop; all within 30 s."""

    async def main() -> None:
        async with asyncio.timeout(30):
            server, port = await serve(holder, address="127.0.0.1:0", status=status)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    await body(inference_pb2_grpc.InferenceServiceStub(channel))
            finally:
                await server.stop(None)

    asyncio.run(main())


# -- serde --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8", "int32", "int64"])
def test_tensor_roundtrip_keeps_dtype_shape_and_values(dtype: str) -> None:
    x = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    t = serde.array_to_tensor(x)
    assert len(t.data) == x.nbytes
    back = serde.tensor_to_array(t)
    assert back.dtype == x.dtype and back.shape == x.shape
    np.testing.assert_array_equal(back, x)


def test_tensor_bytes_are_little_endian() -> None:
    t = serde.array_to_tensor(np.array([1], dtype=">i4"))
    assert t.data == b"\x01\x00\x00\x00" and t.dtype == model_pb2.DTYPE_INT32


def test_tensor_data_length_must_match_shape() -> None:
    t = inference_pb2.Tensor(dtype=model_pb2.DTYPE_FLOAT32, shape=[2, 64], data=b"\x00" * 500)
    with pytest.raises(InvalidArgument, match=r"500 bytes; shape \(2, 64\) of float32 needs 512"):
        serde.tensor_to_array(t)


def test_hostile_shape_is_refused_without_overflow() -> None:
    t = inference_pb2.Tensor(dtype=model_pb2.DTYPE_FLOAT32, shape=[2**62, 2**62], data=b"")
    with pytest.raises(InvalidArgument, match="needs"):
        serde.tensor_to_array(t)


def test_unspecified_dtype_is_named() -> None:
    t = inference_pb2.Tensor(shape=[1], data=b"\x00" * 4)
    with pytest.raises(InvalidArgument, match="DTYPE_UNSPECIFIED is not supported; supported: "):
        serde.tensor_to_array(t)


def test_unsupported_array_dtype_cannot_be_sent() -> None:
    with pytest.raises(InvalidArgument, match="array dtype float64 cannot be sent; supported: "):
        serde.array_to_tensor(np.zeros(3))


def test_model_ref_roundtrip(v1: Built) -> None:
    ref = ModelRef.from_manifest(v1.manifest)
    assert str(ref) == "digits:1/fp32"
    assert serde.ref_from_proto(serde.ref_to_proto(ref)) == ref
    assert serde.ref_from_proto(serde.ref_to_proto(None)) is None


# -- holder -------------------------------------------------------------------------


def test_load_records_the_chosen_provider(v1: Built) -> None:
    m = load(
        v1.manifest,
        v1.data,
        providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    import onnxruntime as ort

    assert m.provider in ort.get_available_providers()
    assert m.provider == m.session.provider
    assert m.ref == ModelRef("digits", 1, "fp32", v1.manifest.sha256)
    assert m.self_test_diff <= 1e-4


def test_holder_counts_and_histogram(v1: Built) -> None:
    ticks = iter(range(0, 10**9, 300_000))  # every clock read advances 300 µs
    holder = ModelHolder(clock_ns=lambda: next(ticks))
    with pytest.raises(Unavailable, match="waiting for its first deployment"):
        holder.predict(_x())
    holder.swap(load(v1.manifest, v1.data))
    for _ in range(3):
        holder.predict(_x())
    with pytest.raises(InvalidArgument):
        holder.predict(_x()[:, :63])
    stats = holder.snapshot_and_reset()
    assert (stats.predictions, stats.errors) == (5, 2)
    h = stats.latency
    assert h.count == 3 and h.sum_us == pytest.approx(900.0)
    assert len(h.counts) == len(h.bounds_us) + 1
    assert h.counts[h.bounds_us.index(500)] == 3  # 300 µs falls in (200, 500]
    assert serde.histogram_to_proto(h).count == 3
    again = holder.snapshot_and_reset()
    assert (again.predictions, again.errors, again.latency.count) == (0, 0, 0)


def test_failed_self_test_is_refused_and_old_model_keeps_serving(v1: Built, v2: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))
    bad = replace(v2.manifest, golden=_manifest(v2.data, 2, golden_shift=0.5).golden)
    with pytest.raises(SelfTestFailed, match=r"self-test of digits:2/fp32 failed: outputs differ"):
        holder.swap(load(bad, v2.data))
    y, served = holder.predict(_x())
    assert served.ref.version == 1
    np.testing.assert_allclose(y, open_session(v1.data, "onnxruntime").run(_x()), rtol=1e-6)


def test_model_without_golden_sample_is_refused(v1: Built) -> None:
    with pytest.raises(SelfTestFailed, match="carries no golden sample"):
        load(replace(v1.manifest, golden=None), v1.data)


def test_bytes_that_do_not_load_are_not_a_failed_self_test(v1: Built) -> None:
    """The updater reports load_failed for these, self_test_failed for the two above."""
    with pytest.raises(InvalidArgument) as ei:
        load(v1.manifest, b"not an onnx model")
    assert not isinstance(ei.value, SelfTestFailed), ei.value


def test_unloadable_bytes_are_refused(v1: Built) -> None:
    with pytest.raises(InvalidArgument, match="ONNX Runtime cannot load this model"):
        load(v1.manifest, b"not an onnx model")


# -- addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["127.0.0.1:0", "127.0.0.1:50051", "[::1]:0", "localhost:7000", "unix:/tmp/x.sock"]
)
def test_local_addresses_are_accepted(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("0.0.0.0:50051", "not loopback"),
        ("[::]:50051", "not loopback"),
        (":50051", "not loopback"),
        ("192.168.1.10:50051", "not loopback"),
        ("device.local:50051", "not loopback"),
        ("127.0.0.1", "not HOST:PORT"),
        ("unix:", "names no socket path"),
    ],
)
def test_other_addresses_are_refused(address: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        check_address(address)

    async def main() -> None:
        await serve(ModelHolder(), address=address)

    with pytest.raises(InvalidArgument, match=match):
        asyncio.run(main())


def test_unix_socket(v1: Built, tmp_path: Path) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))
    sock = tmp_path / "inference.sock"

    async def main() -> None:
        server, port = await serve(holder, address=f"unix:{sock}")
        try:
            assert port == 0 and sock.exists()
            async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                health = await stub.Health(inference_pb2.HealthRequest(), timeout=5)
                assert health.serving
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_port_in_use_is_unavailable() -> None:
    async def main() -> None:
        server, port = await serve(ModelHolder())
        try:
            with pytest.raises(
                Unavailable, match=f"cannot bind InferenceService to '127.0.0.1:{port}'"
            ):
                await serve(ModelHolder(), address=f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    asyncio.run(main())


# -- gRPC ---------------------------------------------------------------------------


def test_predict_matches_onnxruntime(v1: Built) -> None:
    import onnxruntime as ort

    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))
    x = _x(rows=5)
    sess = ort.InferenceSession(v1.data, providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]

    async def body(stub: Stub) -> None:
        resp = await stub.Predict(_request(x, "r-1"), timeout=5)
        got = serde.decode_predict_response(resp)
        assert got.request_id == "r-1"
        assert got.model == ModelRef("digits", 1, "fp32", v1.manifest.sha256)
        assert got.output.dtype == np.float32 and got.output.shape == (5, CLASSES)
        np.testing.assert_array_equal(got.output, want)
        assert got.latency_us > 0

    _with_server(holder, body)


def test_stream_answers_in_order(v1: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))
    reference = open_session(v1.data, "onnxruntime")
    inputs = [_x(rows=1 + i % 4, seed=i) for i in range(40)]

    async def body(stub: Stub) -> None:
        async def requests() -> AsyncIterator[inference_pb2.PredictRequest]:
            for i, x in enumerate(inputs):
                yield _request(x, f"frame-{i}")

        got = [serde.decode_predict_response(r) async for r in stub.PredictStream(requests())]
        assert [g.request_id for g in got] == [f"frame-{i}" for i in range(len(inputs))]
        for x, g in zip(inputs, got, strict=True):
            np.testing.assert_allclose(g.output, reference.run(x), rtol=1e-6)

    _with_server(holder, body)


def test_stream_ends_with_invalid_argument_at_the_bad_request(v1: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))

    async def body(stub: Stub) -> None:
        async def requests() -> AsyncIterator[inference_pb2.PredictRequest]:
            yield _request(_x(), "ok-0")
            yield _request(_x(), "ok-1")
            yield _request(_x()[:, :63], "bad")
            yield _request(_x(), "never")

        answered = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for r in stub.PredictStream(requests()):
                answered.append(r.request_id)
        assert answered == ["ok-0", "ok-1"]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "(stream request #2, id 'bad')" in (err.value.details() or "")

    _with_server(holder, body)


@pytest.mark.parametrize(
    ("x", "details"),
    [
        (
            np.zeros((2, 63), np.float32),
            "input shape (2, 63) does not fit input: float32[N,64] (N is the batch size)",
        ),
        (
            np.zeros((2, 8, 8), np.float32),
            "input shape (2, 8, 8) does not fit input: float32[N,64] (N is the batch size)",
        ),
    ],
)
def test_wrong_shape_is_invalid_argument_naming_the_spec(
    v1: Built, x: np.ndarray, details: str
) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))

    async def body(stub: Stub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(_request(x), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == details

    _with_server(holder, body)


def test_wrong_dtype_is_invalid_argument_naming_the_spec(v1: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))

    async def body(stub: Stub) -> None:
        # int64 is widened to float32 by the session; a raw tensor with a bad byte
        # count and one with an unspecified dtype are refused before the model.
        resp = await stub.Predict(_request(np.ones((1, FEATURES), np.int64)), timeout=5)
        assert serde.decode_predict_response(resp).output.shape == (1, CLASSES)
        bad = [
            (
                inference_pb2.Tensor(dtype=model_pb2.DTYPE_FLOAT32, shape=[1, 64], data=b"\0" * 8),
                "tensor data is 8 bytes; shape (1, 64) of float32 needs 256 bytes",
            ),
            (
                inference_pb2.Tensor(shape=[1, 64], data=b"\0" * 256),
                "tensor dtype DTYPE_UNSPECIFIED is not supported; supported: float32, float16, "
                "int8, uint8, int32, int64",
            ),
        ]
        for tensor, details in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(inference_pb2.PredictRequest(input=tensor), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == details
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(inference_pb2.PredictRequest(request_id="empty"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "request 'empty' carries no input tensor"

    _with_server(holder, body)


def test_model_with_integer_input_names_the_dtype() -> None:
    """A float tensor sent to an int64-input model: INVALID_ARGUMENT naming the spec."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["out"], to=TensorProto.FLOAT)],
        "ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
    )
    data = helper.make_model(
        graph, ir_version=9, opset_imports=[helper.make_opsetid("", 18)]
    ).SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    session = open_session(data, "onnxruntime")
    x = np.arange(8, dtype=np.int64).reshape(2, 4)
    y = session.run(x).astype(np.float32)
    manifest = Manifest(
        model="ids",
        version=1,
        variant="fp32",
        runtime="onnxruntime",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        inputs=session.inputs,
        outputs=session.outputs,
        created_at_ms=0,
        golden=GoldenSample(x.tobytes(), x.shape, y.tobytes(), y.shape, 0.0),
    )
    # the golden input is read in the model's own input dtype: the self-test passes
    loaded = load(manifest, data)
    assert loaded.self_test_diff == 0.0
    holder = ModelHolder()
    holder.swap(loaded)

    async def body(stub: Stub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(_request(np.zeros((2, 4), np.float32)), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "input dtype float32 does not fit ids: int64[N,4]; send int64"
        resp = await stub.Predict(_request(x), timeout=5)
        np.testing.assert_array_equal(serde.decode_predict_response(resp).output, y)

    _with_server(holder, body)


def test_no_model_is_unavailable() -> None:
    async def body(stub: Stub) -> None:
        for call in (
            stub.Predict(_request(_x()), timeout=5),
            stub.GetModelMetadata(inference_pb2.ModelMetadataRequest(), timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == (
                "no model active yet; the device is waiting for its first deployment"
            )
        health = await stub.Health(inference_pb2.HealthRequest(), timeout=5)
        assert not health.serving
        assert serde.ref_from_proto(health.active) is None

    _with_server(ModelHolder(), body)


def test_get_model_metadata(v1: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))

    async def body(stub: Stub) -> None:
        meta = await stub.GetModelMetadata(inference_pb2.ModelMetadataRequest(), timeout=5)
        info = serde.decode_model_metadata(meta)
        assert info.model == ModelRef("digits", 1, "fp32", v1.manifest.sha256)
        assert [s.describe() for s in info.inputs] == ["input: float32[N,64]"]
        assert [s.describe() for s in info.outputs] == ["logits: float32[N,10]"]
        assert info.runtime == "onnxruntime"
        assert info.provider == "CPUExecutionProvider"
        assert info.labels["classes"].startswith("0,1,2")

    _with_server(holder, body)


def test_health_reports_model_link_and_update_state(v1: Built) -> None:
    holder = ModelHolder()
    holder.swap(load(v1.manifest, v1.data))
    status = AgentStatus(connected=True, update_state=UpdateState.DOWNLOADING)

    async def body(stub: Stub) -> None:
        health = await stub.Health(inference_pb2.HealthRequest(), timeout=5)
        assert health.serving and health.connected
        assert UpdateState(health.update_state) is UpdateState.DOWNLOADING
        assert serde.ref_from_proto(health.active) == ModelRef(
            "digits", 1, "fp32", v1.manifest.sha256
        )

    _with_server(holder, body, status=lambda: status)


def test_runtime_failure_is_internal(v1: Built) -> None:
    """An error the runtime raises mid-run reaches the client as INTERNAL, named."""

    class Broken(OnnxSession):
        def _run(self, x: np.ndarray) -> np.ndarray:
            raise RuntimeError("CUDA error: an illegal memory access\nstack…")

    session = Broken(v1.data)
    holder = ModelHolder()
    holder.swap(ActiveModel(v1.manifest, session, session.provider))

    async def body(stub: Stub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(_request(_x()), timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == (
            "model digits:1/fp32 on CPUExecutionProvider failed on input float32[3, 64]: "
            "CUDA error: an illegal memory access"
        )

    _with_server(holder, body)
    assert holder.snapshot_and_reset().errors == 1


# -- swap under load ----------------------------------------------------------------


def test_swap_under_load_fails_no_request(v1: Built, v2: Built) -> None:
    """Four clients predict non-stop while the model flips 20 times between v1 and v2.

    No request fails, and every answer's ModelRef names the model whose numbers it
    carries: each request ran entirely on one model.
    """
    models = {1: load(v1.manifest, v1.data), 2: load(v2.manifest, v2.data)}
    x = _x(rows=8, seed=42)
    expected = {v: m.session.run(x) for v, m in models.items()}
    assert not np.allclose(expected[1], expected[2], atol=1e-3)
    holder = ModelHolder()
    holder.swap(models[1])
    seen: dict[int, int] = {1: 0, 2: 0}
    failures: list[BaseException] = []
    request = _request(x)

    async def body(stub: Stub) -> None:
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                try:
                    got = serde.decode_predict_response(await stub.Predict(request, timeout=5))
                except grpc.aio.AioRpcError as e:
                    failures.append(e)
                    continue
                assert got.model is not None
                assert got.model == models[got.model.version].ref
                np.testing.assert_allclose(got.output, expected[got.model.version], rtol=1e-6)
                seen[got.model.version] += 1

        async def swapper() -> None:
            for i in range(20):
                await asyncio.sleep(0.02)
                # from a worker thread, as the updater does after loading
                await asyncio.to_thread(holder.swap, models[2 if i % 2 == 0 else 1])
            await asyncio.sleep(0.02)
            stop.set()

        await asyncio.gather(swapper(), *(client() for _ in range(4)))

    _with_server(holder, body)
    assert failures == []
    assert seen[1] > 20 and seen[2] > 20, seen
    stats = holder.snapshot_and_reset()
    assert stats.errors == 0 and stats.predictions == seen[1] + seen[2]


def test_swap_while_threads_predict_directly(v1: Built, v2: Built) -> None:
    """Same property without gRPC: threads call ModelHolder.predict during 20 swaps."""
    models = [load(v1.manifest, v1.data), load(v2.manifest, v2.data)]
    x = _x(rows=2, seed=7)
    expected = {id(m): m.session.run(x) for m in models}
    holder = ModelHolder()
    holder.swap(models[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    mismatches: list[str] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                y, m = holder.predict(x)
            except FleetError as e:
                errors.append(e)
                continue
            if not np.allclose(y, expected[id(m)], rtol=1e-6):
                mismatches.append(str(m.ref))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            stop.wait(0.01)
            old = holder.swap(models[(i + 1) % 2])
            assert old is models[i % 2]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == [] and mismatches == []
