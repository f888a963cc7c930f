"""Where a model file's bytes go: tensor data, quantization parameters, graph, debug metadata.

Approximate by design (protobuf/flatbuffer framing is counted with whatever holds
it); it explains a size ratio, it does not replace the file size.
"""

from __future__ import annotations

from dataclasses import dataclass

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class SizeBreakdown:
    total: int
    tensor_data: int  # weights and biases, in whatever precision the file stores them
    quant_params: int  # scales and zero points
    debug: int  # bytes no runtime reads (ONNX node metadata_props: exporter stack traces)

    @property
    def graph(self) -> int:
        """Everything else: nodes, names, signatures, framing (debug included)."""
        return self.total - self.tensor_data - self.quant_params


def breakdown(data: bytes, runtime: str) -> SizeBreakdown | None:
    try:
        if runtime == "onnxruntime":
            return _onnx(data)
        if runtime == "litert":
            return _tflite(data)
    except ImportError:
        return None
    return None


def _onnx(data: bytes) -> SizeBreakdown:
    import onnx

    m = onnx.load_from_string(data)
    g = m.graph
    qparams = set()
    for n in g.node:
        if n.op_type in QDQ_OPS:
            qparams.update(n.input[1:])
    for t in g.initializer:  # quantize_dynamic names its weight scales and zero points
        if t.name.endswith(("_scale", "_zero_point")):
            qparams.add(t.name)
    tensors = quant = 0
    for t in g.initializer:
        size = t.ByteSize()
        if t.name in qparams:
            quant += size
        else:
            tensors += size
    debug = sum(p.ByteSize() for n in g.node for p in n.metadata_props)
    return SizeBreakdown(len(data), tensors, quant, debug)


def _tflite(data: bytes) -> SizeBreakdown:
    from ai_edge_litert.tools import flatbuffer_utils

    m = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    tensors = sum(len(b.data) for b in m.buffers if b.data is not None)
    quant = 0
    for sg in m.subgraphs:
        for t in sg.tensors:
            q = t.quantization
            if q is None:
                continue
            quant += 4 * len(q.scale if q.scale is not None else [])
            quant += 8 * len(q.zeroPoint if q.zeroPoint is not None else [])  # int64 in the schema
    return SizeBreakdown(len(data), tensors, quant, 0)
