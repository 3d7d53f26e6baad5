"""A small diffusion-UNet-like model whose activations leave FP16's range (issue 22 item 0), built in code.

Part A: two quantizable convs with exploded weights make a residual sum of ~1e8 that only a GroupNorm
(Reshape -> InstanceNormalization -> Reshape, as torch exports it) reads: pre-scaling can bring it back.
Part B: SiLU of ~1e8 feeds a quantized conv (an FP8 scale beyond 448 x 65504): a value that truly leaves FP16,
an FP32 island. Part C: a MatMul with exploded weights (+ bias) read only by a LayerNorm, then a normal MatMul.
A third GroupNorm on unit-scale values shares the InstanceNorm scale/bias initializers with the others, as the
real UNet's exporter does (the shared constant that autocast used to leave dangling).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

C = 32


def model(batch="N", opset: int = 18) -> onnx.ModelProto:
    rng = np.random.default_rng(7)

    def w(name, shape, gain=1.0):
        fan = int(np.prod(shape[1:]))
        return nh.from_array((rng.standard_normal(shape) * gain / np.sqrt(fan)).astype(np.float32), name)

    inits = [w("w1", (C, 4, 3, 3), 2.0), w("w2", (C, C, 3, 3), 3e7), w("wsk", (C, C, 1, 1), 3e7),
             w("w3", (C, C, 3, 3)), w("w4", (C, C, 1, 1), 1e8), w("w5", (C, C, 3, 3), 0.3), w("w6", (C, C, 1, 1)),
             w("w7", (C, C, 1, 1)), nh.from_array((rng.standard_normal(C) * 1e5).astype(np.float32), "b2"),
             nh.from_array(np.ones(8, np.float32), "gn_scale"), nh.from_array(np.zeros(8, np.float32), "gn_bias"),
             nh.from_array(np.array([0, 8, -1], np.int64), "grouped"),
             nh.from_array(np.array([0, C, 8, 8], np.int64), "image"),
             nh.from_array(np.array([0, C, 64], np.int64), "tokens_shape"),
             nh.from_array((1 + 0.1 * rng.standard_normal((C, 1, 1))).astype(np.float32), "gamma"),
             nh.from_array((0.1 * rng.standard_normal((C, 1, 1))).astype(np.float32), "beta"),
             nh.from_array((rng.standard_normal((C, 64)) * 1e6 / 4).astype(np.float32), "wm1"),
             nh.from_array((rng.standard_normal(64) * 1e5).astype(np.float32), "bm1"),
             nh.from_array(np.ones(64, np.float32), "ln_scale"), nh.from_array(np.zeros(64, np.float32), "ln_bias"),
             w("wm2", (C, 64)), ]
    inits[-1] = nh.from_array(nh.to_array(inits[-1]).T.copy(), "wm2")  # [64, C]
    nodes = []

    def gn(x, out, tag):
        nodes.extend([
            h.make_node("Reshape", [x, "grouped"], [f"{tag}_g"], name=f"{tag}_reshape"),
            h.make_node("InstanceNormalization", [f"{tag}_g", "gn_scale", "gn_bias"], [f"{tag}_n"], name=f"{tag}_in",
                        epsilon=1e-5),
            h.make_node("Reshape", [f"{tag}_n", "image"], [f"{tag}_r"], name=f"{tag}_back"),
            h.make_node("Mul", [f"{tag}_r", "gamma"], [f"{tag}_m"], name=f"{tag}_gamma"),
            h.make_node("Add", [f"{tag}_m", "beta"], [out], name=f"{tag}_beta")])

    def silu(x, out):
        nodes.extend([h.make_node("Sigmoid", [x], [f"{out}_sig"], name=f"{out}_sigmoid"),
                      h.make_node("Mul", [x, f"{out}_sig"], [out], name=f"{out}_mul")])

    nodes.append(h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]))
    silu("c1", "a")
    # Part A: residual sum ~1e8, read only by a GroupNorm.
    nodes += [h.make_node("Conv", ["a", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
              h.make_node("Conv", ["a", "wsk"], ["sk"], name="skip"),
              h.make_node("Add", ["c2", "sk"], ["hsum"], name="residual")]
    gn("hsum", "ga", "gnA")
    silu("ga", "sa")
    nodes.append(h.make_node("Conv", ["sa", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]))
    # Part B: SiLU of ~1e8 into a quantized conv.
    nodes.append(h.make_node("Conv", ["a", "w4"], ["e"], name="conv4"))
    silu("e", "se")
    nodes.append(h.make_node("Conv", ["se", "w5"], ["c5"], name="conv5", pads=[1, 1, 1, 1]))
    gn("c5", "gb", "gnB")
    silu("gb", "sb")
    nodes.append(h.make_node("Conv", ["sb", "w6"], ["c6"], name="conv6"))
    # Unit-scale GroupNorm sharing the InstanceNorm constants.
    gn("c1", "gc", "gnC")
    nodes += [h.make_node("Conv", ["gc", "w7"], ["c7"], name="conv7"),
              h.make_node("Add", ["c3", "c6"], ["y36"], name="sum36"),
              h.make_node("Add", ["y36", "c7"], ["y"], name="sum_out")]
    # Part C: tokens -> MatMul ~1e6 (+ bias) -> LayerNorm -> MatMul.
    nodes += [h.make_node("Reshape", ["y", "tokens_shape"], ["tk"], name="to_tokens"),
              h.make_node("Transpose", ["tk"], ["t"], name="tokens_t", perm=[0, 2, 1]),
              h.make_node("MatMul", ["t", "wm1"], ["m1"], name="proj_in"),
              h.make_node("Add", ["m1", "bm1"], ["m1b"], name="proj_in_bias"),
              h.make_node("LayerNormalization", ["m1b", "ln_scale", "ln_bias"], ["ln"], name="ln", axis=-1, epsilon=1e-5),
              h.make_node("MatMul", ["ln", "wm2"], ["out2"], name="proj_out")]
    g = h.make_graph(nodes, "huge", [h.make_tensor_value_info("x", T.FLOAT, [batch, 4, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [batch, C, 8, 8]),
                      h.make_tensor_value_info("out2", T.FLOAT, [batch, 64, C])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m


def calib(n: int = 8, seed: int = 0) -> dict:
    """Calibration (or held-out, with another seed) inputs for `model`."""
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)}
