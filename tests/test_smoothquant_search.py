"""SmoothQuant's alpha search (rewrite/smoothquant.search_alphas): its shared inputs, shared weights, in-place Q/DQ
and worker threads give the errors and choices of a plain per-layer numpy reference, bit for bit."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

import tiny
from onnxopt import calib, modelfile
from onnxopt.rewrite import fold, shift, smoothquant

RNG = np.random.default_rng(7)
C, N, M = 24, 20, 96   # channels, outputs, sampled rows


def _arr(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _layers_model():
    """h (C channels) read by Q, K, V MatMuls and a Gemm (transB); u read by a grouped Conv 3x3 and a ConvTranspose
    2x2 (columns grouped per output channel); the MatMul weight `wq` also read at a second depth (h2)."""
    nodes = [helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["h", "wv"], ["v"], name="v"),
             helper.make_node("Gemm", ["h", "wg"], ["gm"], name="gemm", transB=1),
             helper.make_node("MatMul", ["h2", "wq"], ["q2"], name="q2"),
             helper.make_node("Conv", ["u", "wc"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["u", "wt"], ["t"], name="convt", strides=[2, 2])]
    inits = [_arr("wq", [C, N]), _arr("wk", [C, N]), _arr("wv", [C, N]), _arr("wg", [N, C]),
             _arr("wc", [8, C // 2, 3, 3]), _arr("wt", [C, 6, 2, 2])]
    m = tiny.graph_model(nodes, [("h", [M, C]), ("h2", [M, C]), ("u", [1, C, 4, 4])], ["q", "k", "v", "gm", "q2", "c", "t"],
                         inits)
    graph = modelfile.import_graph(m)
    return {n.name: n for n in graph.nodes}


def _sample(width, outliers=(3, 11)):
    x = RNG.standard_normal((M, width)).astype(np.float32)
    x[:, list(outliers)] = x[:, list(outliers)] * 25 + 4   # outlier channels, off centre
    return x


def _reference_error(layers, act_max, s):
    """The simulated INT8 error as first written: one layer after another, each from its own copies and
    temporaries. `layers`: [(node, sample, shift or None)]."""
    q = smoothquant.TARGET.qmax
    a_scale = max(float(np.max(act_max / s)), 1e-12) / q
    err = 0.0
    for node, sample, c in layers:
        w = fold.effective_weight(node)
        w3 = fold.weight_matrix(node, w)
        g, r, o = w3.shape
        cg = fold.input_channels(node, w.shape) // g
        kk, cols = r // cg, 1
        if node.op == "ConvTranspose":
            cols, kk = int(np.prod(w.shape[2:])), 1
        chan = np.arange(g)[:, None] * cg + np.arange(r)[None, :] // kk
        x = sample.reshape(len(sample), g, r).transpose(1, 0, 2).copy()
        norm = float(np.sum(np.matmul(x, w3).astype(np.float64) ** 2)) or 1.0
        if c is not None:
            x = x - c.astype(np.float32).reshape(g, 1, r)
        y_ref = np.matmul(x, w3)
        srow = s[chan].astype(np.float32)
        xq = np.clip(np.rint(x / srow[:, None, :] / a_scale), -q, q) * a_scale
        ws = w3 * srow[:, :, None]
        amax = np.abs(ws).reshape(g, r, o // cols, cols).max(axis=(1, 3))
        w_scale = np.repeat(np.maximum(amax, 1e-12) / q, cols, axis=1)[:, None, :]
        wq = np.clip(np.rint(ws / w_scale), -q, q) * w_scale
        err += float(np.sum((np.matmul(xq, wq) - y_ref).astype(np.float64) ** 2)) / norm
    return err


def _reference_search(uses, act_max, w_max):
    """alpha on the 0.1 grid, refined by 0.05, against no smoothing: (alpha, s, errors) as search_alpha gives them."""
    def error(s):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return sum(_reference_error(ls, am, s) for ls, am in uses)
    tried = {a: error(smoothquant.scales(act_max, w_max, a)) for a in smoothquant.ALPHAS[::2]}
    best = min(tried, key=tried.get)
    for a in (round(best - 0.05, 2), round(best + 0.05, 2)):
        if 0.0 <= a <= 1.0 and a not in tried:
            tried[a] = error(smoothquant.scales(act_max, w_max, a))
    best = min(tried, key=tried.get)
    base = error(np.ones_like(act_max))
    if base <= tried[best]:
        return None, np.ones_like(act_max), {"unsmoothed": base, "smoothed": base}
    return float(best), smoothquant.scales(act_max, w_max, best), {"unsmoothed": base, "smoothed": tried[best]}


def _same(a, b):
    assert a[0] == b[0] and a[2] == b[2], (a[0], b[0], a[2], b[2])   # alpha and both errors, exactly
    assert np.array_equal(a[1], b[1])


def test_search_matches_reference_with_shared_inputs_weights_and_threads():
    nodes, sim_layer = _layers_model(), smoothquant.sim_layer
    h, h2, u = _sample(C), _sample(C, outliers=(5,)), _sample(C * 9)
    rows = _sample(C, outliers=(2, 7))
    am = {k: np.abs(v).max(axis=0).astype(np.float64) for k, v in (("h", h), ("h2", h2), ("rows", rows))}
    am["u"] = np.abs(u.reshape(M, 2, C // 2, 9)).max(axis=(0, 3)).reshape(C).astype(np.float64)
    gemm_like = ["q", "k", "v", "gemm"]
    w_max = lambda names: np.max([fold.input_channel_absmax(nodes[n]) for n in names], axis=0)

    # one activation read by four GEMMs (one input array quantized once per alpha), with and without a shift
    inputs = {}
    plain = [sim_layer(nodes[n], h, inputs=inputs) for n in gemm_like]
    assert all(L.x is plain[0].x for L in plain)
    c = shift.centre(h.min(axis=0), h.max(axis=0))
    act_c = shift.half_range(h.min(axis=0), h.max(axis=0), c)
    inputs = {}
    shifted = [sim_layer(nodes[n], h, c, like=L, inputs=inputs) for n, L in zip(gemm_like, plain)]
    # one weight read at two depths (ALBERT): one s, errors summed over both uses, the weight quantized once
    tied = [([sim_layer(nodes["q"], h)], am["h"]), ([sim_layer(nodes["q2"], h2)], am["h2"])]
    assert len(set(smoothquant.shared_weights(tied).values())) == 1
    conv = [sim_layer(nodes["conv"], u)]
    convt = [sim_layer(nodes["convt"], rows)]
    searches = [([(plain, am["h"])], am["h"], w_max(gemm_like)),
                ([(shifted, act_c)], act_c, w_max(gemm_like)),
                (tied, np.maximum(am["h"], am["h2"]), w_max(["q"])),
                ([(conv, am["u"])], am["u"], w_max(["conv"])),
                ([(convt, am["rows"])], am["rows"], w_max(["convt"]))]
    plain_uses = [([(nodes[n], h, None) for n in gemm_like], am["h"])]
    ref_uses = [plain_uses, [([(nodes[n], h, c) for n in gemm_like], act_c)],
                [([(nodes["q"], h, None)], am["h"]), ([(nodes["q2"], h2, None)], am["h2"])],
                [([(nodes["conv"], u, None)], am["u"])], [([(nodes["convt"], rows, None)], am["rows"])]]
    refs = [_reference_search(ru, srch[1], srch[2]) for ru, srch in zip(ref_uses, searches)]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for (uses, act_max, wm), ru in zip(searches, ref_uses):   # every alpha's error, not only the chosen ones
            shared = smoothquant.shared_weights(uses)
            for a in smoothquant.ALPHAS + (None,):
                s = np.ones_like(act_max) if a is None else smoothquant.scales(act_max, wm, a)
                cache = {}
                assert (sum(smoothquant.simulated_error(ls, am, s, shared=shared, cache=cache) for ls, am in uses)
                        == sum(_reference_error(rl, am, s) for rl, am in ru)), a
    assert any(r[0] is not None for r in refs) and len({r[0] for r in refs}) > 1   # real choices, not all equal
    for threads in (1, 2, 3):
        found = smoothquant.search_alphas(searches, threads)
        for got, ref in zip(found, refs):
            _same(got, ref)
    for srch, ref in zip(searches, refs):   # one search at a time, automatic threads
        _same(smoothquant.search_alpha(srch[0][0][0], srch[1], srch[2], srch[0]), ref)
    # the per-s error alone, as autoquant calls it
    s = smoothquant.scales(am["h"], w_max(gemm_like), 0.6)
    assert smoothquant.simulated_error(plain, am["h"], s) == _reference_error(plain_uses[0][0], am["h"], s)


def _block():
    """LayerNorm with outlier channels and an offset -> Q, K, V and a GELU MLP (MatMuls), as in a transformer."""
    d, f, t = 32, 64, 16
    gamma = np.ones(d, np.float32)
    gamma[[3, 17]] = 30.0
    beta = np.zeros(d, np.float32)
    beta[[5, 9]] = [6.0, -4.0]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["h", "wv"], ["v"], name="v"),
             helper.make_node("MatMul", ["v", "w1"], ["m"], name="fc1"),
             helper.make_node("Gelu", ["m"], ["a"], name="gelu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "b"), _arr("wq", [d, d]),
             _arr("wk", [d, d]), _arr("wv", [d, d]), _arr("w1", [d, f]), _arr("w2", [f, d])]
    return tiny.graph_model(nodes, [("x", [1, t, d])], ["q", "k", "y"], inits, opset=20)


def test_smooth_same_graph_and_report_whatever_the_threads():
    m = _block()
    data = calib.CalibData.random(calib.input_specs(m), 8, seed=2)
    out = []
    for threads in (1, 2):
        graph = modelfile.import_graph(m)
        report = smoothquant.smooth(graph, data, None, alpha="auto", progress=False, memory_budget_mb=256, threads=threads)
        out.append((modelfile.export_graph(graph).SerializeToString(),
                    [(g["activation"], g["alpha"], g.get("error"), g.get("error_shifted"), g.get("shift"))
                     for g in report["groups"]]))
    assert out[0][1] == out[1][1] and out[0][0] == out[1][0]
    assert any(g[1] is not None for g in out[0][1]) and any(g[3] is not None for g in out[0][1])
