"""onnxopt.toposort gives graphsurgeon's toposort order exactly (the written graphs' bytes depend on it)."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings, strategies as st

from onnxopt.errors import OnnxoptError
from onnxopt.toposort import toposort

import tiny


def _graph(edges: list[list[int]], outs: list[int], order: list[int], branches: dict | None = None) -> gs.Graph:
    """Node i reads the outputs of nodes edges[i] (all earlier than i: a DAG) and a graph input; node i has
    outs[i] outputs; the node list is given in `order`. A node i in `branches` is an If whose then-branch reads
    the outer outputs of the nodes branches[i] (earlier than i) through a nested If of its own."""
    x = gs.Variable("x", np.float32, [1])
    w = gs.Constant("w", np.ones(1, np.float32))
    produced, nodes = [], []
    for i, reads in enumerate(edges):
        inputs = [x, w] + [produced[j][k % len(produced[j])] for k, j in enumerate(reads)]
        outputs = [gs.Variable(f"t{i}_{k}", np.float32, [1]) for k in range(outs[i])]
        produced.append(outputs)
        if branches and i in branches:
            outer = [produced[j][0] for j in branches[i]] or [x]
            inner_out = gs.Variable(f"i{i}", np.float32, [1])
            inner = gs.Graph(nodes=[gs.Node("Sum", f"in{i}", inputs=outer + [w], outputs=[inner_out])],
                             outputs=[inner_out])
            then_out = gs.Variable(f"b{i}", np.float32, [1])
            then = gs.Graph(nodes=[gs.Node("If", f"nested{i}", inputs=[x], outputs=[then_out],
                                           attrs={"then_branch": inner, "else_branch": inner})], outputs=[then_out])
            nodes.append(gs.Node("If", f"n{i}", inputs=inputs[:1], outputs=outputs[:1],
                                 attrs={"then_branch": then, "else_branch": then}))
            produced[-1] = outputs[:1]
        else:
            nodes.append(gs.Node("Sum", f"n{i}", inputs=inputs, outputs=outputs))
    return gs.Graph(nodes=[nodes[i] for i in order], inputs=[x], outputs=produced[-1][:1])


@st.composite
def dags(draw):
    n = draw(st.integers(1, 30))
    edges = [draw(st.lists(st.integers(0, i - 1), max_size=4)) if i else [] for i in range(n)]
    outs = [draw(st.integers(1, 3)) for _ in range(n)]
    order = draw(st.permutations(range(n)))
    ifs = draw(st.sets(st.integers(1, n - 1), max_size=3)) if n > 1 else set()
    branches = {i: draw(st.lists(st.integers(0, i - 1), max_size=3)) for i in sorted(ifs)}
    return edges, outs, order, branches


@settings(max_examples=300, deadline=None)
@given(dags())
def test_same_order_as_graphsurgeon_on_random_dags(dag):
    ours, theirs = _graph(*dag), _graph(*dag)
    toposort(ours)
    theirs.toposort()
    assert [n.name for n in ours.nodes] == [n.name for n in theirs.nodes]
    for a, b in zip(ours.subgraphs(recursive=True), theirs.subgraphs(recursive=True), strict=True):
        assert [n.name for n in a.nodes] == [n.name for n in b.nodes]


@pytest.mark.parametrize("model", [tiny.transformer(), tiny.cross_attention(), tiny.cnn()], ids=["transformer", "cross_attention", "cnn"])
def test_same_order_as_graphsurgeon_on_shuffled_models(model):
    ours, theirs = gs.import_onnx(model), gs.import_onnx(model)
    perm = np.random.default_rng(0).permutation(len(ours.nodes))
    ours.nodes = [ours.nodes[i] for i in perm]
    theirs.nodes = [theirs.nodes[i] for i in perm]
    toposort(ours)
    theirs.toposort()
    assert [n.name for n in ours.nodes] == [n.name for n in theirs.nodes]


def test_a_cycle_is_an_error_naming_a_node():
    a, b = gs.Variable("a", np.float32, [1]), gs.Variable("b", np.float32, [1])
    g = gs.Graph(nodes=[gs.Node("Relu", "p", inputs=[b], outputs=[a]), gs.Node("Relu", "q", inputs=[a], outputs=[b])])
    with pytest.raises(OnnxoptError, match="cycle through node"):
        toposort(g)
