"""Sampler-level fidelity benchmark: final samples of the quantized denoiser vs FP32, same seeds and noise.

    # the real consistency UNet (adaptive-terrain-diffusion), its own sampler in 1 and 3 steps, on the CPU
    python tools/bench_sampler.py terrain --work /tmp/bs --modes fp16,fp8,int8,auto --json terrain.json
    # the full-size SDXL UNet (seeded random weights): 20 Euler steps with CFG at 1024², FP8 vs FP32 (GPU machine)
    python tools/bench_sampler.py sdxl --work /tmp/sdxl --provider cuda --json sdxl.json

terrain: calibration data is recorded along the model's own 3-step trajectory (`calib-data trajectory`, seeds
0-15); each mode is written once (fp16: convert --fp16; fp8: quantize --fp8; fp8-fp32: the same with
--high-precision fp32, the workaround before branch huge; int8: quantize --int8; auto: quantize --auto
--target-psnr 30 verified on seeds 500-503) and
compared with `compare --sampler consistency` in 1 and 3 steps on held-out seeds 1000-1007 (the FP32 trajectory
sampled once per step count).
sdxl: tools/bench_sdxl.py exports the UNet and its synthetic calibration data; `quantize --fp8 --preset sdxl` (on
--provider; --calib-source trajectory calibrates along the FP32 UNet's own Euler loop instead); then one child
process samples FP32 and FP8 in turn (one session alive at a time) and reports the drift per step, the final
PSNR/SSIM/cosine of the latents and its own peak RSS (ru_maxrss).
Every onnxopt command runs in its own child process; wall time and peak RSS are the child's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's onnxopt, not an installed one
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def sh(cmd: list, log: Path) -> dict:
    """Run a child process; its exit code, wall time, peak RSS (GiB) and last output line."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "last": lines[-1][:300] if lines else ""}


def onnxopt(*args) -> list:
    return [sys.executable, "-m", "onnxopt", *args]


def model_bytes(path: Path) -> int:
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ---------------------------------------------------------------- terrain
def terrain_model() -> Path:
    import terrain_diffusion
    return Path(terrain_diffusion.__file__).parent / "weights" / "terrain_consistency_unet_difficulty100.onnx"


def build_terrain(work: Path, modes: list, args) -> dict:
    ref, calib = terrain_model(), work / "calib.npz"
    out = {"model": str(ref), "calib": {"sampler": "consistency", "steps": 3, "seeds": args.calib_seeds}}
    if not calib.exists():
        out["calib"].update(sh(onnxopt("-q", "calib-data", "trajectory", ref, "--sampler", "consistency", "--steps", 3,
                                       "--seeds", args.calib_seeds, "-o", calib), work / "calib.log"))
    cmds = {
        "fp16": [onnxopt("convert", ref, "--fp16", "--calib", calib)],
        "fp8": [onnxopt("quantize", ref, "--fp8", "--calib", calib)],
        "fp8-fp32": [onnxopt("quantize", ref, "--fp8", "--high-precision", "fp32", "--calib", calib)],
        "int8": [onnxopt("quantize", ref, "--int8", "--calib", calib)],
        "auto": [onnxopt("quantize", ref, "--auto", "--formats", args.auto_formats, "--target-psnr", args.target_psnr,
                         "--sampler", "consistency", "--steps", 3, "--verify-seeds", args.verify_seeds, "--calib", calib,
                         "--calib-batches", args.auto_calib_batches, "--high-precision", args.auto_high_precision,
                         "--sensitivity", work / "auto_sensitivity.json", "--report", work / "auto_report.json")],
    }
    for mode in modes:
        path = work / f"terrain.{mode}.onnx"
        rec = out.setdefault(mode, {"tries": []})
        if path.exists():
            continue
        for cmd in cmds[mode]:
            r = sh(cmd + ["-o", path], work / f"{mode}.log")
            rec["tries"].append({"command": " ".join(str(c) for c in cmd[2:]).replace(str(ref), "TERRAIN.onnx"), **r})
            if r["rc"] == 0:
                break
    return out


def eval_terrain(work: Path, modes: list, args) -> dict:
    import numpy as np

    from onnxopt import sampler as S
    ref = terrain_model()
    res = {}
    for steps in args.steps:
        opts = S.SamplerOptions("consistency", steps=steps, seeds=S.parse_seeds(args.seeds))
        m = S.load_model(str(ref))
        t = time.perf_counter()
        ref_run = S.run_all(m, S.roles(m, opts), opts, None, "cpu", "FP32")
        fp32_s = time.perf_counter() - t
        for mode in modes:
            path = work / f"terrain.{mode}.onnx"
            if not path.exists():
                continue
            t = time.perf_counter()
            c = S.compare_sampled(str(ref), str(path), opts, reference_run=ref_run)
            f = c.final
            res.setdefault(mode, {"bytes": model_bytes(path)})[f"steps{steps}"] = {
                "psnr_mean": f.psnr_mean, "psnr_worst": f.psnr_worst, "ssim_mean": f.ssim_mean,
                "cosine_mean": f.cosine_mean, "cosine_worst": f.cosine_worst,
                "drift_psnr": [d.psnr_db for d in c.drift], "wall_s": round(time.perf_counter() - t, 1),
                "fp32_wall_s": round(fp32_s, 1)}
            if mode == "auto" and (work / "auto_report.json").exists():
                a = json.loads((work / "auto_report.json").read_text())["autoquant"]
                res[mode]["auto"] = {"weight_bits": a["weight_bits"], "macs_8bit": a["macs_8bit"], "counts": a["counts"],
                                     "kept_wide": a["kept_wide"], "verified": a["verified"], "met": a["met"],
                                     "int8_broken": [b["layer"] for b in a["int8_broken"][:10]]}
            np.save(work / f"final_{mode}_{steps}.npy", c.candidate)
        np.save(work / f"final_fp32_{steps}.npy", ref_run.final)
    return res


def terrain(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    built = build_terrain(work, modes, args)
    return {"model": "terrain", "build": built, "eval": eval_terrain(work, modes, args),
            "seeds": args.seeds, "steps": args.steps}


def terrain_table(r: dict) -> str:
    steps = r["steps"]
    head = f"{'mode':<8}{'MB':>7}" + "".join(f"{f'{s}-step PSNR (worst)':>24}{'SSIM':>8}" for s in steps)
    lines = [head]
    for mode, v in r["eval"].items():
        row = f"{mode:<8}{v['bytes'] / 1e6:>7.1f}"
        for s in steps:
            e = v.get(f"steps{s}")
            row += f"{e['psnr_mean']:>15.2f} ({e['psnr_worst']:6.2f})" + f"{e['ssim_mean']:>8.4f}" if e else " " * 32
        lines.append(row)
        if "auto" in v:
            a = v["auto"]
            lines.append(f"        auto: weight bits {a['weight_bits']:.2f}, 8-bit MACs {100 * a['macs_8bit']:.0f}%, "
                         f"{len(a['kept_wide'])} layers kept wide, verified PSNR {a['verified']['psnr']:.2f} (met {a['met']})")
    for mode, b in r["build"].items():
        if isinstance(b, dict) and b.get("tries"):
            for t in b["tries"]:
                if t["rc"] != 0:
                    lines.append(f"{mode}: `{t['command']}` failed: {t['last']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- sdxl
def sdxl(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = {"model": "sdxl", "scale": args.scale}
    if not (work / "unet.onnx").exists():
        out["export"] = sh([sys.executable, ROOT / "tools" / "bench_sdxl.py", "--work", work, "--scale", args.scale,
                            "--size", 8 * int(args.size.split("x")[0]), "--stages", "export,calib"], work / "export.log")
    calib = work / "calib.npz"  # bench_sdxl's synthetic schedule (8 samples over 30 Euler steps)
    if args.calib_source == "trajectory":
        calib = work / "trajectory.npz"
        if not calib.exists():
            out["calib"] = sh(onnxopt("-q", "calib-data", "trajectory", work / "unet.onnx", "--sampler", "euler", "--steps",
                                      args.sdxl_steps, "--guidance", args.guidance, "--size", args.size, "--seeds", "100-101",
                                      "--provider", args.provider, "-o", calib), work / "calib.log")
    if not (work / "unet.fp8.onnx").exists():
        out["fp8"] = sh(onnxopt("quantize", work / "unet.onnx", "--fp8", "--preset", "sdxl", "--calib", calib,
                                "--provider", args.provider, "-o", work / "unet.fp8.onnx"), work / "fp8.log")
    cmd = onnxopt("compare", work / "unet.onnx", work / "unet.fp8.onnx", "--sampler", "euler", "--steps", args.sdxl_steps,
                  "--guidance", args.guidance, "--size", args.size, "--seeds", args.sdxl_seeds, "--provider", args.provider,
                  "--report", work / "sampled.json", "--save-grid", work / "grid.png")
    out["compare"] = {"command": " ".join(map(str, cmd[2:])), **sh(cmd, work / "compare.log")}
    if (work / "sampled.json").exists():
        out["sampled"] = json.loads((work / "sampled.json").read_text())
    return out


def sdxl_table(r: dict) -> str:
    c = r["compare"]
    lines = [f"compare: rc {c['rc']}, {c['wall_s']} s, peak RSS {c['peak_rss_gib']} GiB (target ≤ 4 GiB)"]
    s = r.get("sampled")
    if s:
        lines.append("drift PSNR per step: " + " ".join(f"{d['psnr_db']:.1f}" for d in s["drift"]))
        f = s["final"]
        lines.append(f"final latents: PSNR {f['psnr_mean']:.2f} dB (worst {f['psnr_worst']:.2f}), SSIM {f['ssim_mean']:.4f}, "
                     f"cosine {f['cosine_mean']:.6f}")
    else:
        lines.append(c["last"])
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="model", required=True)
    t = sub.add_parser("terrain")
    t.add_argument("--work", required=True)
    t.add_argument("--modes", default="fp16,fp8,int8,auto")
    t.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 3])
    t.add_argument("--seeds", default="1000-1007", help="held-out evaluation seeds")
    t.add_argument("--calib-seeds", default="0-15")
    t.add_argument("--verify-seeds", default="500-503", help="--auto's held-out verification seeds")
    t.add_argument("--target-psnr", type=float, default=30.0)
    t.add_argument("--auto-formats", default="fp8,int8")
    t.add_argument("--auto-calib-batches", type=int, default=6, help="calibration samples --auto measures sensitivities on")
    t.add_argument("--auto-high-precision", default="fp32", help="fp32 until the fp16 autocast fix (branch huge) lands")
    s = sub.add_parser("sdxl")
    s.add_argument("--work", required=True)
    s.add_argument("--scale", default="full")
    s.add_argument("--provider", default="cpu")
    s.add_argument("--sdxl-steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--size", default="128x128", help="latent HxW (1024² pixels = 128x128 latents)")
    s.add_argument("--sdxl-seeds", default="0-1")
    s.add_argument("--calib-source", choices=("synthetic", "trajectory"), default="synthetic",
                   help="FP8 calibration: calib-data sdxl's synthetic schedule, or calib-data trajectory (the FP32 UNet "
                        "in the 20-step Euler loop, seeds 100-101)")
    for p in (t, s):
        p.add_argument("--json")
    args = ap.parse_args(argv)
    r = terrain(args) if args.model == "terrain" else sdxl(args)
    print(terrain_table(r) if args.model == "terrain" else sdxl_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2, default=float))


if __name__ == "__main__":
    main()
