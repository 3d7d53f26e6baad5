"""Property-based: small random graphs (MatMul/Gemm/Conv/attention/LayerNorm/residual mixes, static and dynamic batch,
odd sizes, shared weights, graph outputs taken from the middle) x every mode. Each run either exits 0 with a graph
ONNX Runtime loads whose outputs are finite wherever FP32's are, or exits 2 with one `error:` line; the input file is
never modified. Derandomized (the same examples on every run); failures found are kept as @example cases."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt.cli import main

MODES = {
    "fp8": ("quantize", "--fp8"),
    "int8": ("quantize", "--int8"),
    "int8-entropy": ("quantize", "--int8", "--calib-method", "entropy"),
    "int4": ("quantize", "--int4", "--awq", "clip", "--block-size", "32"),
    "smoothquant": ("quantize", "--int8", "--smoothquant", "0.5"),
    "sparsity": ("quantize", "--fp8", "--sparsity", "2:4"),
    "auto": ("quantize", "--auto", "--bits", "8", "--formats", "fp8,int8,int4", "--block-size", "32"),
    "convert": ("convert", "--fp16"),
}
SIZES = [3, 16, 17, 24, 32, 33, 48]  # mostly past the placement rules' K, N >= 16; a few below
SEQ_OPS = ["matmul", "matmul", "gemm", "layernorm", "relu", "residual", "attention"]
CONV_OPS = ["conv", "conv", "relu", "residual", "pool_fc"]


@dataclass(frozen=True)
class Spec:
    """A random graph: its family (seq: [B, S, C] or [B, C]; conv: [B, C, H, W]), ops and sizes, as drawn."""
    family: str
    rank: int
    batch: int
    dynamic: bool
    channels: int
    ops: tuple
    widths: tuple
    share: tuple
    middle_output: bool
    seed: int
    input_scale: float = 1.0   # 0 (all-zero data), tiny, or values beyond FP16's range
    weight_scale: float = 1.0


@st.composite
def specs(draw):
    family = draw(st.sampled_from(["seq", "conv"]))
    n = draw(st.integers(1, 5))
    ops = tuple(draw(st.sampled_from(SEQ_OPS if family == "seq" else CONV_OPS)) for _ in range(n))
    return Spec(family=family, rank=draw(st.sampled_from([2, 3])) if family == "seq" else 4,
                batch=draw(st.sampled_from([1, 2])), dynamic=draw(st.booleans()),
                channels=draw(st.sampled_from(SIZES)), ops=ops,
                widths=tuple(draw(st.sampled_from(SIZES)) for _ in range(n)),
                share=tuple(draw(st.booleans()) for _ in range(n)), middle_output=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)), input_scale=draw(st.sampled_from([1.0, 1.0, 0.0, 1e-4, 300.0, 1e5])),
                weight_scale=draw(st.sampled_from([1.0, 1.0, 0.0, 30.0])))


def build(spec: Spec) -> onnx.ModelProto:
    """The graph `spec` describes (shapes follow the ops; ops that do not fit the current tensor are skipped)."""
    rng = np.random.default_rng(spec.seed)
    nodes, inits, shapes = [], {}, {}
    b = "B" if spec.dynamic else spec.batch
    if spec.family == "seq":
        shape = [b, 7, spec.channels] if spec.rank == 3 else [b, spec.channels]
    else:
        shape = [b, spec.channels, 6, 5]
    cur, c, k = "x", spec.channels, 0
    shapes[cur] = (spec.rank, c)
    produced = []

    def weight(shape_, share):
        key = ("w",) + tuple(shape_)
        if share and key in inits:  # a weight read by two layers
            return inits[key].name
        name = f"w{len(inits)}"
        inits[key if share else (name,)] = nh.from_array(
            ((rng.standard_normal(shape_) / np.sqrt(max(1, np.prod(shape_[1:]) if len(shape_) == 4 else shape_[0])))
            * (spec.weight_scale if len(shape_) > 1 else 1.0)).astype(np.float32), name)
        return name

    def fresh():
        nonlocal k
        k += 1
        return f"t{k}"

    rank = len(shape)
    for op, width, share in zip(spec.ops, spec.widths, spec.share):
        out = fresh()
        if op == "matmul" and rank in (2, 3):
            nodes.append(h.make_node("MatMul", [cur, weight([c, width], share)], [out], name=f"mm{k}"))
            c = width
        elif op == "gemm" and rank == 2:
            nodes.append(h.make_node("Gemm", [cur, weight([width, c], share), weight([width], False)], [out],
                                     name=f"gemm{k}", transB=1))
            c = width
        elif op == "layernorm" and rank in (2, 3):
            g, bb = weight([c], False), weight([c], False)
            nodes.append(h.make_node("LayerNormalization", [cur, g, bb], [out], name=f"ln{k}", axis=-1))
        elif op == "relu":
            nodes.append(h.make_node("Relu", [cur], [out], name=f"relu{k}"))
        elif op == "residual":
            same = [t for t, cc in produced if cc == c]
            if not same:
                continue
            nodes.append(h.make_node("Add", [cur, same[0]], [out], name=f"add{k}"))
        elif op == "attention" and rank == 3:
            q, kk, v, kt, s, s2, p = (fresh() for _ in range(7))
            nodes += [h.make_node("MatMul", [cur, weight([c, c], False)], [q], name=f"q{k}"),
                      h.make_node("MatMul", [cur, weight([c, c], False)], [kk], name=f"k{k}"),
                      h.make_node("MatMul", [cur, weight([c, c], False)], [v], name=f"v{k}"),
                      h.make_node("Transpose", [kk], [kt], name=f"kt{k}", perm=[0, 2, 1]),
                      h.make_node("MatMul", [q, kt], [s], name=f"qk{k}"),
                      h.make_node("Mul", [s, weight([1], False)], [s2], name=f"scale{k}"),
                      h.make_node("Softmax", [s2], [p], name=f"softmax{k}", axis=-1),
                      h.make_node("MatMul", [p, v], [out], name=f"pv{k}")]
        elif op == "conv" and rank == 4:
            ks = 3 if width % 2 else 1
            nodes.append(h.make_node("Conv", [cur, weight([width, c, ks, ks], share), weight([width], False)], [out],
                                     name=f"conv{k}", pads=[ks // 2] * 4))
            c = width
        elif op == "pool_fc" and rank == 4:
            gp, fl = fresh(), fresh()
            nodes += [h.make_node("GlobalAveragePool", [cur], [gp], name=f"gap{k}"),
                      h.make_node("Flatten", [gp], [fl], name=f"flat{k}"),
                      h.make_node("Gemm", [fl, weight([width, c], share)], [out], name=f"fc{k}", transB=1)]
            c, rank = width, 2
        else:
            continue
        produced.append((out, c))
        cur = out
    if not nodes:
        out = fresh()
        nodes.append(h.make_node("Relu", [cur], [out], name="relu_only"))
        produced.append((out, c))
        cur = out
    outputs = [h.make_tensor_value_info(cur, T.FLOAT, None)]
    if spec.middle_output and len(produced) > 1 and produced[0][0] != cur:
        outputs.append(h.make_tensor_value_info(produced[0][0], T.FLOAT, None))  # read by later nodes too
    g = h.make_graph(nodes, "random", [h.make_tensor_value_info("x", T.FLOAT, shape)], outputs, list(inits.values()))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def _feed_shape(spec: Spec, m: onnx.ModelProto) -> tuple:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else spec.batch for d in dims)


def _session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check(tmp_path, spec: Spec, mode: str) -> None:
    """The property, for one graph and one mode."""
    m = build(spec)
    src, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    for p in (src, out, calib):
        p.unlink(missing_ok=True)
    onnx.save(m, src)
    x = (np.random.default_rng(spec.seed + 1).standard_normal((4,) + _feed_shape(spec, m)) * spec.input_scale).astype(np.float32)
    np.savez(calib, x=x)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cmd, *flags = MODES[mode]
    r = CliRunner().invoke(main, ["-q", cmd, str(src), *flags, "--calib", str(calib), "-o", str(out)])
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest, "the input model was modified"
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback
        raise AssertionError("".join(traceback.format_exception(r.exception)))
    if r.exit_code == 2:
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.output
        assert not out.exists()
        return
    assert r.exit_code == 0, r.output
    ref = _session(src).run(None, {"x": x[0]})
    got = _session(out).run(None, {"x": x[0]})
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        b = np.asarray(b, np.float32)
        assert b.shape == a.shape
        assert np.isfinite(b[np.isfinite(a)]).all(), "non-finite output where FP32 is finite"


# Failures the search found, kept as regression cases (the spec, as drawn).
REGRESSIONS = [
    # --auto stacked the samples of a static batch dimension along axis 0 (ORT: "Got invalid dimensions for input: x").
    (Spec(family="seq", rank=2, batch=1, dynamic=False, channels=3, ops=("matmul",), widths=(3,), share=(False,),
          middle_output=False, seed=0), "auto"),
]

# CI: 25 derandomized examples per mode (~1 min on 2 cores); a longer hunt: ONNXOPT_PROPERTY_EXAMPLES=200
# ONNXOPT_PROPERTY_RANDOM=1 (new examples each run; hypothesis prints the failing spec to add to REGRESSIONS).
EXAMPLES_PER_MODE = int(os.environ.get("ONNXOPT_PROPERTY_EXAMPLES", "25"))
DERANDOMIZE = not os.environ.get("ONNXOPT_PROPERTY_RANDOM")


@pytest.mark.parametrize("mode", list(MODES))
@settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=DERANDOMIZE, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=specs())
@example(spec=REGRESSIONS[0][0])
def test_random_graph(tmp_path, mode, spec):
    check(tmp_path, spec, mode)


@pytest.mark.parametrize("spec,mode", REGRESSIONS)
def test_regression(tmp_path, spec, mode):
    check(tmp_path, spec, mode)
