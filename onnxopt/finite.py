"""The finite-output guarantee: before quantize or convert declares success, the written graph must pass
the onnx checker (full type inference), load in ONNX Runtime, and give finite outputs wherever the FP32
model does on a few calibration batches. Non-finite results are repaired by widening the FP32 region at the
first non-finite tensor and converting again; what cannot be repaired is one error naming node and range.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import modelfile, opset_upgrade, protowire
from . import ort as ortx
from .errors import OnnxoptError
from .settings import MEMORY_BUDGET_MB

log = logging.getLogger(__name__)

CHECK_BATCHES = 2
MAX_ROUNDS = 12
_PROTO_LIMIT = 1_800_000_000


def check_valid(model: onnx.ModelProto, provider: str = "cpu"):
    """onnx checker with full type inference, then an ORT_DISABLE_ALL session (the exact emulation where
    the provider cannot run the low-precision graph). Returns (session, emulated). A failure is a bug."""
    check_data(model)
    _checker(weightless(model))  # catches what ORT refuses (mixed float/float16 type parameters) without a session
    if not _has_low(model):
        try:
            return ortx.session(model, provider=provider, level="disable", lean=True), False
        except OnnxoptError as e:
            raise OnnxoptError(f"internal error: the written graph does not load: {e}; please report it") from None
    # CPU FP16 kernels may compute in FP32 and hide a GPU's overflow, and BF16 has no CPU kernels:
    # run the exact emulation instead.
    from .emulate import emulated_view
    try:
        return ortx.session(emulated_view(model), provider=provider, level="disable", lean=True), True
    except OnnxoptError as e2:
        raise OnnxoptError(f"internal error: the written graph does not load: {e2}; please report it") from None


def check_loads(model: onnx.ModelProto, provider: str = "cpu") -> str:
    """The load-only guarantee without reading a weight: every tensor's bytes where ORT will look for them
    (`check_data`), the onnx checker, and an ORT session on `provider` of the weightless graph (weights as
    typed inputs: the same type and shape checks, kernels and allocation plan, none of the 5 GB read or copied
    to the GPU). The written graph itself is tried first; the exact emulation where ORT has no kernels for it
    (BF16 on the CPU, the block formats' trt ops). The checker runs while ORT builds its session (ORT releases
    the GIL). Returns which graph loaded ("written" | "emulated"); a failure is an internal error."""
    check_data(model)
    light = weightless(model)
    with ThreadPoolExecutor(1) as pool:
        loaded = pool.submit(_load_weightless, model, light, provider)
        _checker(light)
        return loaded.result()


def _load_weightless(model: onnx.ModelProto, light: onnx.ModelProto, provider: str) -> str:
    from .emulate import emulated_view
    from .formats.emulation import has_block_formats
    first = None
    if not has_block_formats(model):  # lowering the block formats reads their weights: the emulation below
        try:
            ortx.session(light, provider=provider, level="disable", lean=True)
            return "written"
        except OnnxoptError as e:
            if not _has_low(model):
                raise OnnxoptError(f"internal error: the written graph does not load: {e}; please report it") from None
            first = e
    view = emulated_view(light if first is not None else model)
    try:
        ortx.session(weightless(view), provider=provider, level="disable", lean=True)
    except OnnxoptError as e2:
        raise OnnxoptError(f"internal error: the written graph does not load: {e2}; please report it") from None
    if first is not None:
        log.info("the written graph has no %s kernels in ONNX Runtime (%s); its exact emulation loads", provider, first)
    return "emulated"


WEIGHTLESS_MIN = 1024  # elements: smaller initializers (shapes, axes, scales) stay, as ORT may read their values


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose big or external initializers of the main graph are typed graph inputs of the
    same name, type and shape: everything but the weights' bytes, without copying or serializing them."""
    m = protowire.copy_without(model, "graph")
    m.graph.CopyFrom(protowire.copy_without(model.graph, "initializer"))  # no weights: a cheap copy
    g = m.graph
    inputs = {i.name for i in g.input}
    from onnx import external_data_helper as ext
    for t in model.graph.initializer:
        if ext.uses_external_data(t) or (_elements(t) >= WEIGHTLESS_MIN and t.data_type not in _INDEX_TYPES):
            if t.name not in inputs:  # IR < 4 models list their initializers as inputs already
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return m


_INDEX_TYPES = (TensorProto.INT64, TensorProto.INT32)


def _elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def check_data(model: onnx.ModelProto) -> None:
    """Every main-graph initializer holds as many values as its type and shape need, in memory or in its
    external file (what ORT checks when it reads a weight, which `weightless` sessions do not)."""
    from onnx import external_data_helper as ext
    for t in model.graph.initializer:
        n, bits = _elements(t), _bits(t.data_type)
        if bits is None:
            continue  # strings: ORT sizes them itself
        need = (n * bits + 7) // 8
        if ext.uses_external_data(t):
            info = ext.ExternalDataInfo(t)
            offset = int(info.offset or 0)
            size = os.path.getsize(info.location) if info.location and os.path.isfile(info.location) else -1
            have = int(info.length) if info.length else size - offset
            if size < 0 or offset + have > size or have != need:
                raise OnnxoptError(f"internal error: weight '{t.name}' has {max(have, 0)} bytes in '{info.location}' "
                                   f"where {need} are needed; please report it")
        elif t.HasField("raw_data"):
            if len(t.raw_data) != need:
                raise OnnxoptError(f"internal error: weight '{t.name}' holds {len(t.raw_data)} bytes where {need} "
                                   "are needed; please report it")
        else:
            fields = [f.name for f, _ in t.ListFields() if f.name.endswith("_data") and f.name != "raw_data"]
            count = len(getattr(t, fields[0])) if fields else 0
            want = 2 * n if t.data_type in _COMPLEX else n
            if bits >= 8 and count != want:
                raise OnnxoptError(f"internal error: weight '{t.name}' holds {count} values where {want} are needed; "
                                   "please report it")


_COMPLEX = (TensorProto.COMPLEX64, TensorProto.COMPLEX128)


def _bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor type (packed sub-byte types: 2, 4, 6); None for strings."""
    if data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    packed = re.match(r"[A-Z]*?(\d+)", TensorProto.DataType.Name(data_type))
    if packed and int(packed.group(1)) < 8:
        return int(packed.group(1))
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize * 8
    except (KeyError, TypeError, ValueError):
        return None


def _checker(model: onnx.ModelProto) -> None:
    if model.ByteSize() >= _PROTO_LIMIT:
        return  # the checker needs a serialized copy; ORT's load below still type-checks
    m = onnx.ModelProto()
    m.CopyFrom(model)
    modelfile.stamp_ir_version(m)
    from onnx import external_data_helper as ext
    # Lazy weights live in files the checker cannot follow: it sees them as typed inputs (no data read).
    lazy = [t for t in m.graph.initializer if ext.uses_external_data(t)]
    for t in lazy:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        m.graph.initializer.remove(t)
    for t in modelfile.all_tensors(m):  # external tensors elsewhere (Constant attributes): read in, one at a time
        if ext.uses_external_data(t):
            t.CopyFrom(numpy_helper.from_array(modelfile.to_array(t), t.name))
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:
        if "bfloat16" in str(e):  # ops whose schema gains BF16 only in later opsets; TensorRT takes them
            log.info("onnx checker: %s (BF16 beyond the opset's schema; checked through the emulation)", _line(e))
            return
        raise OnnxoptError(f"internal error: the written graph fails the onnx checker ({_line(e)}); "
                           "please report it with the model") from None


def ensure_finite(reference: onnx.ModelProto, candidate: onnx.ModelProto, data,
                  rebuild: Callable[[set], onnx.ModelProto] | None = None, *, provider: str = "cpu",
                  batches: int = CHECK_BATCHES, skip_run: bool = False) -> tuple[onnx.ModelProto, dict]:
    """Verify `candidate` against the FP32 `reference` on the first `batches` feeds of `data`; where its
    outputs are non-finite and the reference's are not, call `rebuild(fp32_nodes)` with a wider FP32 set
    and check again. Returns the (possibly rebuilt) candidate and a report."""
    report = {"checked": True, "repaired_fp32_nodes": [], "batches": 0}
    if skip_run:
        report["checked"] = "load only"
        report["loaded"] = check_loads(candidate, provider)
        return candidate, report
    feeds = list(itertools.islice(iter(data), batches))
    report["batches"] = len(feeds)
    sess, emulated = check_valid(candidate, provider)
    report["emulated"] = emulated
    ref_bad = None  # the FP32 model runs only once the result is not finite: no second session otherwise
    extra: set[str] = set()
    for _ in range(MAX_ROUNDS):
        bad = _bad_batch(sess, emulated, feeds, ref_bad)
        if bad is not None and ref_bad is None:
            ref_bad = _ref_nonfinite_outputs(reference, feeds, provider)
            bad = _bad_batch(sess, emulated, feeds, ref_bad)
        if bad is None:
            if extra:
                log.warning("kept %d more nodes in fp32 to get finite outputs: %s", len(extra), ", ".join(sorted(extra)[:8]))
            return candidate, report
        if rebuild is None:
            raise OnnxoptError("the result has non-finite outputs where the FP32 model is finite; "
                               "use --high-precision fp32 (or --keep-fp32 OP)")
        nodes, where = first_nonfinite(candidate, feeds[bad], emulated, provider)
        new = set(nodes) - extra
        if not new:
            raise OnnxoptError(f"non-finite values from node {where} even in fp32; "
                               "check the model in fp32 or exclude that node (--keep-fp32/--exclude)")
        log.info("non-finite at %s: keeping %s in fp32 and converting again", where, ", ".join(sorted(new)))
        extra |= new
        report["repaired_fp32_nodes"] = sorted(extra)
        del sess
        candidate = rebuild(extra)
        sess, emulated = check_valid(candidate, provider)
    raise OnnxoptError(f"outputs stay non-finite after keeping {len(extra)} nodes in fp32 (last: {where}); "
                       "use --high-precision fp32")


def verify(reference: onnx.ModelProto, candidate: onnx.ModelProto, data, rebuild=None, *, provider: str = "cpu",
           memory_budget_mb: int = MEMORY_BUDGET_MB) -> tuple[onnx.ModelProto, dict]:
    """`ensure_finite` for the runner. Models whose weights exceed the memory budget (they calibrate in
    stages) get the checker only: a whole-model session would exceed the memory the run promises."""
    if not runs_outputs(reference, memory_budget_mb):
        check_data(candidate)
        _checker(weightless(candidate))
        log.info("model above a quarter of the memory budget: checked the graph, not its outputs")
        return candidate, {"checked": "checker only (model above a quarter of the memory budget)"}
    return ensure_finite(reference, candidate, data, rebuild, provider=provider)


def runs_outputs(reference: onnx.ModelProto, memory_budget_mb: int = MEMORY_BUDGET_MB) -> bool:
    """Whether `verify` will run the model (else only the checker): callers skip preparing a repair."""
    return modelfile.model_bytes(reference) <= memory_budget_mb * 2**20 // 4  # the emulation holds FP32 weights: 2x


def _has_low(model) -> bool:
    return any(t.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) for t in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
                                    for a in n.attribute) for n in model.graph.node)


def _feed_for(sess, feed, emulated):
    types = {i.name: i.type for i in sess.get_inputs()}
    out = {}
    for k, v in feed.items():
        if k not in types:
            continue
        if types[k] == "tensor(float16)":
            v = v.astype(np.float16)
        elif types[k] == "tensor(float)" and v.dtype != np.float32 and v.dtype.kind == "f":
            v = v.astype(np.float32)
        out[k] = v
    return out


def _ref_nonfinite_outputs(reference, feeds, provider) -> list[set]:
    sess = ortx.session(reference, provider=provider, level="disable", lean=True)
    names = [o.name for o in sess.get_outputs()]
    res = []
    for feed in feeds:
        outs = sess.run(names, _feed_for(sess, feed, False))
        res.append({n for n, a in zip(names, outs) if a.dtype.kind == "f" and not np.all(np.isfinite(a))})
    return res


def _bad_batch(sess, emulated, feeds, ref_bad) -> int | None:
    names = [o.name for o in sess.get_outputs()]
    for i, feed in enumerate(feeds):
        outs = sess.run(names, _feed_for(sess, feed, emulated))
        for n, a in zip(names, outs):
            if a.dtype.kind == "f" and (ref_bad is None or n not in ref_bad[i]) and not np.all(np.isfinite(a)):
                return i
    return None


def first_nonfinite(candidate: onnx.ModelProto, feed: dict, emulated: bool, provider: str = "cpu"):
    """Node names to keep in FP32 for the first non-finite tensor (graph order), and a description of it.
    One extra run with a scalar sum |x| per float tensor (NaN/inf survive the sum)."""
    from .emulate import emulated_view
    m = emulated_view(candidate) if emulated else _copy(candidate)
    g = m.graph
    types = _float_types(m)
    probes, nodes = [], []
    for n in list(g.node):
        for o in n.output:
            if o in types and not o.endswith(("__emu_raw", "__emu_low")):  # probe the rounded tensor itself
                s = f"{o}__finite_probe"
                nodes += [helper.make_node("Cast", [o], [s + "_f"], to=TensorProto.FLOAT),
                          helper.make_node("Abs", [s + "_f"], [s + "_a"]),
                          helper.make_node("ReduceSum", [s + "_a"], [s], keepdims=0)]
                probes.append((n, o, s))
    g.node.extend(nodes)
    for _, _, s in probes:
        g.output.append(onnx.ValueInfoProto(name=s))
    sess = ortx.session(m, provider=provider, level="disable", lean=True)
    got = dict(zip([s for _, _, s in probes], sess.run([s for _, _, s in probes], _feed_for(sess, feed, emulated))))
    consumers: dict[str, list] = {}
    for n in candidate.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n, o, s in probes:
        if np.isfinite(got[s]):
            continue
        name = o
        node = next((c for c in candidate.graph.node if name in c.output), n)
        where = f"'{node.name}' ({node.op_type}) output '{name}'"
        # Inserted casts and Q/DQ carry no original op: keep the layers that read them instead.
        if node.op_type in ("Cast", "QuantizeLinear", "DequantizeLinear"):
            picked = [c.name for c in consumers.get(name, []) if c.op_type not in ("Cast",)]
            picked += [node.name] if node.op_type == "DequantizeLinear" else []
            ins = [i for i in node.input if i]
            src = next((c for c in candidate.graph.node if ins and ins[0] in c.output), None)
            if src is not None and src.op_type not in ("Cast", "QuantizeLinear", "DequantizeLinear"):
                picked.append(src.name)
            return picked, where
        return [node.name] + [c.name for c in consumers.get(name, []) if c.op_type != "Cast"], where
    return [], "no tensor (non-finite only in the outputs)"


def _copy(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _float_types(m) -> set[str]:
    inferred = opset_upgrade.infer_shapes(m)
    f = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return {vi.name for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
            if vi.type.tensor_type.elem_type in f}


def _line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
