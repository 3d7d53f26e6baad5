"""Time the denoiser FP8 recipe (onnxopt.denoiser: error-feedback rounding, SmoothQuant 1.0, --lowrank auto) against
plain FP8 and the SDXL preset on a UNet, one child process per run (wall time, peak RSS, the report's breakdown_s).
Written for the GPU machine and the full-size SDXL UNet, where the recipe is not a default (weights above
denoiser.MAX_RECIPE_BYTES) because its cost there was not measured:

    python tools/time_denoiser_defaults.py /tmp/sdxl/unet.onnx --calib /tmp/sdxl/calib.npz --provider cuda \
        --work /tmp/tdd --json tdd.json [--timeout 1800] [--runs preset,plain,recipe,feedback,smoothquant,lowrank]

Runs: preset = `--fp8 --preset sdxl` (issue 25's 25 s target), plain = `--fp8` (today's default on this model),
recipe = the three options together (what `--fp8` gives a smaller denoiser), and each option alone. Prints one JSON
line a run and a table; a run over --timeout is killed and reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
RUNS = {"preset": ["--fp8", "--preset", "sdxl"],
        "plain": ["--fp8"],
        "recipe": ["--fp8", "--weight-rounding", "feedback", "--smoothquant", "1.0", "--lowrank", "auto"],
        "feedback": ["--fp8", "--weight-rounding", "feedback"],
        "smoothquant": ["--fp8", "--smoothquant", "1.0"],
        "lowrank": ["--fp8", "--lowrank", "auto"]}


def run(name: str, model: str, calib: str, provider: str, work: Path, timeout: float) -> dict:
    """One quantize in a child process: rc, wall s, peak RSS GiB, breakdown_s and the summary line."""
    out, rep, log = work / f"{name}.onnx", work / f"{name}.json", work / f"{name}.log"
    cmd = [sys.executable, "-m", "onnxopt", "quantize", model, *RUNS[name], "--calib", calib, "--provider", provider,
           "-o", str(out), "--report", str(rep)]
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, start_new_session=True)
        deadline = t + timeout
        while True:  # bounded by --timeout
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    wall = time.perf_counter() - t
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    r = json.loads(rep.read_text()) if rep.is_file() else {}
    for p in (out, out.with_name(out.name + ".data")):
        p.unlink(missing_ok=True)  # full-size outputs are GBs: keep the disk free
    return {"run": name, "args": " ".join(RUNS[name]), "rc": os.waitstatus_to_exitcode(status),
            "timed_out": wall > timeout, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "breakdown_s": r.get("breakdown_s"), "denoiser": r.get("denoiser"), "last": lines[-1][:400] if lines else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--work", default="/tmp/tdd")
    ap.add_argument("--runs", default="preset,plain,recipe,feedback,smoothquant,lowrank")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.runs.split(","):
        row = run(name.strip(), a.model, a.calib, a.provider, work, a.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'run':<12}{'rc':>4}{'wall s':>9}{'RSS GiB':>9}  breakdown")
    for r in rows:
        print(f"{r['run']:<12}{r['rc']:>4}{r['wall_s']:>9}{r['peak_rss_gib']:>9}  {r['breakdown_s']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
