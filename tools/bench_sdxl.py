"""Full-size SDXL UNet benchmark: export (random weights), calibration data, FP16 / FP8 / INT8, fidelity.

    python tools/bench_sdxl.py --work /tmp/sdxl --stages export,calib,fp16,fp8 --json out.json
    python tools/bench_sdxl.py --work /tmp/sdxl --stages int8,compare --json out.json

Each stage runs in its own child process, so its wall time and peak RSS (ru_maxrss of that process) are
its own. Results accumulate in WORK/results.json across calls (the stages of one work directory may be
split over several runs); the table and --json show everything gathered so far.
Stages: export (models/sdxl_unet.py, seeded random weights), calib (8 samples over a 30-step schedule,
plus held-out samples with another seed), fp16 (onnxopt convert), fp8 / int8 (onnxopt quantize with the
sdxl preset), inspect (coverage + lint of the FP8 graph), compare (FP32 vs FP16/FP8/INT8 on the held-out
samples, ORT CPU at ORT_DISABLE_ALL).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("export", "calib", "fp16", "fp8", "int8", "nvfp4", "inspect", "compare")


def files_bytes(model: Path) -> int:
    """Model file plus its external data file(s) beside it."""
    total = model.stat().st_size
    data = model.parent / (model.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total


# ---------------------------------------------------------------- stages (run in a child process)
def stage_export(work: Path, args) -> dict:
    from models import sdxl_unet
    t = time.perf_counter()
    params = sdxl_unet.count_parameters(args.scale)
    path = sdxl_unet.export(work / "unet.onnx", scale=args.scale, seed=args.seed)
    return {"parameters": params, "bytes": files_bytes(path), "export_s": time.perf_counter() - t}


def stage_calib(work: Path, args) -> dict:
    from onnxopt import diffusion
    shapes = diffusion.SDXLShapes(height=args.size, width=args.size)
    calib = diffusion.synthesize_sdxl(args.samples, steps=args.steps, shapes=shapes, seed=0)
    held = diffusion.synthesize_sdxl(args.held_out, steps=args.steps, shapes=shapes, seed=1)
    diffusion.save_npz(calib, work / "calib.npz")
    diffusion.save_npz(held, work / "heldout.npz")
    return {"samples": args.samples, "held_out": args.held_out, "steps": args.steps,
            "calib_timesteps": calib["timestep"].ravel().tolist(), "heldout_timesteps": held["timestep"].ravel().tolist()}


def stage_fp16(work: Path, args) -> dict:
    from onnxopt.api import convert
    path = convert(work / "unet.onnx", work / "unet.fp16.onnx", "fp16")
    return {"bytes": files_bytes(Path(path))}


def _quantize(work: Path, mode: str, args) -> dict:
    from onnxopt import presets
    from onnxopt.api import quantize
    cfg = presets.sdxl(mode, progress=False, memory_budget_mb=args.memory_budget, provider=args.provider,
                       **({"awq": args.awq} if mode == "nvfp4" else {}))
    res = quantize(work / "unet.onnx", work / f"unet.{mode}.onnx", config=cfg, data=work / "calib.npz")
    rep = res.report
    (work / f"report.{mode}.json").write_text(json.dumps(rep, indent=1, default=str))
    return {"bytes": files_bytes(res.path), "coverage": rep.get("coverage"),
            "timings_s": {k: round(v, 1) for k, v in rep.get("timings_s", {}).items()}}


def stage_fp8(work: Path, args) -> dict:
    return _quantize(work, "fp8", args)


def stage_int8(work: Path, args) -> dict:
    return _quantize(work, "int8", args)


def stage_nvfp4(work: Path, args) -> dict:
    """quantize --nvfp4 --preset sdxl (W4A4 GEMMs, FP8 convolutions and attention), with --awq."""
    return _quantize(work, "nvfp4", args)


def stage_inspect(work: Path, args) -> dict:
    """Q/DQ coverage of the FP8 graph: every layer the preset does not exclude, and every attention BMM."""
    from onnxopt import presets
    from onnxopt.inspection import inspect_path
    out = {}
    for mode in ("fp8", "int8"):
        path = work / f"unet.{mode}.onnx"
        if not path.exists():
            continue
        ins = inspect_path(path)
        s = ins.summary()
        excl = [re.compile(p) for p in presets.sdxl(mode).exclude]
        eligible = [l for l in ins.layers if not any(r.search(l.name) for r in excl)]
        mha = [l for l in ins.layers if re.search(r"/attn\d/MatMul(_1)?$", l.name)]
        if mode == "int8":  # the INT8 recipe leaves attention BMMs alone
            eligible = [l for l in eligible if l not in mha]
        missing = [l.name for l in eligible if not l.quantized]
        out[mode] = {"layers": s["layers"], "eligible": len(eligible), "eligible_quantized": len(eligible) - len(missing),
                     "unquantized_eligible": missing[:20], "mha_bmm": len(mha),
                     "mha_bmm_quantized": sum(l.quantized for l in mha),
                     "quantized_weight_share": round(s["quantized_weight_share"], 4), "lint": s["lint"][:20],
                     "lint_clean": not s["lint"]}
    return out


def stage_compare(work: Path, args) -> dict:
    import numpy as np

    from onnxopt import modelfile
    from onnxopt.calib import CalibData, input_specs
    from onnxopt.compare import evaluation_session
    from onnxopt.metrics import Stream

    ref_model = modelfile.load(work / "unet.onnx")
    data = CalibData.from_path(work / "heldout.npz", input_specs(ref_model))
    ref_path = work / "heldout_ref.npz"
    t = time.perf_counter()
    if not ref_path.exists():
        sess, _ = evaluation_session(ref_model)
        refs = [sess.run(None, feed)[0] for feed in data]
        np.savez(ref_path, *refs)
        del sess
    out = {"fp32_forward_s": (time.perf_counter() - t) / max(len(data), 1)}
    del ref_model
    with np.load(ref_path) as z:
        refs = [z[f"arr_{i}"] for i in range(len(z.files))]
    for mode in args.compare:
        path = work / f"unet.{mode}.onnx"
        if not path.exists():
            continue
        t = time.perf_counter()
        sess, _ = evaluation_session(modelfile.load(path))
        acc, per_sample = Stream(), []
        for feed, ref in zip(data, refs):
            feed = {k: v.astype(np.float32) for k, v in feed.items()}
            got = sess.run(None, feed)[0].astype(np.float32)
            acc.update(ref, got)
            one = Stream()
            one.update(ref, got)
            per_sample.append({"timestep": float(feed["timestep"].ravel()[0]), **{k: round(v, 5) for k, v in one.result().items()}})
        del sess
        out[mode] = {**acc.result(), "per_sample": per_sample, "wall_s": time.perf_counter() - t}
    return out


# ---------------------------------------------------------------- driver
def run_stage(stage: str, work: Path, argv: list[str]) -> dict:
    """Run one stage in a child process; its wall time and peak RSS come from the OS."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--_stage", stage, "--work", str(work)] + argv,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    # Sample RSS while waiting, so a peak can be placed in the stage's log (timestamps line up).
    samples, last = [], 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = _rss_gib(proc.pid)
        now = time.perf_counter() - t
        if rss is not None and (not samples or rss > samples[-1][1] + 0.25 or now - last >= 30):
            samples.append((round(now, 1), rss))
            last = now
            print(f"   [{time.strftime('%H:%M:%S')}] {stage} t={now:6.1f}s rss={rss:.2f} GiB", flush=True)
        time.sleep(1.0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    res_file = work / f".stage.{stage}.json"
    result = json.loads(res_file.read_text()) if code == 0 and res_file.exists() else {"error": f"exit code {code}"}
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "rss_trace": samples, **result}


def _rss_gib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        return None
    return None


def summarize(res: dict) -> dict:
    s = {}
    fp32 = res.get("export", {}).get("bytes")
    if fp32:
        s["fp32_gib"] = fp32 / 2**30
        s["rss_limit_gib"] = 1.5 * fp32 / 2**30
    fp16 = res.get("fp16", {}).get("bytes")
    if fp32:  # every initializer at 2 bytes: what convert --fp16 writes, without running it
        s["fp16_estimate_gib"] = fp32 / 2 / 2**30
    for mode in ("fp8", "int8", "nvfp4"):
        r = res.get(mode, {})
        if r.get("bytes") and fp32 and not fp16:
            s[f"{mode}_over_fp16_estimate"] = r["bytes"] / (fp32 / 2)
        if r.get("bytes") and fp16:
            s[f"{mode}_over_fp16"] = r["bytes"] / fp16
        if r.get("peak_rss_gib") and fp32:
            s[f"{mode}_rss_over_fp32"] = r["peak_rss_gib"] * 2**30 / fp32
    return s


def table(res: dict) -> str:
    lines = [f"{'stage':<9}{'wall s':>9}{'peak RSS GiB':>14}{'size GiB':>10}  notes"]
    for stage in STAGES:
        r = res.get(stage)
        if not r:
            continue
        size = f"{r['bytes'] / 2**30:.2f}" if r.get("bytes") else ""
        notes = ""
        if stage == "compare":
            notes = "  ".join(f"{m}: cos {r[m]['cosine']:.5f} SNR {r[m]['snr_db']:.1f} dB" for m in ("fp16", "fp8", "int8") if m in r)
        elif stage == "inspect":
            notes = "  ".join(f"{m}: {v['eligible_quantized']}/{v['eligible']} eligible, MHA {v['mha_bmm_quantized']}/{v['mha_bmm']}, lint {'clean' if v['lint_clean'] else len(v['lint'])}"
                              for m, v in r.items() if isinstance(v, dict) and "eligible" in v)
        elif "error" in r:
            notes = r["error"]
        lines.append(f"{stage:<9}{r.get('wall_s', 0):>9.1f}{r.get('peak_rss_gib', 0):>14.2f}{size:>10}  {notes}")
    for k, v in summarize(res).items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="Directory for models, data and results.json.")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated, from {','.join(STAGES)}.")
    ap.add_argument("--scale", default="full", choices=("full", "half", "tiny"))
    ap.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    ap.add_argument("--size", type=int, default=1024, help="Image size in pixels (latent = size/8).")
    ap.add_argument("--samples", type=int, default=8, help="Calibration samples.")
    ap.add_argument("--held-out", type=int, default=4, help="Held-out evaluation samples (seed 1).")
    ap.add_argument("--steps", type=int, default=30, help="Denoising schedule the samples are spread over.")
    ap.add_argument("--memory-budget", type=int, default=4096, help="Calibration memory budget (MB).")
    ap.add_argument("--provider", default="cpu", help="Calibration provider of the quantize stages (cuda on the GPU machine).")
    ap.add_argument("--awq", default="none", help="nvfp4 stage: AWQ method (none | lite | clip | full).")
    ap.add_argument("--compare", default="fp16,fp8,int8", type=lambda s: [m for m in s.split(",") if m])
    ap.add_argument("--json", type=Path, help="Also write all results here.")
    ap.add_argument("--_stage", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    args.work.mkdir(parents=True, exist_ok=True)

    if args._stage:
        sys.path.insert(0, str(ROOT))
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        result = globals()[f"stage_{args._stage}"](args.work, args)
        (args.work / f".stage.{args._stage}.json").write_text(json.dumps(result, default=str))
        return

    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("machine", {"cpus": os.cpu_count(), "python": sys.version.split()[0]})
    argv = _strip(sys.argv[1:], ("--stages", "--json", "--work"))
    for stage in [s for s in args.stages.split(",") if s]:
        if stage not in STAGES:
            sys.exit(f"unknown stage '{stage}'; use {', '.join(STAGES)}")
        print(f"== {stage}", flush=True)
        results[stage] = run_stage(stage, args.work, argv)
        results["summary"] = summarize(results)
        results_path.write_text(json.dumps(results, indent=1, default=str))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        print(json.dumps(results[stage], default=str)[:2000], flush=True)
    print(table(results))


def _strip(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the driver-only options (and their values)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
