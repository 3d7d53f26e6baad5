"""Topological sort of a graphsurgeon graph, in graphsurgeon's own order, without its per-call overhead.

`gs.Graph.toposort` gives each node a level (its deepest producer's level + 1, found by a depth-first walk
in node order) and stable-sorts the nodes by level in the order the walk finished them. It also maps every
tensor of the graph and asks each node for its subgraphs, which made it ~0.25 s a call on the tiny SDXL
UNet's 3,000 nodes, called a dozen times a run (export, autocast, range measurement). `toposort` computes
the same order from the nodes' producer lists alone, subgraphs' outer reads (the gated graph's If branches)
included; graphs with functions go to graphsurgeon's own."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .errors import OnnxoptError


def toposort(graph: gs.Graph) -> gs.Graph:
    """Sort `graph.nodes` (and its subgraphs' nodes) in place, exactly as `graph.toposort()` would; returns it."""
    if graph.functions:
        return graph.toposort()
    _sort(graph)
    return graph


def _sort(graph: gs.Graph) -> None:
    for node in graph.nodes:  # subgraphs first: their (sorted) reads order the outer producers
        for sub in _subgraphs(node):
            _sort(sub)
    mine = {id(n) for n in graph.nodes}
    level: dict[int, int] = {}     # id(node) -> level, in the order the walk finished the nodes
    done: list[gs.Node] = []
    for root in graph.nodes:
        if id(root) in level:
            continue
        on_path = {id(root)}
        stack = [(root, iter(_producers(root, mine)), -1)]  # (node, producers left to visit, max level so far)
        while stack:
            node, left, deepest = stack[-1]
            for p in left:
                lp = level.get(id(p))
                if lp is None:
                    if id(p) in on_path:
                        raise OnnxoptError(f"the graph has a cycle through node '{p.name}'; "
                                           "check the model for tensors with duplicate names")
                    stack[-1] = (node, left, deepest)
                    on_path.add(id(p))
                    stack.append((p, iter(_producers(p, mine)), -1))
                    break
                deepest = max(deepest, lp)
            else:
                stack.pop()
                on_path.discard(id(node))
                level[id(node)] = deepest + 1
                done.append(node)
                if stack:
                    parent, pleft, pdeep = stack[-1]
                    stack[-1] = (parent, pleft, max(pdeep, deepest + 1))
    graph.nodes = sorted(done, key=lambda n: level[id(n)])


def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    return [a for a in node.attrs.values() if isinstance(a, gs.Graph)]


def _producers(node: gs.Node, mine: set[int]) -> list[gs.Node]:
    """The nodes of this graph (`mine`) producing what `node` reads, its subgraphs' outer reads included, each
    once, in the order graphsurgeon visits them."""
    seen: dict[int, gs.Node] = {}
    reads = [t for t in node.inputs if t.name]
    for sub in _subgraphs(node):
        reads.extend(_outer_reads(sub).values())
    for t in reads:
        for p in t.inputs:
            if id(p) in mine:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _outer_reads(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """Tensors `graph`'s nodes (and nested subgraphs) read but `graph` does not produce or take as input, in
    graphsurgeon's `_foreign_tensors` order; constants are left out (they have no producer to order by)."""
    local = {t.name for n in graph.nodes for t in n.outputs if t.name} | {t.name for t in graph.inputs}
    out: dict[str, gs.Tensor] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if t.name not in local and not isinstance(t, gs.Constant):
                out[t.name] = t
        for sub in _subgraphs(node):
            for name, t in _outer_reads(sub).items():
                if name not in local:
                    out[name] = t
    return out
