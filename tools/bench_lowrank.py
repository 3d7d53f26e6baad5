"""Low-rank branch on the real diffusion model: final-sample PSNR vs FP32 with the model's own sampler.

The terrain consistency UNet (package adaptive-terrain-diffusion) is sampled as terrain_diffusion/generator.py
does: 1 step (x = 80·z, D(x, 80)) and, multistep, re-noised at intermediate sigmas (Karras rho 7 from 80 to
0.002: 80, 9.75, 0.47 for 3 steps). Same noise and difficulty per seed for every model; calibration comes from
FP32 trajectories of other seeds (1000+), evaluation seeds are held out (0..). PSNR over the final
heightfields in model space ([-1, 1]: peak 2), over all evaluation samples.

    python tools/bench_lowrank.py --variants "int8:--int8" "int8-lr:--int8 --lowrank auto" --json out.json

Each variant is `name:quantize options`; the script runs `python -m onnxopt quantize` of this checkout.
(Until onnxopt.sampler lands on main this is the measurement; it then moves onto the shared module.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
SIGMA_MAX, SIGMA_MIN, RHO = 80.0, 0.002, 7.0


def default_model() -> Path:
    import terrain_diffusion
    return Path(terrain_diffusion.__file__).parent / "weights" / "terrain_consistency_unet_difficulty100.onnx"


def sigmas(steps: int) -> np.ndarray:
    """The sigmas each step denoises from (Karras schedule, rho 7, without the final sigma_min)."""
    a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return np.array([(a + i / steps * (b - a)) ** RHO for i in range(steps)], dtype=np.float32)


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact fake-quant evaluation
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sample(sess, seed: int, batch: int, steps: int, record: list | None = None) -> np.ndarray:
    """Final samples [batch, 1, 128, 128] for one seed (noise and difficulty drawn from it)."""
    rng = np.random.default_rng(seed)
    diff = ((rng.integers(1, 101, size=batch) - 1) / 99).astype(np.float32)
    x0 = None
    for i, s in enumerate(sigmas(steps)):
        z = rng.standard_normal((batch, 1, 128, 128), dtype=np.float32)
        x = z * s if i == 0 else x0 + z * s
        feed = {"noisy": x.astype(np.float32), "sigma": np.full(batch, s, np.float32), "difficulty": diff}
        if record is not None:
            record.append(feed)
        x0 = sess.run(["denoised"], feed)[0].astype(np.float32)
    return x0


def psnr(ref: np.ndarray, out: np.ndarray, peak: float = 2.0) -> float:
    mse = float(np.mean((ref.astype(np.float64) - out) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def make_calib(model: Path, path: Path, seeds: int, batch: int, steps: int) -> None:
    sess = session(model)
    feeds: list = []
    for k in range(seeds):
        sample(sess, 1000 + k, batch, steps, feeds)
    np.savez(path, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})


def weight_bytes(path: Path) -> int:
    import onnx
    from onnx import external_data_helper
    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in external_data_helper._get_all_tensors(m):
        if external_data_helper.uses_external_data(t):
            total += int(external_data_helper.ExternalDataInfo(t).length or 0)
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_lowrank"))
    ap.add_argument("--variants", nargs="+", default=["int8:--int8", "int8-lr:--int8 --lowrank auto"])
    ap.add_argument("--calib-seeds", type=int, default=8)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model = a.model or default_model()
    a.work.mkdir(parents=True, exist_ok=True)
    calib = a.work / "calib.npz"
    if not calib.exists():
        make_calib(model, calib, a.calib_seeds, a.batch, max(a.steps))
    ref_sess = session(model)
    refs = {st: [sample(ref_sess, s, a.batch, st) for s in range(a.eval_seeds)] for st in a.steps}
    rows = []
    for v in a.variants:
        name, _, opts = v.partition(":")
        out = a.work / f"{name}.onnx"
        rep = a.work / f"{name}.json"
        t0 = time.perf_counter()
        if opts.strip() != "fp32":
            cmd = [sys.executable, "-m", "onnxopt", "quantize", str(model), "-o", str(out), "--calib", str(calib),
                   "--report", str(rep), *opts.split()]
            if opts.split()[0] == "convert":
                cmd = [sys.executable, "-m", "onnxopt", "convert", str(model), "-o", str(out), *opts.split()[1:]]
            res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
            if res.returncode:
                rows.append({"variant": name, "options": opts, "error": (res.stderr or res.stdout).strip().splitlines()[-1]})
                print(rows[-1], flush=True)
                continue
        else:
            out = model
        qt = time.perf_counter() - t0
        sess = session(out)
        row = {"variant": name, "options": opts, "quantize_s": round(qt, 1), "weight_bytes": weight_bytes(out)}
        for st in a.steps:
            outs = [sample(sess, s, a.batch, st) for s in range(a.eval_seeds)]
            row[f"psnr_{st}step"] = round(psnr(np.concatenate(refs[st]), np.concatenate(outs)), 2)
        if rep.exists():
            r = json.loads(rep.read_text())
            lr = r.get("lowrank") or {}
            row.update(lowrank_layers=len(lr.get("layers", {})), lowrank_extra_bytes=lr.get("extra_bytes", 0),
                       lowrank_extra_fraction=lr.get("extra_fraction", 0),
                       quantized=r.get("coverage", {}).get("quantized"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"model": str(model), "eval_seeds": a.eval_seeds, "batch": a.batch,
                                      "calib_seeds": a.calib_seeds, "sigmas": {st: sigmas(st).tolist() for st in a.steps},
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
