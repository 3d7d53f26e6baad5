"""Which low-precision weight forms TensorRT-RTX turns into real kernels: one MatMul (16x256 @ 256x256, FP16
activations) with its weight in each candidate form, built on the CPU, each kernel printed with its datatypes.

    python tools/probe_weight_forms.py [--out DIR] [--compute-capability 8.9] [FORM ...]

Forms: w8a16 (INT8 per-channel DQ weight), w8a16-block (INT8, blocks of 128 along K), w4a8 (INT4 blocks of 128
+ FP8 activation Q/DQ), e5m2 (FP8 E5M2 W8A8), fp8-weight (FP8 E4M3 per-channel DQ weight, FP16 activations),
w8a16-gemm (INT8 [N, K] weight, scales along axis 0, Gemm transB=1). BENCHMARKS.md "W8A16" has the results."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

K, N, M, B = 256, 256, 16, 128
DTYPE, LAYER = re.compile(r"Datatype: (\w+)"), re.compile(r"ONNX Layer: ([^\]]+)")
FORMS = ("w8a16", "w8a16-block", "w4a8", "e5m2", "fp8-weight", "w8a16-gemm")


def _raw(name, qtype, arr) -> onnx.TensorProto:
    return h.make_tensor(name, qtype, list(arr.shape), np.ascontiguousarray(arr).view(np.uint8).tobytes(), raw=True)


def model(form: str) -> onnx.ModelProto:
    """x [M, K] FP16 -> (activation Q/DQ) -> MatMul/Gemm with the weight in `form` -> Relu."""
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32) * 0.05
    nodes, inits, x, op, attrs = [], [], "x", "MatMul", {}

    def act(qtype):
        inits.extend([nh.from_array(np.array(0.05, np.float16), "a_s"), _raw("a_zp", qtype, np.zeros((), np.uint8))])
        nodes.extend([h.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["a_q"]),
                      h.make_node("DequantizeLinear", ["a_q", "a_s", "a_zp"], ["a_dq"])])
        return "a_dq"

    def blocks(qmax):
        s = (np.abs(w).reshape(K // B, B, N).max(1) / qmax).astype(np.float16)
        return s, np.clip(np.rint(w / np.repeat(s.astype(np.float32), B, 0)), -qmax - (qmax == 7), qmax).astype(np.int8)

    if form in ("w8a16", "w8a16-gemm"):
        s = (np.abs(w).max(0) / 127).astype(np.float16)
        q = np.clip(np.rint(w / s.astype(np.float32)), -127, 127).astype(np.int8)
        if form == "w8a16-gemm":
            q, op, attrs = np.ascontiguousarray(q.T), "Gemm", {"transB": 1}
        inits += [nh.from_array(q, "wq"), nh.from_array(s, "ws")]
        nodes.append(h.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0 if op == "Gemm" else 1))
    elif form == "w8a16-block":
        s, q = blocks(127)
        inits += [nh.from_array(q, "wq"), nh.from_array(s, "ws")]
        nodes.append(h.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, block_size=B))
    elif form == "w4a8":
        x = act(T.FLOAT8E4M3FN)
        s, q = blocks(7)
        inits += [h.make_tensor("wq", T.INT4, q.shape, q.flatten().tolist()), nh.from_array(s, "ws")]
        nodes.append(h.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, block_size=B))
    elif form in ("e5m2", "fp8-weight"):
        qtype, dt, qmax = ((T.FLOAT8E5M2, ml_dtypes.float8_e5m2, 57344.0) if form == "e5m2"
                           else (T.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, 448.0))
        if form == "e5m2":
            x = act(qtype)
        s = (np.abs(w).max(0) / qmax).astype(np.float16)
        inits += [_raw("wq", qtype, (w / s.astype(np.float32)).astype(dt)), nh.from_array(s, "ws"),
                  _raw("wzp", qtype, np.zeros(N, dt))]
        nodes.append(h.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], axis=1))
    else:
        raise SystemExit(f"unknown form {form}; use {', '.join(FORMS)}")
    nodes += [h.make_node(op, [x, "w"], ["y0"], name="fc", **attrs), h.make_node("Relu", ["y0"], ["y"], name="act")]
    g = h.make_graph(nodes, form, [h.make_tensor_value_info("x", T.FLOAT16, [M, K])],
                     [h.make_tensor_value_info("y", T.FLOAT16, [M, N])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("forms", nargs="*", default=list(FORMS))
    ap.add_argument("--out", default="work/probe_weight_forms")
    ap.add_argument("--compute-capability", default="8.9")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    for form in a.forms:
        path, log = out / f"{form}.onnx", out / f"{form}.log"
        onnx.save(model(form), path)
        r = subprocess.run([sys.executable, "-m", "onnxopt", "build", str(path), "--backend", "rtx", "--compute-capability",
                            a.compute_capability, "--log", str(log), "-o", str(out / f"{form}.plan"), "-q"],
                           capture_output=True, text=True, cwd=root)
        print(f"== {form}: " + ("built" if r.returncode == 0 else r.stderr.strip().splitlines()[-1][:300]))
        for line in (log.read_text().splitlines() if r.returncode == 0 and log.exists() else []):
            k = re.search(r"Name: (.*?), LayerType: (.*?),", line)
            if k and k[2] not in ("signal", "wait"):
                dts, layers = DTYPE.findall(line), LAYER.findall(line)
                print(f"   {k[1]} ({k[2]}): datatypes {dts}, ONNX {layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
