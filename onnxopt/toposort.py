"""Topological sort of a graphsurgeon graph, in graphsurgeon's own order, without its per-call overhead.

`gs.Graph.toposort` gives each node a level (its deepest producer's level + 1, found by a depth-first walk
in node order) and stable-sorts the nodes by level in the order the walk finished them. It also maps every
tensor of the graph and asks each node for its subgraphs, which made it ~0.25 s a call on the tiny SDXL
UNet's 3,000 nodes, called a dozen times a run (export, autocast, range measurement). `toposort` computes
the same order from the nodes' producer lists alone; graphs with subgraphs or functions, whose outer reads
are implicit, go to graphsurgeon's own."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .errors import OnnxoptError


def toposort(graph: gs.Graph) -> gs.Graph:
    """Sort `graph.nodes` in place, exactly as `graph.toposort()` would; returns the graph."""
    if graph.functions or any(a.__class__ is gs.Graph or (isinstance(a, list) and a and isinstance(a[0], gs.Graph))
                              for n in graph.nodes for a in n.attrs.values()):
        return graph.toposort()
    level: dict[int, int] = {}     # id(node) -> level, in the order the walk finished the nodes
    done: list[gs.Node] = []
    for root in graph.nodes:
        if id(root) in level:
            continue
        on_path = {id(root)}
        stack = [(root, iter(_producers(root)), -1)]  # (node, producers left to visit, max level so far)
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
                    stack.append((p, iter(_producers(p)), -1))
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
                continue
            continue
    graph.nodes = sorted(done, key=lambda n: level[id(n)])
    return graph


def _producers(node: gs.Node) -> list[gs.Node]:
    """The nodes producing `node`'s inputs, each once, in the order graphsurgeon visits them."""
    seen: dict[int, gs.Node] = {}
    for t in node.inputs:
        for p in t.inputs:
            seen.setdefault(id(p), p)
    return list(seen.values())
