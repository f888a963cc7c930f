"""Strip an ONNX graph of what only debugging needs: value_info, doc strings, node
metadata (exporter stack traces), long names. Builds become reproducible across checkouts."""

from __future__ import annotations


def compact_onnx(data: bytes) -> bytes:
    """Same computation, smaller file. Graph input and output names are kept."""
    import onnx

    m = onnx.load_from_string(data)
    g = m.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    del g.value_info[:]
    del m.metadata_props[:]
    del g.metadata_props[:]
    m.doc_string = ""
    g.doc_string = ""
    names: dict[str, str] = {}

    def short(n: str) -> str:
        if not n or n in keep:
            return n
        if n not in names:
            names[n] = f"t{len(names)}"
        return names[n]

    for t in g.initializer:
        t.name = short(t.name)
        t.doc_string = ""
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        node.doc_string = ""
        # the exporter stores stack traces with absolute source paths here: they
        # leak the build machine's layout and make the sha256 depend on it
        del node.metadata_props[:]
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
    return bytes(m.SerializeToString())
