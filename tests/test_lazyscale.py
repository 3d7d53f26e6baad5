"""SmoothQuant's fold with lazy products (onnxopt.lazyscale): big weights become W ⊙ f computed where they are
read, or inside the calibration session's graph, never written out by the fold. The weights, the graph and the
calibration statistics must be those of the eager fold, bit for bit."""
from __future__ import annotations

import os

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import calib, lazyscale, modelfile
from onnxopt.graph import read_values
from onnxopt.rewrite import smoothquant

import tiny


def _graph(tmp_path, eager: bool):
    m = modelfile.load(tiny.save(tiny.transformer(d=512, heads=8, seq=16), tmp_path / "t.onnx"))
    g = modelfile.import_graph(m)
    if eager:  # weights in memory: the fold computes every product at once (the old path)
        for c in g.tensors().values():
            if isinstance(c, gs.Constant):
                c.values = np.array(read_values(c))
    return g


def _data(tmp_path):
    ids = np.random.default_rng(3).integers(0, 50, (4, 2, 16)).astype(np.int64)
    np.savez(tmp_path / "c.npz", ids=ids)
    return calib.CalibData.from_path(tmp_path / "c.npz", [calib.InputSpec("ids", (None, 16), np.dtype(np.int64))])


def _reducers(g):
    names = sorted({n.inputs[0].name for n in g.nodes if n.op == "MatMul"} | {n.outputs[0].name for n in g.nodes if n.op == "MatMul"})
    return {n: [calib.AbsMax(), calib.TopAbs(99.0), calib.ChannelAbsMax(-1, 3)] for n in names}


def _eager_reference(tmp_path, data):
    """The eager fold (weights in memory) and its calibration statistics."""
    (tmp_path / "e").mkdir()
    with modelfile.spilling(tmp_path / "e"):
        eager = _graph(tmp_path / "e", eager=True)
        smoothquant.smooth(eager, data, alpha=0.8, progress=False)
        ref = _reducers(eager)
        calib.collect_graph(eager, data, ref, provider="cpu", progress=False)
    return eager, ref


def _lazy_fold(folder, data):
    """The lazy fold of the same model (inside `spilling`) and its lazily scaled constants."""
    lazy = _graph(folder, eager=False)
    smoothquant.smooth(lazy, data, alpha=0.8, progress=False)
    return lazy, {n: c for n, c in lazy.tensors().items() if isinstance(c, gs.Constant) and isinstance(c._values, lazyscale.Scaled)}


def _assert_as_eager(eager, ref, scaled, got):
    """The lazy fold's statistics `got` are the eager ones; its products, read or exported (a save: computed once),
    are the eager fold's bytes."""
    for name, rs in ref.items():
        for a, b in zip(rs, got[name]):
            np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    eager_consts = {n: c for n, c in eager.tensors().items() if isinstance(c, gs.Constant)}
    for name, c in scaled.items():
        want = np.asarray(read_values(eager_consts[name]))
        assert np.array_equal(read_values(c), want) and read_values(c).dtype == want.dtype
        exported = modelfile.to_array(c._values.tensor)
        assert np.array_equal(exported, want) and exported.dtype == want.dtype


def test_lazy_fold_gives_the_eager_weights_graph_and_statistics(tmp_path):
    data = _data(tmp_path)
    eager, ref = _eager_reference(tmp_path, data)
    (tmp_path / "l").mkdir()
    with modelfile.spilling(tmp_path / "l") as spill:
        lazy, scaled = _lazy_fold(tmp_path / "l", data)
        # q/k/v/o, up and down projections; v (o_proj's scale through attention, then the LN's) and up (down's
        # scale through Relu and the bias Add) carry two factors
        assert len(scaled) >= 6 and sum(len(c._values.chain()[1]) == 2 for c in scaled.values()) >= 2
        # the session multiplies in its graph: the same statistics, no product computed or written
        got = _reducers(lazy)
        with lazyscale.exported() as found:
            model = gs.export_onnx(lazy, do_type_check=False)
        model = lazyscale.expand(model, found)
        assert len(found) == len(scaled)
        # base weights and factors overridable: ORT's constant folding must not build float64 copies on the host
        assert {f"{n}__unscaled" for n in scaled} <= {i.name for i in model.graph.input}
        assert sum(n.op_type == "Mul" and n.name.endswith("__Mul") for n in model.graph.node) == sum(
            len(c._values.chain()[1]) for c in scaled.values())
        calib.collect(model, data, got, provider="cpu", progress=False)
        assert all(c._values._made is None for c in scaled.values()) and os.path.getsize(spill) == 0
    assert [n.name for n in lazy.nodes] == [n.name for n in eager.nodes]
    _assert_as_eager(eager, ref, scaled, got)


def test_small_or_in_memory_weights_are_scaled_at_once(tmp_path):
    c = gs.Constant("w", np.ones((4, 4), np.float32))
    assert not lazyscale.scale(c, np.full((4, 1), 2.0)) and isinstance(c._values, np.ndarray)
    assert lazyscale.lazy_copy("w2", c, np.full((4, 1), 2.0)) is None


def test_products_computed_on_threads_before_a_session_are_the_eager_bytes(tmp_path):
    """collect_graph outside the in-graph form: every product is computed at once on worker threads
    (lazyscale.compute_all) and spilled; the statistics and the exported weights are the eager fold's."""
    data = _data(tmp_path)
    eager, ref = _eager_reference(tmp_path, data)
    (tmp_path / "l").mkdir()
    with modelfile.spilling(tmp_path / "l") as spill:
        lazy, scaled = _lazy_fold(tmp_path / "l", data)
        assert lazyscale.compute_all(lazy, threads=2) == len(scaled) >= 6
        assert all(c._values._made is not None for c in scaled.values()) and os.path.getsize(spill) > 0
        got = _reducers(lazy)
        calib.collect_graph(lazy, data, got, provider="cpu", progress=False)
    _assert_as_eager(eager, ref, scaled, got)
