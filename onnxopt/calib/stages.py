"""Staged runs: a model with more weights than the memory budget is cut into stages of about equal weight bytes;
one ONNX Runtime session per stage at a time, the tensors crossing a cut cached on disk (.npy, read memory-mapped)."""
from __future__ import annotations

import heapq
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import helper

from .. import modelfile, scratch
from ..errors import OnnxoptError

log = logging.getLogger(__name__)

STAGE_MIN_BYTES = 64 * 2**20
MAX_STAGES = 16


@dataclass
class Stage:
    """A run of nodes in topological order: `inputs` are what it reads from the graph inputs and from earlier
    stages, `outputs` what later stages read from it."""
    nodes: list
    inputs: list
    outputs: list
    weight_bytes: int
    produces: set


def stage_count(model: onnx.ModelProto, budget: int) -> int:
    """Stages needed so that each holds at most `budget` bytes of weights (1 for graphs with subgraphs)."""
    if modelfile.has_subgraphs(model.graph):
        return 1
    total = sum(modelfile.tensor_bytes(t) for t in model.graph.initializer)
    return int(min(MAX_STAGES, max(1, math.ceil(total / max(budget, STAGE_MIN_BYTES)))))


def split_stages(model: onnx.ModelProto, n: int, sizes: dict | None = None, cost=None) -> list[Stage]:
    """Cut the graph into `n` stages of about equal weight bytes (or equal `cost(node, weight bytes)`). Each cut
    is placed, among the positions near its target, where the fewest activation bytes cross it (`sizes`:
    tensor name -> bytes)."""
    nodes = _toposort(model.graph.node)
    inits = {t.name: modelfile.tensor_bytes(t) for t in model.graph.initializer}
    w = np.array([sum(inits.get(i, 0) for i in set(nd.input)) for nd in nodes], dtype=np.float64)
    if cost is not None:
        w = np.array([cost(nd, wb) for nd, wb in zip(nodes, w)], dtype=np.float64)
    n = max(1, min(n, len(nodes)))
    cuts = [0]
    if n > 1:
        cum = np.cumsum(w)
        live = _live_bytes(model, nodes, sizes or {})
        for j in range(1, n):
            target = cum[-1] * j / n
            slack = cum[-1] / n * 0.15
            cand = [p for p in range(cuts[-1] + 1, len(nodes)) if abs(cum[p - 1] - target) <= slack]
            if not cand:
                cand = [int(np.searchsorted(cum, target)) + 1]
            p = min(cand, key=lambda p: (live[p], abs(cum[p - 1] - target)))
            if cuts[-1] < p < len(nodes):
                cuts.append(p)
    cuts.append(len(nodes))
    graph_inputs = [vi.name for vi in model.graph.input if vi.name not in inits]
    later_use = {}  # tensor -> last stage that reads it
    stage_of_node = []
    for si in range(len(cuts) - 1):
        stage_of_node += [si] * (cuts[si + 1] - cuts[si])
    for nd, si in zip(nodes, stage_of_node):
        for i in _reads(nd):
            later_use[i] = max(later_use.get(i, -1), si)
    plan = []
    for si in range(len(cuts) - 1):
        part = nodes[cuts[si]:cuts[si + 1]]
        produces = {o for nd in part for o in nd.output if o}
        reads = []
        for nd in part:
            for i in _reads(nd):
                if i not in produces and i not in inits and i not in reads:
                    reads.append(i)
        outs = [o for o in sorted(produces) if later_use.get(o, -1) > si]
        wb = int(sum(inits.get(i, 0) for i in {i for nd in part for i in nd.input}))
        plan.append(Stage(part, [i for i in reads if i in graph_inputs] + [i for i in reads if i not in graph_inputs],
                          outs, wb, produces))
    return plan


def needed_only(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """`model` reduced to the nodes that the tensors `names` depend on, with those (that nodes produce) as its
    outputs. Graphs with subgraphs stay whole: their reads of outer tensors are implicit."""
    if modelfile.has_subgraphs(model.graph):
        return model
    nodes = model.graph.node
    producer = {o: i for i, nd in enumerate(nodes) for o in nd.output if o}
    need, stack = set(), [n for n in names if n in producer]
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in need:
            need.add(i)
            stack.extend(_reads(nodes[i]))
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.name = model.graph.name
    m.graph.node.extend(nodes[i] for i in sorted(need))
    used = {t for k in need for t in nodes[k].input} | set(names)
    m.graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    m.graph.input.extend(vi for vi in model.graph.input if vi.name in used)
    m.graph.value_info.extend(vi for vi in model.graph.value_info if vi.name in producer and producer[vi.name] in need)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n in producer)
    return m


def stage_index(plan: list[Stage]) -> dict[str, int]:
    """Tensor -> the stage that produces it, or else the first stage that reads it (initializers)."""
    where = {}
    for si, st in reversed(list(enumerate(plan))):
        for nd in st.nodes:
            where.update((i, si) for i in nd.input if i)
    for si, st in enumerate(plan):
        where.update((o, si) for o in st.produces)
    return where


def _reads(node) -> list[str]:
    return [i for i in node.input if i]


def _toposort(nodes) -> list:
    """Kahn's algorithm, keeping the given order where it is already valid (exporters emit module order)."""
    nodes = list(nodes)
    producer = {o: i for i, nd in enumerate(nodes) for o in nd.output if o}
    deps = [{producer[i] for i in _reads(nd) if i in producer and producer[i] != k} for k, nd in enumerate(nodes)]
    if all(all(d < k for d in ds) for k, ds in enumerate(deps)):
        return nodes
    users = [[] for _ in nodes]
    for k, ds in enumerate(deps):
        for d in ds:
            users[d].append(k)
    pending = [len(ds) for ds in deps]
    ready = [k for k, c in enumerate(pending) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for u in users[k]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise OnnxoptError("the graph has a cycle; check the model with onnx.checker")
    return order


def _live_bytes(model, nodes, sizes: dict) -> np.ndarray:
    """live[p]: bytes of the tensors produced before node p and read at or after it (a cut before p)."""
    outputs = {vi.name for vi in model.graph.output}
    default = max(sizes.values(), default=4)
    made, last = {}, {}
    for k, nd in enumerate(nodes):
        for i in _reads(nd):
            last[i] = k
        for o in nd.output:
            if o:
                made[o] = k
    diff = np.zeros(len(nodes) + 2)
    for t, a in made.items():
        b = len(nodes) if t in outputs else last.get(t)
        if b is None or b <= a:
            continue
        diff[a + 1] += sizes.get(t, default)
        diff[b + 1] -= sizes.get(t, default)
    return np.cumsum(diff)


def tensor_names(model) -> list[str]:
    """Names of every node output of `model`."""
    return [o for nd in model.graph.node for o in nd.output if o]


def stage_model(model: onnx.ModelProto, st: Stage, outputs: Sequence[str], after: dict, cache: "BoundaryCache",
                extra_inputs: Sequence[onnx.ValueInfoProto] = (),
                extra_initializers: Sequence[onnx.TensorProto] = (), types: dict | None = None) -> onnx.ModelProto:
    """The sub-model of one stage: its nodes (plus reductions), the initializers they read, its inputs
    (typed from the model, from `types` ({tensor: (ONNX element type, rank)}, shape inference's) or else from the
    cached arrays of the first batch, plus `extra_inputs`: what the reductions read from the host),
    `extra_initializers` (the reductions' shared constants) and `outputs`."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.name = model.graph.name
    m.graph.node.extend(st.nodes)
    used = {i for nd in st.nodes for i in nd.input}
    m.graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    known = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}
    graph_inputs = {vi.name: vi for vi in model.graph.input}
    for name in st.inputs:
        if name in graph_inputs:
            m.graph.input.append(graph_inputs[name])
            continue
        # A tensor from an earlier stage: type and rank from shape inference or its cached array, dims left free.
        if types and name in types:
            elem, rank = types[name]
        else:
            a = cache.peek(name)
            elem, rank = helper.np_dtype_to_tensor_dtype(a.dtype), a.ndim
        m.graph.input.append(helper.make_tensor_value_info(name, elem, [None] * rank))
    m.graph.input.extend(extra_inputs)
    m.graph.initializer.extend(extra_initializers)
    m.graph.value_info.extend(vi for n, vi in known.items() if n in st.produces and n not in outputs)
    out = outputs or [o.name for o in model.graph.output if o.name in st.produces] or [st.nodes[-1].output[0]]
    return _with_outputs(m, out, after)


class BoundaryCache:
    """Tensors that cross from one stage into a later one, one .npy per tensor and batch in a temporary
    directory, read back memory-mapped. Small ones (shape values, scalars: thousands per batch on a UNet)
    stay in memory up to SMALL_TOTAL bytes: a file each cost more time than the tensors themselves."""
    SMALL, SMALL_TOTAL = 1 << 16, 64 << 20

    def __init__(self, enabled: bool):
        self.dir = None
        self.enabled = enabled
        self.index: dict[str, int] = {}
        self.bytes = 0
        self.small: dict[tuple[int, str], np.ndarray] = {}
        self.small_bytes = 0

    def __enter__(self):
        if self.enabled:
            self.dir = Path(tempfile.mkdtemp(prefix="onnxopt-stages-"))
        return self

    def __exit__(self, *exc):
        if self.dir is not None:
            log.info("stage boundaries took %.2f GB on disk", self.bytes / 1e9)
            scratch.remove_later(self.dir)  # gigabytes: removed beside the work that follows, not before it

    def _path(self, batch: int, name: str) -> Path:
        k = self.index.setdefault(name, len(self.index))
        return self.dir / f"{batch}_{k}.npy"

    def save(self, batch: int, arrays: dict) -> None:
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.nbytes <= self.SMALL and self.small_bytes + a.nbytes <= self.SMALL_TOTAL:
                self.small[(batch, name)] = a.copy()
                self.small_bytes += a.nbytes
                continue
            np.save(self._path(batch, name), a)
            self.bytes += a.nbytes

    def _load(self, batch: int, name: str) -> np.ndarray:
        small = self.small.get((batch, name))
        return small if small is not None else np.load(self._path(batch, name), mmap_mode="r")

    def load(self, batch: int, names: Sequence[str]) -> dict:
        return {n: self._load(batch, n) for n in names}

    def peek(self, name: str) -> np.ndarray:
        return self._load(0, name)


def _with_outputs(model: onnx.ModelProto, names: Sequence[str], after: dict | None = None) -> onnx.ModelProto:
    """`model` with extra graph outputs; `after` maps a tensor to nodes placed right after its producer, so
    that (with priority-based execution) each reduction runs, and its input is freed, as early as possible."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if after:
        nodes = []
        for n in m.graph.node:
            nodes.append(n)
            for o in n.output:
                nodes.extend(after.get(o, ()))
        placed = {o for n in m.graph.node for o in n.output}
        for name, extra in after.items():  # tensors without a producer node (initializers)
            if name not in placed:
                nodes.extend(extra)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m
