"""Which ONNX forms of NVFP4 / MXFP8 become FP4 / MXFP8 kernels in a TensorRT-RTX build for SM 12.0.

    python tools/probe_fp4_rtx.py [--only NAME,...] [--json out.json] [--keep DIR]

Builds one small GEMM graph per candidate form (MatMul [M,K]x[K,N], batched 3-D / 4-D activations, Gemm with
transB, weight-only, attention BMM, Conv) with TensorRT-RTX on the CPU for compute capability 12.0, and reports
from the builder's per-kernel dump the datatypes the GEMM kernel reads. A form counts only when the kernel that
computes the layer reads FP4 (NVFP4) or FP8 with E8M0 scales (MXFP8); parsing is not enough.

Forms (from TensorRT's operator docs and ModelOpt's torch->ONNX export):
  NVFP4 activations: trt::TRT_FP4DynamicQuantize(x, s_act; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN)
                     -> (x_f4, sx_f8); DequantizeLinear(sx_f8, s_act) -> DequantizeLinear(x_f4, ., axis, block_size=16)
  NVFP4 weights:     FLOAT4E2M1 initializer + FLOAT8E4M3FN block scales + FP32 per-tensor scale, the same two DQs
  MXFP8:             trt::TRT_MXFP8DynamicQuantize(x; axis, block_size=32, output_dtype=FLOAT8E4M3FN) -> (x_f8, s_u8);
                     trt::TRT_MXFP8DequantizeLinear(x_f8, s_u8; axis, block_size=32, output_dtype=FLOAT16);
                     weights FP8 + uint8 E8M0 scales through TRT_MXFP8DequantizeLinear (or an opset-24
                     DequantizeLinear with FLOAT8E8M0 scales)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

F16, F32, FP8, FP4, E8M0 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E8M0
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- numpy quantizers (reference only)
def nvfp4_weight(w: np.ndarray, axis: int, block: int = 16):
    """FP4 codes, FP8 block scales (shape of w with axis // block) and the FP32 per-tensor scale."""
    amax = float(np.abs(w).max())
    s_t = np.float32(amax / 6.0 / 448.0 if amax > 0 else 1.0)
    wb = np.moveaxis(w, axis, -1)
    wb = wb.reshape(*wb.shape[:-1], -1, block)
    bs = np.abs(wb).max(-1) / 6.0 / s_t
    bs8 = np.clip(bs, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    eff = bs8.astype(np.float32) * s_t
    q = (wb / np.where(eff > 0, eff, 1.0)[..., None]).astype(ml_dtypes.float4_e2m1fn)
    q = np.moveaxis(q.reshape(*q.shape[:-2], -1), -1, axis)
    return q, np.moveaxis(bs8, -1, axis), s_t


def mxfp8_weight(w: np.ndarray, axis: int, block: int = 32):
    wb = np.moveaxis(w, axis, -1)
    wb = wb.reshape(*wb.shape[:-1], -1, block)
    amax = np.abs(wb).max(-1) / 448.0
    m, e = np.frexp(np.maximum(amax, 2.0 ** -127))
    e = np.where(m == 0.5, e - 1, e)  # ceil(log2(amax / 448)) exactly
    code = np.clip(e + 127, 0, 254).astype(np.uint8)
    scale = np.exp2(code.astype(np.float32) - 127)
    q = np.clip(wb / scale[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    q = np.moveaxis(q.reshape(*q.shape[:-2], -1), -1, axis)
    return q, np.moveaxis(code, -1, axis)


# ---------------------------------------------------------------- graph pieces
@dataclass
class G:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    n: int = 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base, arr, dtype=None):
        nm = self.name(base)
        if dtype is None:
            self.inits.append(numpy_helper.from_array(np.asarray(arr), nm))
        else:
            self.inits.append(helper.make_tensor(nm, dtype, list(np.shape(arr)), np.asarray(arr).view(np.uint8).tobytes()
                                                 if dtype != FP4 else _pack4(arr), raw=True))
        return nm

    def node(self, op, inputs, n_out=1, domain="", name=None, **attrs):
        name = name or self.name(op)
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]


def _pack4(q: np.ndarray) -> bytes:
    codes = np.asarray(q).view(np.uint8).reshape(-1) & 0x0F
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8).tobytes()


def fp4_dyn_act(g: G, x: str, amax: float, axis: int = -1, scale_dtype: str = "f32") -> str:
    s = np.array(amax / 6 / 448, np.float32 if scale_dtype == "f32" else np.float16)
    sn = g.const("act_scale", s)
    xf4, sf8 = g.node("TRT_FP4DynamicQuantize", [x, sn], 2, domain="trt", axis=axis, block_size=16, scale_type=FP8)
    sx = g.node("DequantizeLinear", [sf8, sn])
    y = g.node("DequantizeLinear", [xf4, sx], axis=axis, block_size=16)
    return g.node("Cast", [y], to=F16) if scale_dtype == "f32" else y


def fp4_weight(g: G, w: np.ndarray, axis: int, scale_dtype: str = "f32") -> str:
    q, bs8, s_t = nvfp4_weight(w, axis)
    qn = g.const("w_f4", q, FP4)
    bn = g.const("w_f8_scale", bs8, FP8)
    tn = g.const("w_scale", np.array(s_t, np.float32 if scale_dtype == "f32" else np.float16))
    sw = g.node("DequantizeLinear", [bn, tn])
    y = g.node("DequantizeLinear", [qn, sw], axis=axis, block_size=16)
    return g.node("Cast", [y], to=F16) if scale_dtype == "f32" else y


def mx_dyn_act(g: G, x: str, axis: int = -1) -> str:
    xf8, su8 = g.node("TRT_MXFP8DynamicQuantize", [x], 2, domain="trt", axis=axis, block_size=32, output_dtype=FP8)
    return g.node("TRT_MXFP8DequantizeLinear", [xf8, su8], domain="trt", axis=axis, block_size=32, output_dtype=F16)


def mx_weight(g: G, w: np.ndarray, axis: int, standard: bool = False) -> str:
    q, code = mxfp8_weight(w, axis)
    qn = g.const("w_f8", q, FP8)
    if standard:  # opset-24 DequantizeLinear with FLOAT8E8M0 scales
        sn = g.const("w_e8m0", code, E8M0)
        return g.node("DequantizeLinear", [qn, sn], axis=axis, block_size=32, output_dtype=F16)
    sn = g.const("w_e8m0", code)
    return g.node("TRT_MXFP8DequantizeLinear", [qn, sn], domain="trt", axis=axis, block_size=32, output_dtype=F16)


def model(g: G, inputs, outputs, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, "probe", inputs, outputs, initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("trt", 1)])
    m.ir_version = 11 if opset >= 24 else 10
    return m


# ---------------------------------------------------------------- the cases
M, K, N = 128, 256, 512


def w_kn():
    return (RNG.standard_normal((K, N)) * 0.05).astype(np.float32)


def case(fmt, act, wlayout="kn", op="matmul", rank=2, scale_dtype="f32", opset=23, mx_standard=False):
    g = G()
    shape = {2: [M, K], 3: [2, M, K], 4: [2, 4, M // 4, K]}[rank]
    x = "x"
    a = x
    if fmt == "nvfp4" and act:
        if rank == 4:
            r = g.node("Reshape", [x, g.const("to3d", np.array([-1, M // 4, K], np.int64))])
            a = fp4_dyn_act(g, r, 4.0, scale_dtype=scale_dtype)
            a = g.node("Reshape", [a, g.const("to4d", np.array(shape, np.int64))])
        else:
            a = fp4_dyn_act(g, x, 4.0, scale_dtype=scale_dtype)
    elif fmt == "mxfp8" and act:
        a = mx_dyn_act(g, x)
    w = w_kn()
    if op == "gemm":  # Gemm(x, W[N,K], transB=1): blocks along K = axis 1 of the stored weight
        wd = fp4_weight(g, w.T.copy(), 1, scale_dtype) if fmt == "nvfp4" else mx_weight(g, w.T.copy(), 1, mx_standard)
        bias = g.const("bias", np.zeros(N, np.float16))
        y = g.node("Gemm", [a, wd, bias], name="gemm", transB=1)
    else:
        if wlayout == "kn":
            wd = fp4_weight(g, w, 0, scale_dtype) if fmt == "nvfp4" else mx_weight(g, w, 0, mx_standard)
        else:  # stored [N,K], blocked on its last axis, transposed to [K,N]
            wt = fp4_weight(g, w.T.copy(), 1, scale_dtype) if fmt == "nvfp4" else mx_weight(g, w.T.copy(), 1, mx_standard)
            wd = g.node("Transpose", [wt], perm=[1, 0])
        y = g.node("MatMul", [a, wd], name="gemm")
    yshape = shape[:-1] + [N]
    out = g.node("Identity", [y])
    return model(g, [helper.make_tensor_value_info(x, F16, shape)], [helper.make_tensor_value_info(out, F16, yshape)], opset)


def case_bmm_fp4():
    """Q·Kᵀ with both operands dynamically quantized to NVFP4 (an attention BMM)."""
    g = G()
    q = fp4_dyn_act(g, "q", 4.0)
    k = fp4_dyn_act(g, "k", 4.0)
    y = g.node("MatMul", [q, k], name="gemm")
    out = g.node("Identity", [y])
    return model(g, [helper.make_tensor_value_info("q", F16, [8, M, 64]), helper.make_tensor_value_info("k", F16, [8, 64, M])],
                 [helper.make_tensor_value_info(out, F16, [8, M, M])], 23)


def case_conv_fp4_weight():
    """Conv with NVFP4 weights (blocks along input channels), FP16 activations."""
    g = G()
    w = (RNG.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    wd = fp4_weight(g, w, 1)
    y = g.node("Conv", ["x", wd], name="gemm", pads=[1, 1, 1, 1])
    out = g.node("Identity", [y])
    return model(g, [helper.make_tensor_value_info("x", F16, [1, 64, 32, 32])], [helper.make_tensor_value_info(out, F16, [1, 64, 32, 32])], 23)


CASES = {
    "nvfp4_w4a4_matmul_kn_axis0": lambda: case("nvfp4", True, "kn"),
    "nvfp4_w4a4_matmul_nk_transpose": lambda: case("nvfp4", True, "nk"),
    "nvfp4_w4a4_matmul_kn_f16scales": lambda: case("nvfp4", True, "kn", scale_dtype="f16"),
    "nvfp4_w4a4_matmul_3d": lambda: case("nvfp4", True, "kn", rank=3),
    "nvfp4_w4a4_matmul_4d_reshape": lambda: case("nvfp4", True, "kn", rank=4),
    "nvfp4_w4a4_gemm_transB": lambda: case("nvfp4", True, op="gemm"),
    "nvfp4_w4a16_matmul_kn": lambda: case("nvfp4", False, "kn"),
    "nvfp4_w4a16_gemm_transB": lambda: case("nvfp4", False, op="gemm"),
    "nvfp4_w4a4_matmul_opset19": lambda: case("nvfp4", True, "kn", opset=19),
    "nvfp4_bmm_both_dynamic": case_bmm_fp4,
    "nvfp4_conv_weight_only": case_conv_fp4_weight,
    "mxfp8_matmul_kn_axis0": lambda: case("mxfp8", True, "kn"),
    "mxfp8_matmul_nk_transpose": lambda: case("mxfp8", True, "nk"),
    "mxfp8_matmul_3d": lambda: case("mxfp8", True, "kn", rank=3),
    "mxfp8_gemm_transB": lambda: case("mxfp8", True, op="gemm"),
    "mxfp8_matmul_std_e8m0_dq": lambda: case("mxfp8", True, "kn", opset=24, mx_standard=True),
    "mxfp8_weight_only": lambda: case("mxfp8", False, "kn"),
    "mxfp8_matmul_opset19": lambda: case("mxfp8", True, "kn", opset=19),
}


def probe(name: str, keep: Path | None) -> dict:
    from onnxopt.errors import OnnxoptError
    from onnxopt.trt import report, rtx
    m = CASES[name]()
    with tempfile.TemporaryDirectory() as d:
        d = Path(keep) if keep else Path(d)
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{name}.onnx"
        onnx.save(m, str(p))
        t0 = time.perf_counter()
        try:
            res = rtx.build(p, d / f"{name}.plan", targets=[(12, 0)])
        except OnnxoptError as e:
            return {"case": name, "built": False, "error": str(e)[:300]}
        bl = report.parse_log(res.log)
        ks = [k for k in bl.kernels if "gemm" in k.layers]
        main = next((k for k in ks if k.computes), None)
        return {"case": name, "built": True, "seconds": round(time.perf_counter() - t0, 1),
                "kernel": main.name if main else None, "type": main.type if main else None,
                "inputs": main.inputs if main else None, "constants": main.constants if main else None,
                "tactic": main.tactic[:90] if main else None, "precision": main.precision if main else None,
                "kernels_with_layer": [(k.name, k.type, k.inputs, k.constants) for k in ks],
                "n_kernels": len(bl.kernels)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--json")
    ap.add_argument("--keep")
    a = ap.parse_args()
    names = [n for n in CASES if not a.only or any(s in n for s in a.only.split(","))]
    rows = []
    for n in names:
        r = probe(n, Path(a.keep) if a.keep else None)
        rows.append(r)
        if r["built"]:
            print(f"{n:<36} {r['type'] or '-':<10} in={r['inputs']} const={r['constants']} -> {r['precision']}  [{r['kernel']}]", flush=True)
        else:
            print(f"{n:<36} BUILD FAILED: {r['error']}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
