"""Einsum attention (a diffusion UNet's `bct,bcs->bts` / `bts,bcs->bct`) rewritten as MatMul: exact, seen by the
placement rules (attention BMMs quantized) and fused by TensorRT-RTX."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxopt import QuantConfig, einsum, modelfile, ort, quantize
from onnxopt.trt import rtx_available

C, T, HEADS = 64, 256, 2   # channels, tokens, heads: head size 32


def einsum_attention(opset: int = 18) -> onnx.ModelProto:
    """x [B, C, T] -> q, k, v by a 1x1 Conv, heads split as [B·H, hd, T] (QKVAttentionLegacy), Einsum attention,
    merged back and projected."""
    rng = np.random.default_rng(0)
    hd = C // HEADS
    x = gs.Variable("x", np.float32, ["B", C, T])
    y = gs.Variable("y", np.float32, ["B", C, T])
    nodes, vs = [], {}

    def var(name, shape=None):
        vs[name] = gs.Variable(name, np.float32, shape)
        return vs[name]
    w_qkv = gs.Constant("w_qkv", (rng.standard_normal((3 * C, C, 1)) / np.sqrt(C)).astype(np.float32))
    w_o = gs.Constant("w_o", (rng.standard_normal((C, C, 1)) / np.sqrt(C)).astype(np.float32))
    nodes.append(gs.Node("Conv", "qkv", inputs=[x, w_qkv], outputs=[var("qkv", ["B", 3 * C, T])]))
    nodes.append(gs.Node("Reshape", "heads", inputs=[vs["qkv"], gs.Constant("hs", np.array([-1, 3 * hd, T], np.int64))],
                         outputs=[var("qkv_h", ["BH", 3 * hd, T])]))
    nodes.append(gs.Node("Split", "split", attrs={"axis": 1, "num_outputs": 3}, inputs=[vs["qkv_h"]],
                         outputs=[var("q", ["BH", hd, T]), var("k", ["BH", hd, T]), var("v", ["BH", hd, T])]))
    nodes.append(gs.Node("Mul", "q_scale", inputs=[vs["q"], gs.Constant("sc", np.array(hd ** -0.5, np.float32))],
                         outputs=[var("qs", ["BH", hd, T])]))
    nodes.append(gs.Node("Einsum", "qk", attrs={"equation": "bct,bcs->bts"}, inputs=[vs["qs"], vs["k"]],
                         outputs=[var("s", ["BH", T, T])]))
    nodes.append(gs.Node("Softmax", "softmax", attrs={"axis": -1}, inputs=[vs["s"]], outputs=[var("p", ["BH", T, T])]))
    nodes.append(gs.Node("Einsum", "pv", attrs={"equation": "bts,bcs->bct"}, inputs=[vs["p"], vs["v"]],
                         outputs=[var("a", ["BH", hd, T])]))
    nodes.append(gs.Node("Reshape", "merge", inputs=[vs["a"], gs.Constant("ms", np.array([-1, C, T], np.int64))],
                         outputs=[var("am", ["B", C, T])]))
    nodes.append(gs.Node("Conv", "proj", inputs=[vs["am"], w_o], outputs=[var("o", ["B", C, T])]))
    nodes.append(gs.Node("Add", "residual", inputs=[x, vs["o"]], outputs=[y]))
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=opset)
    return modelfile.export_graph(g)


def _calib(tmp_path, n=4):
    p = tmp_path / "c.npz"
    np.savez(p, x=np.random.default_rng(1).standard_normal((n, C, T)).astype(np.float32))
    return p


@pytest.mark.parametrize("eq", ["bct,bcs->bts", "bts,bcs->bct", "bhqd,bhkd->bhqk", "bij,bjk->bki", "ij,jk->ik"])
def test_equation_as_matmul_exact(eq):
    """Each matrix-product equation rewritten computes numpy's einsum."""
    lhs, out = eq.split("->")
    a_s, b_s = lhs.split(",")
    dims = {c: d for c, d in zip("bhtscqdkij", (2, 3, 5, 6, 4, 7, 8, 9, 3, 4))}
    rng = np.random.default_rng(0)
    A = rng.standard_normal([dims[c] for c in a_s]).astype(np.float32)
    B = rng.standard_normal([dims[c] for c in b_s]).astype(np.float32)
    a, b = gs.Variable("a", np.float32, A.shape), gs.Variable("b", np.float32, B.shape)
    y = gs.Variable("y", np.float32)
    g = gs.Graph(nodes=[gs.Node("Einsum", "e", attrs={"equation": eq}, inputs=[a, b], outputs=[y])], inputs=[a, b],
                 outputs=[y], opset=18)
    assert einsum.rewrite(g) == 1 and not [n for n in g.nodes if n.op == "Einsum"]
    got = ort.session(modelfile.export_graph(g), level="disable").run(None, {"a": A, "b": B})[0]
    np.testing.assert_allclose(got, np.einsum(eq, A, B), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eq", ["bii->bi", "bij,bjk,bkl->bil", "b...ij,b...jk->b...ik", "bij,bij->bij", "bij,bkj->bikj"])
def test_other_equations_left_alone(eq):
    assert einsum.matmul_form(eq) is None


def test_einsum_attention_quantized(tmp_path):
    """--fp8 on Einsum attention: both attention BMMs quantized (before: attention_bmms 0), softmax first in P·V,
    outputs close to FP32."""
    m = einsum_attention()
    res = quantize(m, tmp_path / "q.onnx", config=QuantConfig(mode="fp8", progress=False), data=_calib(tmp_path))
    assert res.report["qdq"]["coverage"]["attention_bmms"] == 2 and res.report["qdq"]["einsum_rewritten"] == 2
    q = modelfile.import_graph(modelfile.load(tmp_path / "q.onnx"))
    def up(t, k):
        for _ in range(k):
            t = t.inputs[0].inputs[0] if t.inputs else None
            if t is None:
                return None
        return t.inputs[0].op if t.inputs else None
    mm = [n for n in q.nodes if n.op == "MatMul"]
    assert [up(n.inputs[0], 0) for n in mm].count("DequantizeLinear") == 2
    assert [up(n.inputs[0], 2) for n in mm].count("Softmax") == 1  # DQ <- Q <- Softmax
    x = np.random.default_rng(2).standard_normal((2, C, T)).astype(np.float32)
    ref = ort.session(m, level="disable").run(None, {"x": x})[0]
    from onnxopt.emulate import emulated_view
    got = ort.session(emulated_view(modelfile.load(tmp_path / "q.onnx")), level="disable").run(None, {"x": x})[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99


@pytest.mark.rtx
@pytest.mark.skipif(not rtx_available(), reason="tensorrt_rtx is not importable (install the rtx extra)")
@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_einsum_attention_fuses_in_rtx(tmp_path, mode):
    """TensorRT-RTX fuses the rewritten Einsum attention into one quantized attention kernel. It fuses only 4-D
    attention: without the unit head axis ([B·H, hd, T] as written) no attention kernel, in FP16 either."""
    from onnxopt.trt import report as R
    from onnxopt.trt.build import BuildConfig
    quantize(einsum_attention(), tmp_path / "q.onnx", config=QuantConfig(mode=mode, progress=False), data=_calib(tmp_path))
    rep = R.engine_report_of(tmp_path / "q.onnx", config=BuildConfig(profiles={"x": ((2, C, T),) * 3}))
    assert rep["attention"]["blocks"] == 1
    assert rep["attention"]["quantized_blocks"] == 1 and rep["attention"]["fused_by_precision"] == {mode: 1}, rep["attention"]
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 4
