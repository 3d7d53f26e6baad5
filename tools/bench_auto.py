"""Accuracy-vs-bits frontier of `quantize --auto` (per-layer format search) against the uniform FP8 / INT8 /
INT4 points, on MiniLM (mean cosine of embeddings), EfficientNet-Lite0 (top-1 agreement) and the tiny SDXL
UNet (mean cosine of the noise prediction), all against FP32 with ORT at ORT_DISABLE_ALL on held-out data
(the eval split, never seen by calibration or by the search's own verification split).

    python tools/bench_auto.py [--models minilm,effnet,sdxl-tiny] [--rows auto-cos,fp8,...] [--json out.json]

Bits: weight bits averaged over the parameters of all Conv/ConvTranspose/MatMul/Gemm layers (FP16 = 16),
activation bits averaged over their MACs, and the share of MACs that run in 8 bits, read from each output
graph's Q/DQ (MACs per layer from the --auto report of the same model).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxopt import autoquant, metrics, modelfile, ort
from onnxopt.api import QuantConfig, quantize  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import real_models as rm  # noqa: E402


@dataclass
class Model:
    path: Path
    calib: Path
    eval: Path
    metric: str            # "cosine" | "top1"


@dataclass(frozen=True)
class Row:
    name: str
    config: dict = field(default_factory=dict)
    goal: str = ""         # the target for this row


SQ = ("fp8", "int8", "int8-sq")
ROWS = {
    "minilm": [Row("auto-cos", {"auto": True, "target_cosine": 0.999}, "cosine >= 0.999 with fewer bits than any uniform format meeting it (aim <= 9)"),
               Row("auto-cos-sq", {"auto": True, "target_cosine": 0.999, "formats": SQ}, "as auto-cos, int8-sq among the candidates"),
               Row("auto-cos-998-sq", {"auto": True, "target_cosine": 0.998, "formats": SQ}, "frontier point"),
               Row("auto-bits9-sq", {"auto": True, "bits": 9.0, "formats": SQ}, "frontier point"),
               Row("auto-bits8-sq", {"auto": True, "bits": 8.0, "formats": SQ}, "frontier point"),
               Row("auto-bits6", {"auto": True, "bits": 6.0, "formats": ("fp8", "int8", "int4")}, "cosine >= 0.99 at 6 weight bits"),
               Row("fp8", {"mode": "fp8"}), Row("int8", {"mode": "int8"}),
               Row("int8-sq", {"mode": "int8", "smoothquant": "auto"}),
               Row("int4-awq", {"mode": "int4", "awq": "full"})],
    "effnet": [Row("auto-top1", {"auto": True, "target_top1": 0.97}, "top-1 >= 0.97 with >= 80% MACs 8-bit"),
               Row("auto-top1-95", {"auto": True, "target_top1": 0.95}, "frontier point"),
               Row("auto-bits8.5", {"auto": True, "bits": 8.5}, "frontier point"),
               Row("fp8", {"mode": "fp8"}), Row("int8", {"mode": "int8"})],
    "sdxl-tiny": [Row("auto-cos", {"auto": True, "target_cosine": 0.9995}, "cosine >= 0.9995 with >= 80% MACs 8-bit"),
                  Row("fp8", {"mode": "fp8"}), Row("int8", {"mode": "int8"})],
}


def models(work: Path, names) -> dict:
    """The models (exported once: real ones under real_models' work dir, the tiny UNet under `work`)."""
    out = {}
    for name in ("minilm", "effnet"):
        if name in names:
            p = rm.prepare(name)
            out[name] = Model(p.model, p.calib, p.eval, "cosine" if name == "minilm" else "top1")
    if "sdxl-tiny" in names:
        unet = work / "sdxl-tiny" / "unet.onnx"
        if not unet.is_file():
            from models import sdxl_unet
            sdxl_unet.export(unet, scale="tiny", seed=0)
        out["sdxl-tiny"] = Model(unet, work / "sdxl_calib8.npz", work / "sdxl_eval.npz", "cosine")
    return out


def sdxl_data(work: Path) -> None:
    """Tiny-shape SDXL UNet inputs (64x64 images: 8x8 latents), calibration and held-out eval with other seeds."""
    from onnxopt import diffusion
    shapes = diffusion.SDXLShapes(height=64, width=64)
    # 8 calibration calls (6 to search, 2 held out) keep the ~600-candidate search of 332 layers short on 2 cores
    for name, n, seed in (("sdxl_calib8.npz", 8, 0), ("sdxl_eval.npz", 8, 1)):
        if not (work / name).exists():
            np.savez(work / name, **diffusion.synthesize_sdxl(n, shapes=shapes, seed=seed))


# ---------------------------------------------------------------- evaluation
def outputs(path, npz: Path) -> np.ndarray:
    """First output over the eval samples, one row per sample item (FP32 view if FP16 kernels are missing)."""
    model = modelfile.load(path)
    try:
        sess = ort.session(model, level="disable")
        feeds = _feeds(sess, npz)
        sess.run(None, feeds[0])
    except Exception:  # noqa: BLE001 - FP16 kernels missing on the CPU provider
        from onnxopt.cast.autocast import fp32_view
        sess = ort.session(fp32_view(model), level="disable")
        feeds = _feeds(sess, npz)
    rows = []
    for f in feeds:
        y = sess.run(None, f)[0]
        rows.append(y.reshape(y.shape[0], -1).astype(np.float64))
    return np.concatenate(rows)


def _feeds(sess, npz: Path) -> list:
    ins = {i.name: i for i in sess.get_inputs()}
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files if k in ins}
    first = next(iter(arrays))
    stacked = arrays[first].ndim == len(ins[first].shape) + 1
    n = arrays[first].shape[0]
    step = 1 if stacked else 16
    feeds = []
    for i in range(0, n, step):
        f = {}
        for k, a in arrays.items():
            v = a[i] if stacked else a[i:i + step]
            want = np.float16 if ins[k].type == "tensor(float16)" else (np.int64 if "int64" in ins[k].type else np.float32)
            f[k] = np.ascontiguousarray(v.astype(want))
        feeds.append(f)
    return feeds


def metric(kind: str, ref: np.ndarray, cand: np.ndarray) -> float:
    if kind == "cosine":
        return metrics.mean_cosine_score(ref, cand)
    return float(np.mean(ref.argmax(-1) == cand.argmax(-1))) if np.all(np.isfinite(cand)) else float("nan")


def formats_of(path) -> dict:
    """Layer name -> format, read from the Q/DQ of the output graph."""
    m = onnx.load(str(path), load_external_data=False)
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t.data_type for t in m.graph.initializer}
    names = {onnx.TensorProto.FLOAT8E4M3FN: "fp8", onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT4: "int4"}

    def dq_type(t):
        while t in prod and prod[t].op_type in ("Cast", "Transpose", "Identity"):
            t = prod[t].input[0]
        n = prod.get(t)
        if n is None or n.op_type != "DequantizeLinear":
            return None
        src = n.input[0]
        if src in inits:
            return names.get(inits[src])
        q = prod.get(src)
        return names.get(inits.get(q.input[2])) if q is not None and len(q.input) > 2 else None
    out = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            w, a = dq_type(n.input[1]), dq_type(n.input[0])
            out[n.name] = w or a or "none"  # weight format (INT4 is weight-only); attention BMMs: their input's
    return out


# ---------------------------------------------------------------- runs
def run_row(name: str, m: Model, row: Row, work: Path, ref: np.ndarray, layers: dict | None) -> dict:
    out = work / f"{name}_{row.name}.onnx"
    cfg = {**row.config}
    if cfg.get("auto"):
        cfg["sensitivity"] = str(work / f"{name}.{'-'.join(cfg.get('formats', ('fp8', 'int8')))}.sens.json")
    t = time.perf_counter()
    res = quantize(str(m.path), str(out), config=QuantConfig(progress=False, **cfg), data=str(m.calib))
    wall = time.perf_counter() - t
    value = metric(m.metric, ref, outputs(out, m.eval))
    rec = {"model": name, "row": row.name, "metric": m.metric, "value": value, "wall_s": wall, "goal": row.goal}
    a = res.report.get("autoquant")
    if a:
        rec.update(search_verified=a["verified"], counts=a["counts"], timings=a["timings_s"])
        layers = {n: autoquant.Layer(n, l["op"], l["candidates"], {}, l["params"], macs=l["macs"])
                  for n, l in a["layers"].items()}
    if layers:
        mix = {n: f for n, f in formats_of(out).items() if n in layers}
        mix = {n: mix.get(n, "none") for n in layers}
        rec.update(autoquant.bits_of(mix, layers))
    return rec, layers


def versus_uniform(r: dict, results: list) -> str:
    """An --auto point against the uniform points of its model: "dominated by X" when a uniform point has no
    more weight bits, no more activation bits and an equal or better value; else the uniform points it beats
    at equal or more bits (weight and activation), or "-" when there are none (it is the cheaper or the
    more precise end of the frontier)."""
    if "value" not in r or "weight_bits" not in r or not r["row"].startswith("auto"):
        return ""
    uni = [u for u in results if u["model"] == r["model"] and not u["row"].startswith("auto") and "weight_bits" in u]
    eps = 1e-6
    dom = [u["row"] for u in uni if u["weight_bits"] <= r["weight_bits"] + eps
           and u["activation_bits"] <= r["activation_bits"] + eps and u["value"] >= r["value"]]
    if dom:
        return "dominated by " + ",".join(dom)
    beats = [u["row"] for u in uni if u["weight_bits"] >= r["weight_bits"] - eps
             and u["activation_bits"] >= r["activation_bits"] - eps and u["value"] < r["value"]]
    return "beats " + ",".join(beats) if beats else "not dominated"


def table(results: list) -> str:
    head = "| model | row | metric | held-out value | weight bits | act bits | 8-bit MACs | vs uniform | wall s | goal |"
    lines = [head, "|---" * 10 + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['row']} | - | error: {r['error'][:80]} | | | | | | |")
            continue
        wb = f"{r['weight_bits']:.2f}" if "weight_bits" in r else "-"
        ab = f"{r['activation_bits']:.2f}" if "activation_bits" in r else "-"
        mc = f"{100 * r['macs_8bit']:.0f}%" if "macs_8bit" in r else "-"
        vs = versus_uniform(r, [x for x in results if "error" not in x])
        lines.append(f"| {r['model']} | {r['row']} | {r['metric']} | {r['value']:.5f} | {wb} | {ab} | {mc} | {vs} | "
                     f"{r['wall_s']:.0f} | {r['goal']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,effnet,sdxl-tiny")
    ap.add_argument("--rows", default=None, help="comma list of row names (default all)")
    ap.add_argument("--work", default=str(ROOT / "work" / "bench_auto"), help="outputs and generated data")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ms = models(work, args.models.split(","))
    results = []
    for name in args.models.split(","):
        m = ms[name]
        if name == "sdxl-tiny":
            sdxl_data(work)
        ref = outputs(m.path, m.eval)
        layers = None
        for row in ROWS[name]:
            if args.rows and row.name not in args.rows.split(","):
                continue
            try:
                rec, layers = run_row(name, m, row, work, ref, layers)
            except Exception as e:  # noqa: BLE001 - one failed row does not stop the table
                rec = {"model": name, "row": row.name, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-2000:]}
            results.append(rec)
            print(table([rec]).splitlines()[-1], flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
