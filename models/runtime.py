"""Run a model file in its real runtime: ONNX Runtime or LiteRT (TFLite).

Used by the coordinator to evaluate variants and by the agent to serve them, so
both see the same numbers. Runtimes are imported inside their session classes:
a device with only LiteRT never imports onnxruntime, and the other way round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from edgefleet.protos.errors import InvalidArgument, Unavailable
from edgefleet.protos.manifest import TensorSpec

logger = logging.getLogger(__name__)

_NP_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


#: lines native runtimes write to stderr on their own that say nothing to an operator
_NATIVE_BANNERS = ("Created TensorFlow Lite XNNPACK delegate",)
_native_lock = threading.Lock()


@contextlib.contextmanager
def quiet_native_banners() -> Iterator[None]:
    """Hold back LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." banner.

    The C++ runtime writes it straight to file descriptor 2 (no log level turns it off),
    into the middle of progress bars. Whatever else reaches fd 2 meanwhile is written
    back afterwards; the banner is logged at debug level instead.
    """
    with _native_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no real fd 2 (embedded interpreter): nothing to do
            yield
            return
        with tempfile.TemporaryFile() as buf:
            os.dup2(buf.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                buf.seek(0)
                for line in buf.read().decode(errors="replace").splitlines(keepends=True):
                    if any(b in line for b in _NATIVE_BANNERS):
                        logger.debug("runtime: %s", line.strip())
                    else:
                        sys.stderr.write(line)
                sys.stderr.flush()


class ModelSession(ABC):
    """A loaded model. `run` takes one input batch and returns the first output."""

    runtime: ClassVar[str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str

    @abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray: ...

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Validate `x` against the input spec; raise `InvalidArgument` naming it."""
        spec = self.inputs[0]
        # per-request hot path: the expected dtype and fixed dims are worked out once
        cached = self.__dict__.get("_input_check")
        if cached is None or cached[0] is not spec:
            fixed = tuple((i, d) for i, d in enumerate(spec.shape) if i > 0 and d >= 0)
            cached = (spec, np.dtype(spec.dtype), len(spec.shape), fixed)
            self.__dict__["_input_check"] = cached
        _spec, want, ndim, fixed = cached
        if x.dtype != want:
            if x.dtype.kind in "fiu" and want.kind == "f":
                x = x.astype(want)
            else:
                raise InvalidArgument(
                    f"input dtype {x.dtype} does not fit {spec.describe()}; send {spec.dtype}"
                )
        shape = x.shape
        if x.ndim != ndim or any(shape[i] != d for i, d in fixed):
            raise InvalidArgument(
                f"input shape {tuple(x.shape)} does not fit {spec.describe()} (N is the batch size)"
            )
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._run(self.check_input(x))


class OnnxSession(ModelSession):
    runtime = "onnxruntime"

    def __init__(
        self, model: bytes, *, providers: Sequence[str] | None = None, threads: int = 0
    ) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        prefs = list(providers) if providers else ["CPUExecutionProvider"]
        chosen = [p for p in prefs if p in available]
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Idle intra-op threads spin-wait for the next run by default: that burns a
        # core between requests and steals it from the gRPC and MQTT work beside
        # the model (measured: +200 µs per local Predict on 2 cores). Sleep instead.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self._sess = ort.InferenceSession(model, sess_options=opts, providers=chosen)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise InvalidArgument(f"ONNX Runtime cannot load this model: {_first_line(e)}") from e
        self.provider = self._sess.get_providers()[0]
        self.inputs = tuple(_ort_spec(i) for i in self._sess.get_inputs())
        self.outputs = tuple(_ort_spec(o) for o in self._sess.get_outputs())
        self._input_name = self._sess.get_inputs()[0].name
        self._output_name = self._sess.get_outputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self._sess.run([self._output_name], {self._input_name: x})[0]
        return np.asarray(out)


class LiteRtSession(ModelSession):
    """LiteRT interpreter (ai-edge-litert, or tflite-runtime on armv7l).

    TFLite models carry fixed batch sizes. edgefleet's converter writes one
    signature per batch size (`b1`, `b64`) sharing the weights; a batch of another
    size runs in chunks of the largest signature, the last one padded. Models with
    one plain signature are resized when they allow it, else run in chunks too.
    """

    runtime = "litert"

    def __init__(self, model: bytes, *, threads: int = 0) -> None:
        Interpreter = _litert_interpreter()
        try:
            with quiet_native_banners():
                self._interp = Interpreter(model_content=model, num_threads=threads or None)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise InvalidArgument(f"LiteRT cannot load this model: {_first_line(e)}") from e
        self.provider = "CPU"
        self._runners: dict[int, tuple[Any, str, str]] = {}
        for key, sig in self._interp.get_signature_list().items():
            if key.startswith("b") and key[1:].isdigit() and len(sig["inputs"]) == 1:
                runner = self._interp.get_signature_runner(key)
                self._runners[int(key[1:])] = (runner, sig["inputs"][0], sig["outputs"][0])
        ind = self._interp.get_input_details()
        outd = self._interp.get_output_details()
        self._in, self._out = ind[0], outd[0]
        self._batch = int(self._in["shape"][0])
        self._resizable = not self._runners
        self.inputs = (_tfl_spec(self._in),)
        self.outputs = (_tfl_spec(self._out),)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._runners) or [self._batch]

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        n = int(x.shape[0])
        if n in self._runners:
            runner, iname, oname = self._runners[n]
            return np.array(runner(**{iname: x})[oname])
        if n != self._batch:
            self._interp.resize_tensor_input(self._in["index"], list(x.shape))
            self._interp.allocate_tensors()
            self._batch = n
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        return np.array(self._interp.get_tensor(self._out["index"]))

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = int(x.shape[0])
        if n in self._runners:
            return self._invoke(x)
        if self._resizable:
            try:
                return self._invoke(x)
            except (ValueError, RuntimeError) as e:
                logger.debug(
                    "TFLite model does not resize to %s (%s): running in chunks", x.shape, e
                )
                self._resizable = False
                self._interp.resize_tensor_input(self._in["index"], list(self._in["shape"]))
                self._interp.allocate_tensors()
                self._batch = int(self._in["shape"][0])
        return self._run_chunks(x)

    def _run_chunks(self, x: np.ndarray) -> np.ndarray:
        sizes = self.batch_sizes
        b = max(s for s in sizes if s <= len(x)) if min(sizes) <= len(x) else min(sizes)
        outs = []
        for start in range(0, len(x), b):
            chunk = x[start : start + b]
            n = len(chunk)
            if n < b:
                if n in sizes:
                    outs.append(self._invoke(chunk))
                    continue
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self._invoke(chunk)[:n])
        return np.concatenate(outs)


_SESSIONS: dict[str, type[ModelSession]] = {"onnxruntime": OnnxSession, "litert": LiteRtSession}


def open_session(
    model: bytes, runtime: str, *, providers: Sequence[str] | None = None, threads: int = 0
) -> ModelSession:
    if runtime == "onnxruntime":
        return OnnxSession(model, providers=providers, threads=threads)
    if runtime == "litert":
        return LiteRtSession(model, threads=threads)
    raise InvalidArgument(f"runtime {runtime!r} unknown; supported: {', '.join(_SESSIONS)}")


def available_runtimes() -> list[str]:
    """Runtimes installed for this interpreter, in preference order.

    Found by module spec, not imported: the agent calls this at start to report its
    capabilities, and importing LiteRT there cost its idle process memory even on
    devices that only ever run ONNX models (bench/footprint.py). A session imports
    its runtime when a model is loaded.
    """
    found = []
    if _installed("onnxruntime"):
        found.append("onnxruntime")
    if _installed("ai_edge_litert") or _installed("tflite_runtime"):
        found.append("litert")
    return found


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _litert_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        raise Unavailable(
            "no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime on armv7l)"
        ) from None


def _ort_spec(arg: Any) -> TensorSpec:
    dtype = _NP_DTYPES.get(arg.type)
    if dtype is None:
        raise InvalidArgument(
            f"model tensor {arg.name!r} has type {arg.type}; supported: {', '.join(_NP_DTYPES)}"
        )
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, dtype, shape)


def _tfl_spec(d: dict[str, Any]) -> TensorSpec:
    """Spec of a TFLite tensor, batch axis shown as dynamic (sessions chunk or resize)."""
    shape = [int(v) for v in d.get("shape_signature", d["shape"])]
    if shape:
        shape[0] = -1
    return TensorSpec(str(d["name"]), np.dtype(d["dtype"]).name, tuple(shape))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
