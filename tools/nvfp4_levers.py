"""What would make an NVFP4 W4A4 layer of MiniLM cheaper in error (issue 24's --auto criterion): per GEMM, the
relative output error ||Q(X) Q(W) - X W||^2 / ||X W||^2 on the calibration activations (numpy, the NVFP4
reference numerics of onnxopt.formats.nvfp4) for these variants, then a projection of --auto's NVFP4 share:
the model-level sensitivities of an --auto report scaled by each layer's variant/rtn ratio, chosen by
autoquant.mix_for_error at a given error budget. In-sample (GPTQ is fitted and measured on the same rows):
an optimistic guide to which lever to build, not a result.

    rtn       --auto's NVFP4 candidate before: per-block clip search on weight MSE
    gptq      AWQ clip search + error-feedback rounding (what --auto's NVFP4 candidate carries now)
    sq.5      SmoothQuant-style scaling s = max|X|^0.5 / max|W|^0.5 (x / s quantized, s * W quantized)
    lr32      SVDQuant-style rank-32 16-bit branch on unquantized X, residual W - L quantized
    combos    sq.5gptq (what --auto's NVFP4 candidate does, alpha chosen per layer), sq.5lr32, sq.5lr32gptq

    python tools/nvfp4_levers.py --model /tmp/mlm/minilm/model.onnx --calib /tmp/mlm/minilm/calib.npz \
        --report r.json --budget 4.35e-3 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxopt import autoquant, ort  # noqa: E402
from onnxopt.rewrite import awq
from onnxopt.formats import NVFP4  # noqa: E402
from onnxopt.formats.nvfp4 import BLOCK, fake_quant_activation  # noqa: E402

VARIANTS = ("rtn", "gptq", "sq.5", "sq.5gptq", "lr32", "sq.5lr32", "sq.5lr32gptq")


def activations(model: str, calib: str) -> tuple[list, dict]:
    """[(layer, input name, weight [K, N])] of the MatMuls with constant weights, and their inputs as rows."""
    m = onnx.load(model)
    inits = {i.name: i for i in m.graph.initializer}
    layers = [(n.name, n.input[0], numpy_helper.to_array(inits[n.input[1]]).astype(np.float32))
              for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    names = sorted({x for _, x, _ in layers})
    for x in names:
        m.graph.output.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    got = ort.session(m, level="disable").run(names, dict(np.load(calib)))
    return layers, {n: v.reshape(-1, v.shape[-1]).astype(np.float32) for n, v in zip(names, got)}


def variant_output(x, w, alpha=None, rank=0, gptq=False) -> np.ndarray:
    """The layer output under one variant."""
    if alpha is not None:
        s = np.clip(np.abs(x).max(0) ** alpha / np.maximum(np.abs(w).max(1), 1e-8) ** (1 - alpha), 1e-4, 1e4)
        x, w = x / s.astype(np.float32), w * s.astype(np.float32)[:, None]
    low = 0.0
    if rank:
        u, sv, vt = np.linalg.svd(w, full_matrices=False)
        low_w = (u[:, :rank] * sv[:rank]) @ vt[:rank]
        w, low = (w - low_w).astype(np.float32), x @ low_w
    xq = fake_quant_activation(x, float(np.abs(x).max()))
    if gptq:
        h = xq.T.astype(np.float64) @ xq
        clip, _ = awq.search_clip(h.astype(np.float32), w, BLOCK, fmt=NVFP4)
        scale = NVFP4.block_scales(w, BLOCK, clip)
        wq = NVFP4.dequantize(awq.gptq_round(w, h, scale, BLOCK, fmt=NVFP4), scale, 1)
    else:
        wq = NVFP4.fake_quant(w, 1, "fp32")
    return xq @ wq + low


def parse(v: str) -> tuple:
    return (float(v.split("sq")[1][:2]) if "sq" in v else None, int(v.split("lr")[1][:2]) if "lr" in v else 0, "gptq" in v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--report", help="an --auto --formats fp8,nvfp4 report (its sensitivities) to project from")
    ap.add_argument("--budget", type=float, default=4.35e-3, help="summed 1 - cosine the choice may spend")
    ap.add_argument("--json")
    a = ap.parse_args()
    layers, acts = activations(a.model, a.calib)
    errs = {}
    for name, xn, w in layers:
        x = acts[xn]
        y = x @ w
        errs[name] = {v: float(((variant_output(x, w, *parse(v)) - y) ** 2).sum() / (y ** 2).sum()) for v in VARIANTS}
        print(name, w.shape, " ".join(f"{v}={e:.2e}" for v, e in errs[name].items()), flush=True)
    size = {n: w.size for n, _, w in layers}
    total = sum(size.values())
    print("param-weighted:", {v: f"{sum(errs[n][v] * size[n] for n in errs) / total:.2e}" for v in VARIANTS})
    out = {"layers": errs, "projection": {}}
    if a.report:
        rep = json.loads(Path(a.report).read_text())["autoquant"]["layers"]
        for v in VARIANTS:
            ls = {}
            for n, l in rep.items():
                e = dict(l["sensitivity"])
                if "nvfp4" in e and n in errs:
                    e["nvfp4"] *= errs[n][v] / errs[n]["rtn"]
                ls[n] = autoquant.Layer(n, l["op"], l["candidates"], {}, l["params"], macs=l["macs"], error=e)
            mix = autoquant.mix_for_error(ls, a.budget)
            share = sum(l.params for n, l in ls.items() if mix[n] == "nvfp4") / max(sum(l.params for l in ls.values()), 1)
            out["projection"][v] = share
            print(f"{v:14s} budget {a.budget:.2e}: NVFP4 {100 * share:.1f}% of the weighted layers' parameters")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
