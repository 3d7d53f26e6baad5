"""Model I/O: the only place that touches protobuf files on disk.

Weights stay lazy: a model is parsed without its external data, and each external tensor is read on
demand (one at a time) when a pass needs its values or when the model is saved. Saving is atomic
(temporary files, then rename) and switches to external data above 2 GB.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper, numpy_helper

from .toposort import toposort
from .protowire import copy_without, key, split_at, varint
from .atomicfile import check_output_path, replace, temp_beside
from .errors import OnnxoptError

log = logging.getLogger(__name__)

# onnxruntime(-gpu) 1.31 reads IR versions up to 13; onnx 1.23 stamps 14.
MAX_IR_VERSION = 13
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
_ALIGN = 4096  # page-aligned offsets let ONNX Runtime memory-map external weights


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse a model without loading external data; external locations become absolute paths
    so that tensors can be read lazily from anywhere."""
    path = Path(path)
    if not path.is_file():
        raise OnnxoptError(f"{path}: no such model file; check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise OnnxoptError(f"{path}: not a readable ONNX model ({type(e).__name__}); the file may be corrupt or truncated, re-export it") from None
    if not model.graph.node:
        raise OnnxoptError(f"{path}: the model has no nodes; the file may be truncated, re-export it")
    base = path.resolve().parent
    for t in all_tensors(model):
        if external_data_helper.uses_external_data(t):
            info = external_data_helper.ExternalDataInfo(t)
            loc = base / info.location
            if not loc.is_file():
                raise OnnxoptError(f"{path}: external data file '{info.location}' for tensor '{t.name}' is missing; keep the model's data files beside it")
            need = (info.offset or 0) + (info.length or 0)
            if info.length and loc.stat().st_size < need:
                raise OnnxoptError(f"{path}: external data file '{info.location}' is truncated (tensor '{t.name}' needs {need} bytes); re-export the model")
            set_location(t, str(loc))
    return model


def all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of `model`, in onnx's order: the initializers (the main graph's first, then subgraphs'),
    then node attributes' (functions' last). One walk reading each attribute's type once: onnx's two generator
    walks cost ~1.7 s per tiny-SDXL `--auto` run, which lists them for every stage session."""
    inits: list = []
    attrs: list = []
    _walk(model.graph, inits, attrs)
    for f in model.functions:
        _walk(f, None, attrs)
    return inits + attrs


def _walk(graph, inits: list | None, attrs: list) -> None:
    """Append `graph`'s initializers (None: a function, which has none, nor do its subgraphs count) and its
    attribute tensors, subgraphs included."""
    if inits is not None:
        inits.extend(graph.initializer)
    sub_inits = inits if inits is not None else []
    for node in graph.node:
        for a in node.attribute:
            t = a.type
            if t == onnx.AttributeProto.TENSOR:
                attrs.append(a.t)
            elif t == onnx.AttributeProto.TENSORS:
                attrs.extend(a.tensors)
            elif t == onnx.AttributeProto.GRAPH:
                _walk(a.g, sub_inits, attrs)
            elif t == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _walk(g, sub_inits, attrs)


def set_location(t: onnx.TensorProto, location: str) -> None:
    """Point an external tensor at file `location`."""
    for e in t.external_data:
        if e.key == "location":
            e.value = location
            return
    t.external_data.add(key="location", value=location)


def tensor_bytes(t: onnx.TensorProto) -> int:
    if external_data_helper.uses_external_data(t):
        info = external_data_helper.ExternalDataInfo(t)
        if info.length:
            return int(info.length)
        n = int(np.prod(t.dims)) if t.dims else 1
        return n * _itemsize(t.data_type)
    return t.ByteSize()


def _itemsize(data_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def read_external(t: onnx.TensorProto) -> bytes:
    info = external_data_helper.ExternalDataInfo(t)
    with open(info.location, "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length) if info.length else f.read()


# Types whose external bytes are the numpy array's as is (little-endian, one element per item): read straight
# into the array, without the bytes -> protobuf -> numpy copies (three passes over 10 GB for an SDXL UNet).
_PLAIN = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
          onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT16: np.int16,
          onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT32: np.uint32,
          onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT64: np.uint64}


# Element types stored two to a byte: their external bytes are onnx's packing, not the numpy array's.
_PACKED = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1}


def to_array(t: onnx.TensorProto) -> np.ndarray:
    """Values of a tensor, reading external data (with an absolute location) on demand."""
    if external_data_helper.uses_external_data(t):
        dtype = _PLAIN.get(t.data_type)
        if dtype is not None and sys.byteorder == "little":
            info = external_data_helper.ExternalDataInfo(t)
            count = int(np.prod(t.dims)) if t.dims else 1
            if not info.length or info.length == count * np.dtype(dtype).itemsize:
                with open(info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    a = np.fromfile(f, dtype=dtype, count=count)
                if a.size == count:
                    return a.reshape(tuple(t.dims))
        tmp = onnx.TensorProto()
        tmp.CopyFrom(t)
        del tmp.external_data[:]
        tmp.data_location = onnx.TensorProto.DEFAULT
        tmp.raw_data = read_external(t)
        return numpy_helper.to_array(tmp)
    return numpy_helper.to_array(t)


def embedded_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weights held inside the protobuf (not in external files)."""
    return sum(t.ByteSize() for t in all_tensors(model) if not external_data_helper.uses_external_data(t))


EXTERNALIZE_BYTES = 32 * 2**20  # above this, copies of the protobuf would dominate peak memory


def externalize_if_large(model: onnx.ModelProto, workdir, copy: bool = False) -> onnx.ModelProto:
    """`externalize` when the embedded weights exceed EXTERNALIZE_BYTES (`copy` keeps the caller's model intact)."""
    if embedded_bytes(model) <= EXTERNALIZE_BYTES:
        return model
    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        model = m
    return externalize(model, workdir)


def externalize(model: onnx.ModelProto, workdir: str | os.PathLike) -> onnx.ModelProto:
    """Move embedded weights to an external-data file in `workdir` and return the lazily loaded model.
    Passes then copy and serialize only the graph, never the weights (ORT reads them from the file)."""
    path = Path(workdir) / "model.onnx"
    save(model, path, external_data=True)  # clears each tensor's payload as it is written
    return load(path)


def internalize(model: onnx.ModelProto) -> None:
    """Read every external tensor into the protobuf (for models that must outlive their data files)."""
    for t in all_tensors(model):
        if external_data_helper.uses_external_data(t):
            raw = read_external(t)
            del t.external_data[:]
            if t.data_type in _PACKED:  # as numpy_helper.from_array writes them (the form they had before spilling)
                t.ClearField("data_location")
            else:
                t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw


def model_bytes(model: onnx.ModelProto) -> int:
    """Approximate size of the model with all its weights."""
    return sum(tensor_bytes(t) for t in all_tensors(model)) + model.graph.ByteSize() // 4


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx-graphsurgeon graph whose constants load lazily (external ones through `to_array`)."""
    graph = gs.import_onnx(model)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            # Locations live in the TensorProto that LazyValues exports as is; a constant given new values
            # must not inherit "external" without a location.
            tensor.data_location = None
            if isinstance(tensor._values, gs.ir.tensor.LazyValues):
                tensor._values = _LazyExternal(tensor._values.tensor)
    return graph


class _LazyExternal(gs.ir.tensor.LazyValues):
    """gs LazyValues that can read external data stored at an absolute location."""

    def load(self):
        return to_array(self.tensor)


SPILL_BYTES = 1 << 20
# 4-bit codes spill from a smaller size: a save writes them the same whether they were spilled or not (`internalize`),
# and full-size SDXL has hundreds of NVFP4 weights of 0.1 to 1 MB packed (0.4 GB held otherwise).
PACKED_SPILL_BYTES = 64 << 10
_SPILL: contextvars.ContextVar = contextvars.ContextVar("onnxopt_spill", default=None)
# Appends (seek to the end, write) from two threads at once: calibration's lazyscale products on the main thread and
# the weight codes quant.prequantize computes meanwhile.
_SPILL_LOCK = threading.Lock()


@contextlib.contextmanager
def spilling(workdir: str | os.PathLike):
    """Within this block, `set_values` writes big new weights to a file in `workdir` and keeps them lazy,
    so passes that rewrite every weight (SmoothQuant, AWQ, 2:4) never hold them all in memory, and the
    graphs exported for ONNX Runtime carry file references instead of copies."""
    fd, path = tempfile.mkstemp(prefix="spill-", suffix=".data", dir=workdir)
    with os.fdopen(fd, "w+b") as f:
        token = _SPILL.set((f, path))
        try:
            yield path
        finally:
            _SPILL.reset(token)


def spilling_now() -> bool:
    """Whether `set_values` spills here (inside `spilling`, in this thread's context)."""
    return _SPILL.get() is not None


def set_values(const: gs.Constant, values: np.ndarray) -> None:
    """Give `const` new values: in memory, or inside `spilling`, appended to its file and read on demand.
    4-bit values (INT4, FP4 E2M1, which graphsurgeon cannot serialize) are kept packed, two a byte. Lazy values
    (spilled earlier, e.g. by `spilled`) are taken as they are: not read and written again."""
    if isinstance(values, gs.ir.tensor.LazyValues):
        const._values = values
        return
    spill = _SPILL.get()
    values = np.asarray(values)
    if values.dtype.kind == "V" and helper.np_dtype_to_tensor_dtype(values.dtype) in _PACKED:
        t = numpy_helper.from_array(values, const.name)  # packed: half the array's bytes
        if spill is None or len(t.raw_data) < PACKED_SPILL_BYTES:
            const._values = _LazyExternal(t)
        else:
            _spill(const, t.data_type, values.shape, memoryview(t.raw_data), spill)
        return
    if spill is None or values.nbytes < SPILL_BYTES or values.dtype.kind not in "fiuV":  # V: ml_dtypes FP8
        const.values = values
        return
    _spill(const, helper.np_dtype_to_tensor_dtype(values.dtype), values.shape,
           np.ascontiguousarray(values).reshape(-1).view(np.uint8), spill)  # the array's own bytes, not a copy


def _spill(const: gs.Constant, data_type: int, shape: tuple, payload, spill) -> None:
    """Append `payload` (the tensor's external bytes) to the spill file, page-aligned, and make `const` read it lazily."""
    f, path = spill
    with _SPILL_LOCK:
        end = f.seek(0, os.SEEK_END)
        offset = end + (-end) % _ALIGN  # page-aligned, like io.save
        f.seek(offset)
        f.write(payload)
        f.flush()
    t = onnx.TensorProto(name=const.name, data_type=data_type, dims=shape, data_location=onnx.TensorProto.EXTERNAL)
    for k, v in (("location", path), ("offset", str(offset)), ("length", str(payload.nbytes))):
        t.external_data.add(key=k, value=v)
    const._values = _LazyExternal(t)


def constant(name: str, values: np.ndarray) -> gs.Constant:
    """A new graphsurgeon constant whose values go through `set_values` (spilled inside `spilling`)."""
    c = gs.Constant(name, values)
    set_values(c, values)
    return c


def held_values(const: gs.Constant):
    """`const`'s values as it holds them, not read: lazy (spilled, external) or an array. `set_values` takes them
    as they are."""
    return const._values


def spilled(name: str, values: np.ndarray):
    """`values` as `constant(name, values)` would hold them: spilled (lazy values) or, if small, the array itself.
    Give the result to `constant`/`set_values` later: it is not written again."""
    return constant(name, values)._values


def export_graph(graph: gs.Graph, opset: int | None = None) -> onnx.ModelProto:
    """The graph as a ModelProto. Lazy constants export their source TensorProto, which graphsurgeon renames
    in place: a renamed one (autocast's `w` -> `w_fp32`) gets its own copy first, or the source model (the
    runner's FP32 reference) would lose the name its nodes read (issue 22: "'val_32' is not a graph input")."""
    toposort(graph.cleanup(remove_unused_graph_inputs=False))
    _detach_renamed(graph)
    kwargs = {}
    if opset is not None:
        graph.opset = max(graph.opset, opset)
    model = gs.export_onnx(graph, do_type_check=False, **kwargs)
    _weights_before_use(model.graph)
    return model


def _detach_renamed(graph: gs.Graph) -> None:
    claimed: dict[int, str] = {}
    for c in graph.tensors().values():
        if not (isinstance(c, gs.Constant) and isinstance(c._values, gs.ir.tensor.LazyValues)):
            continue
        src = c._values.tensor
        if src.name == c.name and claimed.setdefault(id(src), c.name) == c.name:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(src)  # external data: the location only; embedded: that one tensor
        copy.name = c.name
        c._values = _LazyExternal(copy)


def has_subgraphs(g: onnx.GraphProto) -> bool:
    """Whether a node holds a subgraph (If/Loop/Scan), whose reads of outer tensors are implicit."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute)


def _weights_before_use(g: onnx.GraphProto) -> None:
    """Move nodes that read only weights (a weight's DequantizeLinear, Cast, Transpose) to just before
    their first reader. graphsurgeon's toposort puts them all together; executed in graph order, that
    would hold every dequantized weight at once."""
    if has_subgraphs(g):
        return  # implicit reads of outer tensors: keep the order
    static = {t.name for t in g.initializer}
    is_static = []
    for n in g.node:
        st = all(i in static for i in n.input if i)
        is_static.append(st)
        if st:
            static.update(o for o in n.output if o)
    if not any(is_static):
        return
    producer = {o: k for k, n in enumerate(g.node) for o in n.output if o}
    order, placed = [], [False] * len(g.node)

    def place(k):
        stack = [(k, False)]
        while stack:
            j, ready = stack.pop()
            if placed[j]:
                continue
            if ready:
                placed[j] = True
                order.append(j)
                continue
            stack.append((j, True))
            stack.extend((producer[i], False) for i in g.node[j].input if i in producer and is_static[producer[i]])

    for k, n in enumerate(g.node):
        if not is_static[k]:
            place(k)
    order += [k for k in range(len(g.node)) if not placed[k]]  # weights read only by graph outputs
    nodes = [g.node[k] for k in order]
    del g.node[:]
    g.node.extend(nodes)


def stamp_ir_version(model: onnx.ModelProto) -> None:
    """Lowest IR version that the opsets and data types need, never above what ORT 1.31 reads."""
    need = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    types = {t.data_type for t in all_tensors(model)}
    types |= {vi.type.tensor_type.elem_type for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    P = onnx.TensorProto
    if types & {P.FLOAT8E4M3FN, P.FLOAT8E4M3FNUZ, P.FLOAT8E5M2, P.FLOAT8E5M2FNUZ}:
        need = max(need, 9)
    if types & {P.INT4, P.UINT4}:
        need = max(need, 10)
    model.ir_version = min(max(need, 7), MAX_IR_VERSION)


def save(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
         input_path: str | os.PathLike | None = None) -> Path:
    """Write `model` atomically. External data is used automatically above 2 GB (or when asked);
    external tensors of the source are streamed one at a time into the new data file (or into the one file).
    Afterwards `model` is lazy on the saved file(s): its big tensors are read from there."""
    path = Path(path)
    if input_path is not None:
        check_output_path(path, input_path)
    stamp_ir_version(model)
    if external_data is None:
        external_data = model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    fd, tmp_model = temp_beside(path)
    os.close(fd)
    tmp_data = None
    try:
        if external_data:
            fd, tmp_data = temp_beside(path, name=data_name)
            with os.fdopen(fd, "wb") as f:
                for t in all_tensors(model):
                    _move_to_file(t, f, data_name)
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
        else:
            with open(tmp_model, "wb") as f:
                placed = _write_embedded(model, f)
        if tmp_data:
            replace(tmp_data, path.parent / data_name)
        replace(tmp_model, path)
        # `model` reads its weights from the saved files from now on (a work directory it read them from may go)
        if external_data:
            data = str((path.parent / data_name).resolve())
            for t in all_tensors(model):
                if external_data_helper.uses_external_data(t):
                    set_location(t, data)
        else:
            for t, offset, length in placed:
                _point_at(t, str(path.resolve()), offset, length)
    except BaseException:
        for p in (tmp_model, tmp_data):
            if p and os.path.exists(p):
                os.unlink(p)
        raise
    log.info("saved %s%s", path, f" (+ {data_name})" if external_data else "")
    return path


# ---------------------------------------------------------------- one file, streamed
# A model saved as one file is `model.SerializeToString()` with every tensor embedded. Built whole, it holds the
# weights twice (the internalized message and its bytes: 2 x 1.6 GB for SDXL in NVFP4). Protobuf writes a message's
# fields in field-number order, each a key, (for messages and bytes) a length, then the payload, so the same bytes
# are written here piece by piece: the graph without its initializers, and each initializer read, written and
# dropped in turn, its length known beforehand from its metadata.
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


def _embedded_form(t: onnx.TensorProto) -> tuple[onnx.TensorProto, int]:
    """An external tensor's metadata as `internalize` leaves it, without its bytes, and their count."""
    meta = onnx.TensorProto()
    meta.CopyFrom(t)
    del meta.external_data[:]
    if t.data_type in _PACKED:
        meta.ClearField("data_location")
    else:
        meta.data_location = onnx.TensorProto.DEFAULT
    info = external_data_helper.ExternalDataInfo(t)
    if info.length:
        return meta, int(info.length)
    return meta, os.path.getsize(info.location) - (info.offset or 0)


def _write_embedded(model: onnx.ModelProto, f) -> list:
    """Write `model` with every tensor embedded, byte for byte `internalize(model); model.SerializeToString()`,
    holding one initializer's bytes at a time; `model` is not changed. Returns [(initializer, offset of its bytes
    in the file, length)] for the initializers that were external."""
    # tensors outside the initializers (Constant attributes, subgraphs; rare and small): embedded in place
    for t in [t for t in _tensors_outside_initializers(model) if external_data_helper.uses_external_data(t)]:
        raw = read_external(t)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = raw
    g_head, g_tail = split_at(copy_without(model.graph, "initializer").SerializeToString(), _INITIALIZER)
    sizes = []  # (tensor, metadata or None, byte count, serialized size)
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            meta, n = _embedded_form(t)
            sizes.append((t, meta, n, meta.ByteSize() + len(key(_RAW_DATA)) + len(varint(n)) + n))
        else:
            sizes.append((t, None, 0, t.ByteSize()))
    graph_len = len(g_head) + len(g_tail) + sum(len(key(_INITIALIZER)) + len(varint(s)) + s for *_, s in sizes)
    m_head, m_tail = split_at(copy_without(model, "graph").SerializeToString(), _GRAPH)
    if len(m_head) + len(m_tail) + len(key(_GRAPH)) + len(varint(graph_len)) + graph_len > 2**31 - 1:
        raise OnnxoptError("model exceeds 2 GB; save it with external data")
    f.write(m_head + key(_GRAPH) + varint(graph_len) + g_head)
    placed = []
    for t, meta, n, size in sizes:
        f.write(key(_INITIALIZER) + varint(size))
        if meta is None:
            f.write(t.SerializeToString())
            continue
        head, tail = split_at(meta.SerializeToString(), _RAW_DATA)
        f.write(head + key(_RAW_DATA) + varint(n))
        offset = f.tell()
        raw = read_external(t)
        if len(raw) != n:
            raise OnnxoptError(f"external data of tensor '{t.name}' is truncated; re-export the model")
        f.write(raw)
        del raw
        f.write(tail)
        placed.append((t, offset, n))
    f.write(g_tail + m_tail)
    return placed


def _tensors_outside_initializers(model: onnx.ModelProto) -> list:
    """Every tensor of `model` but the main graph's initializers (which `all_tensors` lists first)."""
    return list(itertools.islice(all_tensors(model), len(model.graph.initializer), None))


def _copy_external(t: onnx.TensorProto, f) -> int | None:
    """Append an external tensor's bytes to `f` inside the kernel (no copy through Python). Returns the byte
    count, or None where that is not possible (then nothing was written)."""
    info = external_data_helper.ExternalDataInfo(t)
    if not info.length or not hasattr(os, "copy_file_range"):
        return None
    f.flush()
    start = f.tell()
    try:
        with open(info.location, "rb") as src:
            offset, left = info.offset or 0, int(info.length)
            while left:
                n = os.copy_file_range(src.fileno(), f.fileno(), left, offset, None)
                if n <= 0:
                    raise OSError("copy_file_range copied nothing")
                offset, left = offset + n, left - n
    except OSError:
        f.seek(start)
        f.truncate()
        return None
    f.seek(0, os.SEEK_END)
    return int(info.length)


def _move_to_file(t: onnx.TensorProto, f, data_name: str) -> None:
    if external_data_helper.uses_external_data(t):
        pad = (-f.tell()) % _ALIGN
        f.write(b"\0" * pad)
        offset = f.tell()
        n = _copy_external(t, f)
        if n is not None:
            _point_at(t, data_name, offset, n)
            return
        raw = read_external(t)
    elif t.HasField("raw_data"):
        raw = t.raw_data
    else:
        if t.ByteSize() < 1024:
            return
        raw = numpy_helper.to_array(t).tobytes()
        t.ClearField(_field_for(t))
    if len(raw) < 1024 and not external_data_helper.uses_external_data(t):
        return
    pad = (-f.tell()) % _ALIGN
    f.write(b"\0" * pad)
    offset = f.tell()
    f.write(raw)
    _point_at(t, data_name, offset, len(raw))


def _point_at(t: onnx.TensorProto, data_name: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.ClearField("raw_data")
    for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)
    t.data_location = onnx.TensorProto.EXTERNAL


def _field_for(t: onnx.TensorProto) -> str:
    return helper.tensor_dtype_to_field(t.data_type)
