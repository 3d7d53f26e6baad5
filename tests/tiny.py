"""Tiny in-code models for tests (built with onnx.helper, seeded)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _init(rng, name, shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
    return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def cnn(opset: int = 17, batch="N") -> onnx.ModelProto:
    """Conv -> Relu -> Conv (+ residual Add) -> Concat -> Conv -> GlobalAveragePool -> Flatten -> Gemm(transB) -> Softmax."""
    rng = np.random.default_rng(0)
    inits = [_init(rng, "w1", (16, 3, 3, 3)), _init(rng, "b1", (16,), 0.1), _init(rng, "w2", (16, 16, 3, 3)),
             _init(rng, "b2", (16,), 0.1), _init(rng, "w3", (32, 32, 1, 1)), _init(rng, "wd", (32, 16, 2, 2)),
             _init(rng, "fc", (10, 16)), _init(rng, "fcb", (10,), 0.1)]
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("Add", ["r1", "c2"], ["a"], name="residual"),
        h.make_node("Concat", ["a", "r1"], ["cat"], name="concat", axis=1),
        h.make_node("Conv", ["cat", "w3"], ["c3"], name="conv3"),
        h.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        h.make_node("ConvTranspose", ["r3", "wd"], ["d"], name="deconv", strides=[1, 1]),
        h.make_node("GlobalAveragePool", ["d"], ["gap"], name="gap"),
        h.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        h.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], name="fc", transB=1),
        h.make_node("Softmax", ["logits"], ["y"], name="softmax"),
    ]
    g = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("x", T.FLOAT, [batch, 3, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [batch, 10])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def transformer(opset: int = 17, d: int = 64, heads: int = 2, seq: int = 16) -> onnx.ModelProto:
    """One pre-LN attention block + MLP with int64 token ids, an embedding Gather and a shape subgraph."""
    rng = np.random.default_rng(1)
    hd = d // heads
    inits = [_init(rng, "emb", (50, d), 1.0), _init(rng, "ln_g", (d,), 0.1), _init(rng, "ln_b", (d,), 0.1)]
    inits[1] = nh.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), "ln_g")
    for n in ("wq", "wk", "wv", "wo"):
        inits.append(_init(rng, n, (d, d)))
    inits += [_init(rng, "w_up", (d, 4 * d)), _init(rng, "b_up", (4 * d,), 0.1), _init(rng, "w_dn", (4 * d, d))]
    inits += [nh.from_array(np.array([0, 0, heads, hd], np.int64), "split_shape"),
              nh.from_array(np.array([0, 0, d], np.int64), "merge_shape"),
              nh.from_array(np.array(1.0 / np.sqrt(hd), np.float32), "qk_scale")]
    nodes = [
        h.make_node("Gather", ["emb", "ids"], ["x0"], name="embed"),
        h.make_node("LayerNormalization", ["x0", "ln_g", "ln_b"], ["ln"], name="ln1", axis=-1),
        h.make_node("MatMul", ["ln", "wq"], ["q0"], name="q_proj"),
        h.make_node("MatMul", ["ln", "wk"], ["k0"], name="k_proj"),
        h.make_node("MatMul", ["ln", "wv"], ["v0"], name="v_proj"),
    ]
    for n in ("q", "k", "v"):
        nodes += [h.make_node("Reshape", [f"{n}0", "split_shape"], [f"{n}1"], name=f"{n}_split"),
                  h.make_node("Transpose", [f"{n}1"], [f"{n}2"], name=f"{n}_heads",
                              perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3])]
    nodes += [
        h.make_node("MatMul", ["q2", "k2"], ["s0"], name="attn_qk"),
        h.make_node("Mul", ["s0", "qk_scale"], ["s1"], name="attn_scale"),
        h.make_node("Softmax", ["s1"], ["p"], name="attn_softmax", axis=-1),
        h.make_node("MatMul", ["p", "v2"], ["o0"], name="attn_pv"),
        h.make_node("Transpose", ["o0"], ["o1"], name="o_merge_t", perm=[0, 2, 1, 3]),
        h.make_node("Reshape", ["o1", "merge_shape"], ["o2"], name="o_merge"),
        h.make_node("MatMul", ["o2", "wo"], ["o3"], name="o_proj"),
        h.make_node("Add", ["x0", "o3"], ["x1"], name="res1"),
        h.make_node("MatMul", ["x1", "w_up"], ["u0"], name="mlp_up"),
        h.make_node("Add", ["u0", "b_up"], ["u1"], name="mlp_up_bias"),
        h.make_node("Gelu", ["u1"], ["u2"], name="gelu") if opset >= 20 else h.make_node("Relu", ["u1"], ["u2"], name="act"),
        h.make_node("MatMul", ["u2", "w_dn"], ["u3"], name="mlp_down"),
        h.make_node("Add", ["x1", "u3"], ["y"], name="res2"),
    ]
    g = h.make_graph(nodes, "transformer", [h.make_tensor_value_info("ids", T.INT64, ["N", seq])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", seq, d])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def transformer_and_ids(d) -> tuple:
    """The d=128 tiny transformer saved under folder `d` with 16 seeded token rows as its calibration file:
    (model path, npz path, ids)."""
    path = save(transformer(opset=17, d=128, heads=2, seq=16), d / "t.onnx")
    ids = np.random.default_rng(3).integers(0, 50, (16, 16)).astype(np.int64)
    np.savez(d / "c.npz", ids=ids)
    return path, d / "c.npz", ids


def residual_block(path, c: int, kernels=(1, 1, 1), size: int = 4) -> list:
    """conv0 -> relu -> conv1 -> Add(conv1, conv0) -> relu -> conv2 (kernel sizes `kernels`, 'same' padding), saved
    at `path`; returns 8 seeded feeds."""
    rng = np.random.default_rng(0)
    w = [rng.normal(0, c ** -0.5, (c, c, k, k)).astype(np.float32) for k in kernels]
    b = [rng.normal(0, 0.3, (c,)).astype(np.float32) for _ in range(3)]
    pads = [{"pads": [k // 2] * 4} if k > 1 else {} for k in kernels]
    nodes = [h.make_node("Conv", ["x", "w0", "b0"], ["h0"], name="conv0", **pads[0]),
             h.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             h.make_node("Conv", ["r0", "w1", "b1"], ["h1"], name="conv1", **pads[1]),
             h.make_node("Add", ["h1", "h0"], ["s"], name="residual"),
             h.make_node("Relu", ["s"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", **pads[2])]
    inits = [nh.from_array(a, f"w{i}") for i, a in enumerate(w)] + \
        [nh.from_array(a, f"b{i}") for i, a in enumerate(b)]
    g = h.make_graph(nodes, "res", [h.make_tensor_value_info("x", T.FLOAT, ["B", c, size, size])],
                          [h.make_tensor_value_info("y", T.FLOAT, ["B", c, size, size])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)
    return [{"x": (rng.normal(size=(1, c, size, size)) + 0.5).astype(np.float32)} for _ in range(8)]


def model_and_calib(d, model: onnx.ModelProto, shape: tuple, seed: int = 1) -> tuple:
    """`model` saved under folder `d` with a seeded normal calibration set `x` of `shape`: (model path, npz path)."""
    path, calib = d / f"{model.graph.name}.onnx", d / "calib.npz"
    onnx.save(model, path)
    np.savez(calib, x=np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    return path, calib


def cross_attention(blocks: int = 2, d: int = 64, e: int = 64, heads: int = 2, seq: int = 16, ctx: int = 77,
                    opset: int = 17) -> onnx.ModelProto:
    """`blocks` pre-LN cross-attention blocks whose keys and values all project the one input `enc` (as SDXL's
    transformer blocks read encoder_hidden_states); heads split with the batch taken from the query's Shape, as
    the diffusers export spells it."""
    rng = np.random.default_rng(2)
    hd = d // heads
    inits = [nh.from_array(np.array([0], np.int64), "i0"), nh.from_array(np.array([-1, heads, hd], np.int64), "split_rest"),
             nh.from_array(np.array([-1, d], np.int64), "merge_rest"), nh.from_array(np.array(1.0 / np.sqrt(hd), np.float32), "qk_scale")]
    nodes, x = [], "x"
    for b in range(blocks):
        inits += [nh.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), f"ln{b}_g"), _init(rng, f"ln{b}_b", (d,), 0.1)]
        inits += [_init(rng, f"w{n}{b}", (e if n in "kv" else d, d)) for n in "qkvo"]
        nodes += [h.make_node("LayerNormalization", [x, f"ln{b}_g", f"ln{b}_b"], [f"ln{b}"], name=f"ln{b}", axis=-1),
                  h.make_node("Shape", [f"ln{b}"], [f"shape{b}"], name=f"shape{b}"),
                  h.make_node("Gather", [f"shape{b}", "i0"], [f"batch{b}"], name=f"batch{b}", axis=0),
                  h.make_node("Concat", [f"batch{b}", "split_rest"], [f"split{b}"], name=f"split{b}", axis=0),
                  h.make_node("Concat", [f"batch{b}", "merge_rest"], [f"merge{b}"], name=f"merge{b}", axis=0),
                  h.make_node("MatMul", [f"ln{b}", f"wq{b}"], [f"q{b}_0"], name=f"b{b}_q_proj"),
                  h.make_node("MatMul", ["enc", f"wk{b}"], [f"k{b}_0"], name=f"b{b}_k_proj"),
                  h.make_node("MatMul", ["enc", f"wv{b}"], [f"v{b}_0"], name=f"b{b}_v_proj")]
        for n in "qkv":
            nodes += [h.make_node("Reshape", [f"{n}{b}_0", f"split{b}"], [f"{n}{b}_1"], name=f"b{b}_{n}_split"),
                      h.make_node("Transpose", [f"{n}{b}_1"], [f"{n}{b}_2"], name=f"b{b}_{n}_heads",
                                  perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3])]
        nodes += [h.make_node("MatMul", [f"q{b}_2", f"k{b}_2"], [f"s{b}_0"], name=f"b{b}_attn_qk"),
                  h.make_node("Mul", [f"s{b}_0", "qk_scale"], [f"s{b}_1"], name=f"b{b}_attn_scale"),
                  h.make_node("Softmax", [f"s{b}_1"], [f"p{b}"], name=f"b{b}_attn_softmax", axis=-1),
                  h.make_node("MatMul", [f"p{b}", f"v{b}_2"], [f"o{b}_0"], name=f"b{b}_attn_pv"),
                  h.make_node("Transpose", [f"o{b}_0"], [f"o{b}_1"], name=f"b{b}_o_merge_t", perm=[0, 2, 1, 3]),
                  h.make_node("Reshape", [f"o{b}_1", f"merge{b}"], [f"o{b}_2"], name=f"b{b}_o_merge"),
                  h.make_node("MatMul", [f"o{b}_2", f"wo{b}"], [f"o{b}_3"], name=f"b{b}_o_proj"),
                  h.make_node("Add", [x, f"o{b}_3"], [f"x{b + 1}"], name=f"b{b}_res")]
        x = f"x{b + 1}"
    nodes[-1].output[0] = "y"
    g = h.make_graph(nodes, "cross_attention", [h.make_tensor_value_info("x", T.FLOAT, ["N", seq, d]),
                                                h.make_tensor_value_info("enc", T.FLOAT, ["N", ctx, e])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", seq, d])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def graph_model(nodes, inputs, outputs, inits, opset: int = 21) -> onnx.ModelProto:
    """A shape-inferred model from nodes, [(input, shape)], output names (float, untyped shape) and initializers."""
    g = h.make_graph(nodes, "t", [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in inputs],
                     [h.make_tensor_value_info(n, T.FLOAT, None) for n in outputs], inits)
    return onnx.shape_inference.infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", opset)]))


def run(model: onnx.ModelProto, feed: dict) -> list:
    """Outputs of `model` in onnxopt's exact-simulation session (ORT_DISABLE_ALL)."""
    from onnxopt import ort
    return ort.session(model, level="disable").run(None, feed)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))
