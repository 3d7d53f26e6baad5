"""A mix's own stage (`StagePlan.proto(fixed=True)`: the mix's gates on for good, no If) prepared to run fast with
the same numbers: Quantize/DequantizeLinear nodes computing the same thing on the same tensor shared (the tiny SDXL
UNet's cross-attention K and V projections each quantized `encoder_hidden_states` again: 34 FP8 Q/DQ pairs of
~4 ms in its first two stages, a batch), and the weights' DequantizeLinear run once by ONNX Runtime's own kernel."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .. import modelfile, ort
from .stage_plan import node_reads

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SMALL = 64  # constants up to this many elements (scales, zero points) are compared by value


def prepared(m: onnx.ModelProto, provider: str, threads: int = 0) -> onnx.ModelProto:
    """`m` with equal Q/DQ nodes shared (`shared_qdq`) and its weights dequantized once (`dequantized`)."""
    return dequantized(shared_qdq(m), provider, threads)


def prepared_bytes(m: onnx.ModelProto) -> int:
    """Weight bytes of `prepared(m)` without making it: each folded DequantizeLinear's quantized tensor becomes
    float32 values (4 bytes an element)."""
    inits = {t.name: t for t in m.graph.initializer}
    total = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(m))
    for n in _weight_dequantizers(m):
        q = inits[n.input[0]]
        total += 4 * int(np.prod(q.dims, dtype=np.int64)) - modelfile.tensor_bytes(q)
    return max(total, 0)


def _weight_dequantizers(m: onnx.ModelProto) -> list:
    const = {t.name for t in m.graph.initializer}
    return [n for n in m.graph.node if n.op_type == "DequantizeLinear" and all(i in const for i in n.input if i)]


def shared_qdq(m: onnx.ModelProto) -> onnx.ModelProto:
    """`m` (changed in place) where a Q/DQ node with the same inputs (small constants compared by value) and
    attributes as an earlier one is dropped and its readers read the earlier one's output: an elementwise
    deterministic op on the same values makes the same values."""
    small = {t.name: t for t in m.graph.initializer if np.prod(t.dims, dtype=np.int64) <= SMALL
             and not t.external_data}
    outputs = {o.name for o in m.graph.output}
    alias: dict = {}
    seen: dict = {}

    def canon(name: str):
        t = small.get(name)
        if t is None:
            return ("t", alias.get(name, name))
        a = numpy_helper.to_array(t)
        return ("c", t.data_type, a.shape, a.tobytes())  # the ONNX type: numpy calls every float8 '<V1'
    keep = []
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x in alias:
                n.input[i] = alias[x]
        if n.op_type in QDQ_OPS and len(n.output) == 1 and n.output[0] not in outputs:
            key = (n.op_type, n.domain, tuple(canon(i) for i in n.input),
                   tuple(sorted(a.SerializeToString() for a in n.attribute)))
            if key in seen:
                alias[n.output[0]] = seen[key]
                continue
            seen[key] = n.output[0]
        keep.append(n)
    if alias:
        del m.graph.node[:]
        m.graph.node.extend(keep)
        reads = set().union(*(node_reads(n) for n in keep))
        inits = [t for t in m.graph.initializer if t.name in reads]
        del m.graph.initializer[:]
        m.graph.initializer.extend(inits)
    return m


def dequantized(m: onnx.ModelProto, provider: str, threads: int = 0) -> onnx.ModelProto:
    """`m` with every DequantizeLinear of constants (the quantized weights) replaced by its output, computed once by
    ONNX Runtime's own kernel (the same numbers each run would make): a fixed stage dequantized every weight on
    every run (~30 ms a batch for the tiny SDXL UNet's 15 M parameters)."""
    fold = _weight_dequantizers(m)
    if not fold:
        return m
    c = onnx.ModelProto()
    c.ir_version, c.graph.name = m.ir_version, "dequantize"
    c.opset_import.extend(m.opset_import)
    c.graph.node.extend(fold)
    needed = {i for n in fold for i in n.input if i}
    c.graph.initializer.extend(t for t in m.graph.initializer if t.name in needed)
    names = [n.output[0] for n in fold]
    c.graph.output.extend(onnx.ValueInfoProto(name=o) for o in names)
    sess = ort.session(c, provider=provider, level="disable", threads=threads)
    values = ort.run(sess, names, {}, label="the fixed stage's weights")
    del sess, c
    folded = {id(n) for n in fold}
    rest = [n for n in m.graph.node if id(n) not in folded]
    reads = set().union(*(node_reads(n) for n in rest)) if rest else set()
    out = onnx.ModelProto()
    out.ir_version = m.ir_version
    out.opset_import.extend(m.opset_import)
    out.functions.extend(m.functions)
    out.graph.name = m.graph.name
    out.graph.node.extend(rest)
    out.graph.input.extend(m.graph.input)
    out.graph.output.extend(m.graph.output)
    out.graph.initializer.extend(t for t in m.graph.initializer if t.name in reads)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, values))
    return out
