"""NVFP4 / MXFP8 benchmark (issue 24): accuracy on held-out data next to FP8 and INT4-AWQ, file size against
FP16, and TensorRT-RTX placement for SM 12.0 (CPU build; placement only, never speed).

    python tools/bench_nvfp4.py --work /tmp/nvb [--models example,minilm,sdxl-tiny] [--rows fp8,int4-awq,nvfp4,...]
                                [--no-rtx] [--json out.json]

Accuracy: the candidate's first output over the eval split against the FP32 model's. NVFP4/MXFP8 files are
evaluated through their exact standard-ONNX emulation (onnxopt.formats.emulation); every file then runs as
the FP8/INT4 rows do (as is, or its FP32 view where ORT's CPU provider lacks FP16 kernels), so the rows differ
only by their formats. MiniLM: mean cosine of the sentence embeddings (tools/real_models.py); the example and
the tiny SDXL UNet: global cosine of the output (onnxopt.metrics.mean_cosine_score), as tools/bench_auto.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_auto  # noqa: E402
import real_models as rm  # noqa: E402

from onnxopt import modelfile, ort, presets
from onnxopt.cast.autocast import fp32_view  # noqa: E402
from onnxopt.formats.emulation import lower_for_ort  # noqa: E402
from onnxopt.api import QuantConfig, quantize  # noqa: E402

ROWS = {
    "fp8": dict(mode="fp8"),
    "int4-awq": dict(mode="int4", awq="full"),
    "nvfp4": dict(mode="nvfp4"),
    "nvfp4-w": dict(mode="nvfp4", weight_only=True),
    "mxfp8": dict(mode="mxfp8"),
    "nvfp4-lr": dict(mode="nvfp4", lowrank="auto"),             # + low-rank branch, budget 0.1 (SVDQuant)
    "nvfp4-lr32": dict(mode="nvfp4", lowrank=32),
    "nvfp4-lr-b50": dict(mode="nvfp4", lowrank="auto", lowrank_budget=0.5),   # about rank 32's bytes, chosen per layer
    "nvfp4-lr-noawq": dict(mode="nvfp4", lowrank="auto", awq="none"),
}


def outputs(path, npz: Path) -> np.ndarray:
    """First output over the eval samples; block formats through their exact emulation."""
    model = lower_for_ort(modelfile.load(path))
    try:
        sess = ort.session(model, level="disable")
        feeds = bench_auto._feeds(sess, npz)
        sess.run(None, feeds[0])
    except Exception:  # noqa: BLE001 - FP16 kernels missing on the CPU provider
        sess = ort.session(fp32_view(model), level="disable")
        feeds = bench_auto._feeds(sess, npz)
    rows = []
    for f in feeds:
        y = sess.run(None, f)[0]
        rows.append(y.reshape(y.shape[0], -1).astype(np.float64))
    return np.concatenate(rows)


def models(work: Path, names) -> dict:
    """name -> (model, calib, eval, metric, preset)."""
    out = {}
    if "example" in names:
        d = work / "example"
        if not (d / "model.onnx").is_file():
            import make_example
            make_example.main(str(d))
        out["example"] = (d / "model.onnx", d / "calib.npz", d / "eval.npz", "cosine", None)
    if "minilm" in names:
        p = rm.prepare("minilm", work / "real")
        out["minilm"] = (p.model, p.calib, p.eval, "mean-cosine", None)
    if "sdxl-tiny" in names:
        bench_auto.sdxl_data(work)
        m = bench_auto.models(work, ["sdxl-tiny"])["sdxl-tiny"]
        out["sdxl-tiny"] = (m.path, m.calib, m.eval, "cosine", "sdxl")
    return out


def config(row: str, preset: str | None) -> QuantConfig:
    cfg = ROWS[row]
    if preset and cfg["mode"] != "int4":
        return replace(presets.config(preset, cfg["mode"]), progress=False, **{k: v for k, v in cfg.items() if k != "mode"})
    return QuantConfig(progress=False, **cfg)


def fp16_bytes(model: Path, work: Path) -> int:
    from onnxopt.api import convert
    out = work / f"{model.parent.name}.fp16.onnx"
    if not out.is_file():
        convert(model, out, measure=False, verify=False)
    return bench_auto_files(out)


def bench_auto_files(p: Path) -> int:
    return sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))


def profiles(model: Path, npz: Path) -> dict:
    """One calibration sample's input shapes as a fixed build profile (the models have dynamic axes)."""
    m = modelfile.load(model)
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in m.graph.input}
    out = {}
    with np.load(npz) as z:
        for k in z.files:
            if k in ranks:
                s = tuple(z[k].shape[1:]) if z[k].ndim == ranks[k] + 1 else (1,) + tuple(z[k].shape[1:])
                out[k] = (s, s, s)
    return out


def rtx_report(path: Path, shapes: dict) -> dict:
    from onnxopt.trt import report
    from onnxopt.trt.build import BuildConfig
    rep = report.engine_report_of(path, config=BuildConfig(profiles=shapes), targets=["12.0"])
    by = {}
    for r in rep["layers"]:
        key = f"{r['graph']} -> {r['engine']}"
        by[key] = by.get(key, 0) + 1
    return {"in_quantized_kernels": f"{rep['quantized_in_quantized_kernels']}/{rep['quantized_layers']}",
            "fallbacks": rep["fallbacks"], "layers": by, "attention": rep["attention"]["fused_by_precision"],
            "weights_vs_fp16": rep["weights"]["vs_fp16"], "lowrank_branch": rep["lowrank_branch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/nvb")
    ap.add_argument("--models", default="example,minilm,sdxl-tiny")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--no-rtx", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name, (model, calib, evald, kind, preset) in models(work, a.models.split(",")).items():
        ref = outputs(model, evald)
        base = fp16_bytes(Path(model), work)
        for row in a.rows.split(","):
            out = work / f"{name}.{row}.onnx"
            t = time.perf_counter()
            try:
                res = quantize(str(model), str(out), config=config(row, preset), data=str(calib))
            except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not fatal
                results.append({"model": name, "row": row, "error": str(e)[:200]})
                print(results[-1], flush=True)
                continue
            wall = time.perf_counter() - t
            cand = outputs(out, evald)
            value = rm.mean_cosine(ref, cand) if kind == "mean-cosine" else bench_auto.metric("cosine", ref, cand)
            rec = {"model": name, "row": row, "metric": kind, "value": round(float(value), 5), "wall_s": round(wall, 1),
                   "size_vs_fp16": round(bench_auto_files(out) / base, 3), "coverage": res.report.get("coverage")}
            if not a.no_rtx and row != "int4-awq":
                try:
                    rec["rtx_sm120"] = rtx_report(out, profiles(Path(model), Path(calib)))
                except Exception as e:  # noqa: BLE001
                    rec["rtx_sm120"] = {"error": str(e)[:200]}
            results.append(rec)
            print(json.dumps(rec), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
