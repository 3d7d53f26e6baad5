"""The gated graph cut into stages: each node of the gated graph assigned to a stage (the model's own nodes to
theirs, a gate's If to the stage of the layer that owns it, or later where its input is made later, other added
nodes after their inputs, the gate-reading Gather/Greater nodes into every stage that needs them) and each
stage written as a model of its own, optionally with only a few gates' Ifs, with in-graph squared errors, or
with its gates inlined (`StagePlan.inline`)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .candidates import GATES


# On CUDA an If's subgraph runs on a stream of its own, made with its own cuBLAS/cuDNN handles and kept by the
# session: the full-size SDXL run (32 stages, ~1000 Ifs, H200) failed in cublasCreate, at stage 16 with every
# stage cached and at stage 31 with four. CUDA stages therefore carry no Ifs: each gate is inlined as its
# then-branch and a Where on the gate (`StagePlan.inline`), which costs one Q/DQ per gate and run.

# ---------------------------------------------------------------- graph bookkeeping
def _subgraph_reads(node) -> set:
    """Outer tensors read inside `node`'s subgraphs (implicit inputs)."""
    out = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            made = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
            for n in g.node:
                out |= {i for i in n.input if i and i not in made}
                out |= _subgraph_reads(n) - made
    return out


def node_reads(node) -> set:
    """Every tensor `node` reads, inside its subgraphs too."""
    return {i for i in node.input if i} | _subgraph_reads(node)


class StagePlan:
    """The gated graph's nodes assigned to stages; per stage: nodes, inputs, outputs."""

    def __init__(self, model: onnx.ModelProto, where: dict, index: dict):
        g = model.graph
        self.model = model
        inits = {t.name: t for t in g.initializer}
        nodes = list(g.node)
        producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
        reads = [node_reads(n) for n in nodes]
        # A node's reads, by node (If subgraphs walked once: the sessions' bookkeeping asked for them per session)
        self._known = {id(n): (n, r) for n, r in zip(nodes, reads)}
        for n in nodes:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    self._known.update((id(x), (x, node_reads(x))) for x in a.g.node)
        # Free nodes (not Ifs) read only weights, the gate vector or other free nodes: copied into every stage
        # needing them (the gates' Gather/Greater).
        free = [False] * len(nodes)
        for k, n in enumerate(nodes):
            fp32 = (n.name or n.output[0]) in where
            free[k] = not fp32 and n.op_type != "If" and all(r in inits or r == GATES or (r in producer and free[producer[r]])
                                       for r in reads[k])
        owner = {i: where.get(layer, 0) for (layer, _), i in index.items()}
        gate_of = self._gate_of(nodes, producer, inits)
        self.gate_by_node = {nodes[k].name: i for k, i in gate_of.items()}
        self.passes = {}  # If node -> the outer tensor its else-branch passes through
        # A weight read only by a gate's else-branch is exported inside it: pruning that If brings it out.
        self.branch_inits = {t.name: t for k in gate_of for a in nodes[k].attribute if a.type == onnx.AttributeProto.GRAPH
                             for t in a.g.initializer}
        for k in gate_of:
            els = next((a.g for a in nodes[k].attribute if a.name == "else_branch"), None)
            if els is not None and len(els.node) == 1 and els.node[0].op_type == "Identity" and nodes[k].name:
                self.passes[nodes[k].name] = els.node[0].input[0]
        stage = [0] * len(nodes)
        for k, n in enumerate(nodes):
            if free[k]:
                continue
            s = where.get(n.name or n.output[0])
            if s is None:
                s = owner.get(gate_of.get(k), 0) if n.op_type == "If" else 0
            before = [stage[producer[r]] for r in reads[k] if r in producer and not free[producer[r]]]
            stage[k] = max([s] + before)  # never before its inputs
        self.n = max([s for k, s in enumerate(stage) if not free[k]], default=0) + 1
        self.gate_stages: dict[int, set] = {}
        for k, i in gate_of.items():
            if not free[k]:
                self.gate_stages.setdefault(i, set()).add(stage[k])
        self.stage_gates: dict[int, set] = {}
        for i, ss in self.gate_stages.items():
            for st_ in ss:
                self.stage_gates.setdefault(st_, set()).add(i)
        last_use: dict[str, int] = {}
        for k, n in enumerate(nodes):
            if not free[k]:
                for r in reads[k]:
                    last_use[r] = max(last_use.get(r, -1), stage[k])
        outs = [o.name for o in g.output]
        self.out = outs[0]
        self.stages = []
        for s in range(self.n):
            mine = {k for k in range(len(nodes)) if not free[k] and stage[k] == s}
            stack = [producer[r] for k in mine for r in reads[k] if r in producer and free[producer[r]]]
            while stack:  # the free nodes this stage needs
                k = stack.pop()
                if k not in mine:
                    mine.add(k)
                    stack += [producer[r] for r in reads[k] if r in producer and free[producer[r]]]
            made = {o for k in mine for o in nodes[k].output if o}
            need = set().union(*(reads[k] for k in mine)) if mine else set()
            ins = sorted(r for r in need if r not in made and r not in inits)
            produced = {o for k in mine if not free[k] for o in nodes[k].output if o}
            sends = sorted(o for o in produced if last_use.get(o, -1) > s or o in outs)
            self.stages.append({"nodes": [nodes[k] for k in sorted(mine)], "inputs": ins, "outputs": sends,
                                "inits": [inits[r] for r in sorted(need & inits.keys())],
                                "later": {o for o in sends if last_use.get(o, -1) > s}})
        self.made_in = {o: s for s, st in enumerate(self.stages) for o in st["outputs"]}
        self.graph_inputs = {vi.name: vi for vi in g.input}
        self.last_use = last_use
        self.inline = False  # gates as Where(gate, then-branch, input) instead of If (see the CUDA note above)

    def reads(self, node, memo: dict | None = None) -> set:
        """`node_reads(node)`, looked up for the plan's own nodes (and their If branches' nodes); other nodes (the
        copies one `proto` makes) are remembered in `memo` for that call."""
        hit = self._known.get(id(node))
        if hit is None and memo is not None:
            hit = memo.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        r = node_reads(node)
        if memo is not None:
            memo[id(node)] = (node, r)  # holds the node: its id stays its own while the memo lives
        return r

    @staticmethod
    def _gate_of(nodes, producer, inits) -> dict:
        """If node -> the gate index its condition reads (Greater(Gather(gates, i), 0.5))."""
        out = {}
        for k, n in enumerate(nodes):
            if n.op_type != "If" or n.input[0] not in producer:
                continue
            gt = nodes[producer[n.input[0]]]
            if gt.op_type != "Greater" or gt.input[0] not in producer:
                continue
            ga = nodes[producer[gt.input[0]]]
            if ga.op_type == "Gather" and ga.input[0] == GATES and ga.input[1] in inits:
                out[k] = int(numpy_helper.to_array(inits[ga.input[1]]))
        return out

    def proto(self, s: int, types: dict, errors: bool = False, only: set | None = None,
              outputs: bool = False, extra: tuple = (), suffix: set | None = None,
              fixed: bool = False, picked: tuple | None = None) -> onnx.ModelProto:
        """Stage `s` as a model. `types`: boundary tensor -> an array of it (dtype, rank). With `errors`, each float
        output t also gets an input `t__ref` and the output `t__err` = sum((t - t__ref)^2), the only outputs
        unless `outputs` (the stage's outputs first: one session for chains and errors); `extra`: more outputs.
        `only`: gate indices whose Ifs stay; the others become their else-branch (each If costs ~0.3 ms a run).
        `suffix`: only the nodes these gates can change (`nodes`), the FP32 tensors they read from the others
        as inputs (`frontier`; `types` must hold them); errors of the outputs those nodes make. `fixed`: the gates
        `only` are on for good: their then-branches inlined, no If and no gate input (one mix's own stage).
        `picked`: what `nodes` returned for these arguments, if the caller asked it already."""
        st, m = self.stages[s], onnx.ModelProto()
        m.ir_version = self.model.ir_version
        m.opset_import.extend(self.model.opset_import)
        m.functions.extend(self.model.functions)
        m.graph.name = f"{self.model.graph.name}_stage{s}"
        memo: dict = {}
        nodes, frontier = picked or self.nodes(s, only, suffix, fixed, memo)
        m.graph.node.extend(nodes)
        reads = set().union(*(self.reads(n, memo) for n in nodes)) if nodes else set()
        m.graph.initializer.extend(t for t in st["inits"] if only is None or t.name in reads)
        made = {o for n in nodes for o in n.output} | {t.name for t in st["inits"]}
        m.graph.initializer.extend(self.branch_inits[r] for r in sorted(reads - made) if r in self.branch_inits)
        for name in list(st["inputs"]) + frontier:
            if only is not None and name not in reads:
                continue
            if name in self.graph_inputs:
                m.graph.input.append(self.graph_inputs[name])
            else:
                a = types[name]
                m.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                                                   [None] * a.ndim))
        if not errors or outputs:
            m.graph.output.extend(onnx.ValueInfoProto(name=o) for o in st["outputs"])
        m.graph.output.extend(onnx.ValueInfoProto(name=o) for o in extra)
        if not errors:
            return m
        for o in self.float_outputs(s, types):
            if o not in made:  # a suffix's FP32 output: no error
                continue
            ref, d, e, rank = f"{o}__ref", f"{o}__diff", f"{o}__err", types[o].ndim
            m.graph.input.append(helper.make_tensor_value_info(ref, onnx.TensorProto.FLOAT, [None] * rank))
            m.graph.node.extend([helper.make_node("Sub", [o, ref], [d], name=d),
                                 helper.make_node("Mul", [d, d], [d + "2" if rank > 1 else e], name=d + "2")])
            if rank > 1:  # per leading index (the samples): the metric is a mean over samples
                m.graph.initializer.append(numpy_helper.from_array(np.arange(1, rank, dtype=np.int64), e + "_axes"))
                m.graph.node.append(helper.make_node("ReduceSum", [d + "2", e + "_axes"], [e], name=e, keepdims=0))
            m.graph.output.append(onnx.ValueInfoProto(name=e))
        return m

    def nodes(self, s: int, only: set | None = None, suffix: set | None = None,
              fixed: bool = False, memo: dict | None = None) -> tuple[list, list]:
        """(stage `s`'s nodes as `proto` writes them, the frontier: FP32 tensors a `suffix` reads from the
        nodes it leaves out). A suffix keeps the gates' Ifs (inlined: their Where and then-branch nodes), every
        node downstream of them and the weight-only chains those read: a candidate of these gates runs only
        what it can change, fed the rest once per batch (`StagedEvaluator._stage_errors`)."""
        st = self.stages[s]
        memo = {} if memo is None else memo
        nodes = st["nodes"] if only is None else self._pruned(st["nodes"], only, st["outputs"], memo)
        seeds: set = set()
        if suffix is not None:
            seeds = {id(n) for n in nodes if self.gate_by_node.get(n.name) in suffix}
        if fixed:
            nodes = self._fixed(nodes, st["outputs"], memo)
        elif self.inline:
            nodes, seeds = self._inlined(nodes, seeds)
        if suffix is None:
            return nodes, []
        consts = {t.name for t in st["inits"]} | set(self.branch_inits) | {GATES}
        made = {o: k for k, n in enumerate(nodes) for o in n.output if o}
        reads = [self.reads(n, memo) for n in nodes]
        hit, free = set(), set()
        for k, n in enumerate(nodes):  # topological order
            if id(n) in seeds or any(made.get(r) in hit for r in reads[k]):
                hit.add(k)
            elif all(r in consts or made.get(r) in free for r in reads[k]):
                free.add(k)  # gate reads, weight chains, constants: cheap, kept where needed
        keep, stack = set(hit), list(hit)
        while stack:
            for r in reads[stack.pop()]:
                k = made.get(r)
                if k in free and k not in keep:
                    keep.add(k)
                    stack.append(k)
        out = [nodes[k] for k in sorted(keep)]
        produced = {o for n in out for o in n.output}
        frontier = sorted({r for k in keep for r in reads[k] if r in made and r not in produced})
        return out, frontier

    def gate_positions(self, s: int) -> dict:
        """Gate index -> position in stage `s` of the first node reading one of its Ifs (where its layer runs):
        candidates grouped in this order share long FP32 prefixes."""
        nodes = self.stages[s]["nodes"]
        first: dict = {}
        for k, n in enumerate(nodes):
            for r in self.reads(n):
                first.setdefault(r, k)
        out: dict = {}
        for n in nodes:
            i = self.gate_by_node.get(n.name)
            if i is not None:
                out[i] = min(out.get(i, len(nodes)), first.get(n.output[0], len(nodes)))
        return out

    def _pruned(self, nodes: list, only: set, outputs: list, memo: dict) -> list:
        """`nodes` with the Ifs of gates not in `only` replaced by what their else-branch passes through."""
        alias, keep = {}, []
        for n in nodes:
            src = self.passes.get(n.name)
            if src is not None and self.gate_by_node[n.name] not in only:
                alias[n.output[0]] = alias.get(src, src)
            else:
                keep.append(n)
        keep = [_renamed(n, alias, self.reads(n)) for n in keep]
        keep += [helper.make_node("Identity", [alias[o]], [o], name=f"{o}__pass") for o in outputs if o in alias]
        return self._without_dead_gate_reads(keep, outputs, memo)

    def _without_dead_gate_reads(self, keep: list, outputs: list, memo: dict) -> list:
        """`keep` (in topological order: every reader after what it reads) without the gate reads (Gather, Greater)
        nothing needs any more: one pass from the end, so a Gather whose only reader was a dropped Greater goes too."""
        used, out = set(outputs), []
        for n in reversed(keep):
            if n.op_type in ("Gather", "Greater") and not any(o in used for o in n.output):
                continue
            used |= self.reads(n, memo)
            out.append(n)
        out.reverse()
        return out

    def _fixed(self, nodes: list, outputs: list, memo: dict) -> list:
        """`nodes` (gates pruned to the ones on) with each gate's If replaced by its then-branch's nodes: the same
        kernels on the same inputs as the If runs, without its per-run cost (~0.3 ms an If on the CPU)."""
        out = []
        for n in nodes:
            g = {a.name: a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH} if n.op_type == "If" else {}
            then = g.get("then_branch")
            if n.name not in self.gate_by_node or then is None or len(then.output) != 1:
                out.append(n)
                continue
            out.extend(then.node)  # its weights are the branch's initializers: `proto` adds what is read
            out.append(helper.make_node("Identity", [then.output[0].name], [n.output[0]], name=f"{n.name}__on"))
        return self._without_dead_gate_reads(out, outputs, memo)

    def _inlined(self, nodes: list, seeds: set = frozenset()) -> tuple[list, set]:
        """`nodes` with each gate's If replaced by its then-branch's nodes and Where(gate, then, else-input); the
        ids of the nodes that stand for the Ifs in `seeds` (their Where and then-branch nodes)."""
        out, ids = [], set()
        for n in nodes:
            g = {a.name: a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH} if n.op_type == "If" else {}
            then, els = g.get("then_branch"), g.get("else_branch")
            if n.name not in self.gate_by_node or then is None or els is None or len(els.node) != 1 \
                    or els.node[0].op_type != "Identity":
                out.append(n)
                ids |= {id(n)} & seeds
                continue
            src = els.node[0].input[0]  # read here: `_pruned` may have renamed it
            made = list(then.node)  # its weights are the branch's initializers: `proto` adds what is read
            made.append(helper.make_node("Where", [n.input[0], then.output[0].name, src], [n.output[0]],
                                         name=f"{n.name}__where"))
            out.extend(made)
            if id(n) in seeds:
                ids |= {id(x) for x in made}
        return out, ids

    def inferred_types(self, feed: dict) -> dict:
        """Boundary tensor -> an empty array of its dtype and rank, from ONNX shape inference with `feed`'s shapes
        ({} where inference fails): an error session can be made before its stage first runs."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)  # external weights: the protos only
        del m.graph.value_info[:]
        for vi in m.graph.input:
            if vi.name in feed and vi.type.HasField("tensor_type"):
                dims = vi.type.tensor_type.shape.dim
                del dims[:]
                for d in np.shape(feed[vi.name]):
                    dims.add().dim_value = int(d)
        try:
            m = onnx.shape_inference.infer_shapes(m, data_prop=True)
        except Exception:  # noqa: BLE001 - a graph inference cannot type: its stages learn types from their runs
            return {}
        want = set(self.made_in)
        out = {}
        for vi in list(m.graph.value_info) + list(m.graph.output):
            tt = vi.type.tensor_type
            if vi.name in want and tt.elem_type and tt.HasField("shape"):
                out[vi.name] = np.empty((0,) * len(tt.shape.dim), helper.tensor_dtype_to_np_dtype(tt.elem_type))
        return out

    def float_outputs(self, s: int, types: dict) -> list:
        return [o for o in self.stages[s]["outputs"] if o in types and types[o].dtype == np.float32]


def _renamed(node, alias: dict, reads: set):
    """`node` (a copy, where needed) reading alias[x] instead of x, inside its subgraphs too (`reads`: its reads)."""
    if not alias or not (reads & alias.keys()):
        return node
    m = onnx.NodeProto()
    m.CopyFrom(node)
    stack = [m]
    while stack:
        n = stack.pop()
        for i, x in enumerate(n.input):
            if x in alias:
                n.input[i] = alias[x]
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                stack.extend(g.node)
    return m
