"""Issue 25's GPU benchmark: whole-process wall time and peak memory of onnxopt's heavy commands on an
exported full-size SDXL UNet, for one or two onnxopt source trees (old vs new) in the same session.

    python tools/bench_speed.py --model /root/sdxl/unet.onnx --calib /root/sdxl/calib.npz \
        --heldout /root/sdxl/heldout.npz --tree old=/root/old --tree new=$PWD --provider cuda \
        --jobs fp8,int8,fp16,auto,compare --work /root/speed --json speed.json

Jobs (each one child process `python -m onnxopt ...` with PYTHONPATH set to the tree; nothing else changes):
  fp8      quantize --fp8 --preset sdxl          int8    quantize --int8 --preset sdxl
  nvfp4    quantize --nvfp4 --preset sdxl
  fp16     convert --fp16                        auto    quantize --auto --formats fp8,int8 --target-cosine 0.998
  compare  compare MODEL <fp8 output of the same tree> --data HELDOUT (3 samples)
Each child gets `--timeout` seconds (then it is killed and recorded as a timeout), so a session with a
10-minute call limit can run the jobs over several calls: results accumulate in WORK/results.json (keyed by
tree and job; --rerun to measure again) and every call prints the whole table. Jobs of the two trees run
interleaved (old fp8, new fp8, old int8, ...) so both see the same page cache; `--warm` first reads the model's
data file once. Peak RSS is the child's ru_maxrss (os.wait4); GPU memory is the peak of nvidia-smi's
memory.used over the run minus the value before it (sampled every 0.5 s; absent without nvidia-smi).
`--hash` also records a SHA-256 of each quantize/convert output (graph + data file), to show the uniform
modes wrote byte-identical models across trees. Each quantize job writes its --report; the table shows the
report's timings_s breakdown where the tree writes one.

Export (needs diffusers + torch; the GPU machine lacks diffusers, so carry its wheel in .whl/):
    python tools/bench_sdxl.py --work /root/sdxl --stages export,calib --size 1024 --held-out 3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

JOBS = ("fp8", "int8", "nvfp4", "fp16", "auto", "compare")


def job_argv(job: str, model: Path, out: Path, args) -> list[str]:
    """The onnxopt command line of one job (outputs under `out`)."""
    prov = ["--provider", args.provider]
    calib = ["--calib", str(args.calib)]
    if job in ("fp8", "int8", "nvfp4"):
        return ["quantize", str(model), f"--{job}", "--preset", "sdxl", *calib, *prov,
                "-o", str(out / f"unet.{job}.onnx"), "--report", str(out / f"report.{job}.json")]
    if job == "fp16":
        return ["convert", str(model), "--fp16", *prov, "-o", str(out / "unet.fp16.onnx"),
                "--report", str(out / "report.fp16.json")]
    if job == "auto":
        # no --preset: --auto chooses each layer's format and refuses a preset
        return ["quantize", str(model), "--auto", "--formats", args.auto_formats, "--target-cosine", str(args.target_cosine),
                *calib, *prov, "--memory-budget", str(args.memory_budget),
                "-o", str(out / "unet.auto.onnx"), "--report", str(out / "report.auto.json")]
    if job == "compare":
        return ["compare", str(model), str(out / "unet.fp8.onnx"), "--data", str(args.heldout), *prov,
                "--report", str(out / "report.compare.json")]
    raise ValueError(job)


class GpuPeak(threading.Thread):
    """Peak nvidia-smi memory.used (MiB, summed over GPUs) while running."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.base = self.read()
        self.peak = self.base

    @staticmethod
    def read() -> int | None:
        if not shutil.which("nvidia-smi"):
            return None
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10)
            return sum(int(x) for x in r.stdout.split())
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def run(self):
        while self.base is not None and not self.stop.wait(0.5):
            v = self.read()
            if v is not None:
                self.peak = max(self.peak, v)


def run_job(tree: Path, argv: list[str], timeout: float, log: Path) -> dict:
    """One child process: wall time, peak RSS (ru_maxrss), peak GPU memory, exit status."""
    # the tree first; the rest of PYTHONPATH stays (carried wheels such as onnx-graphsurgeon in .site/)
    rest = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": str(tree) + (os.pathsep + rest if rest else ""), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "onnxopt", "-v", *argv]
    check = subprocess.run([sys.executable, "-c", "import onnxopt; print(onnxopt.__file__)"], env=env, cwd=tree,
                           capture_output=True, text=True)
    if not check.stdout.startswith(str(tree)):
        return {"wall_s": 0.0, "peak_rss_gib": 0.0, "exit": f"onnxopt not from {tree}: {check.stdout.strip() or check.stderr[-200:]}"}
    gpu = GpuPeak()
    gpu.start()
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        # cwd = the tree: `python -m` puts the working directory before PYTHONPATH on sys.path
        proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t
    gpu.stop.set()
    gpu.join()
    res = {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
           "exit": "timeout" if timed_out else os.waitstatus_to_exitcode(status)}
    if gpu.base is not None:
        res["peak_gpu_gib"] = round((gpu.peak - gpu.base) / 1024, 2)
    return res


def file_hash(model: Path) -> str:
    """SHA-256 of a model file and its external data file (1 MiB reads)."""
    h = hashlib.sha256()
    for p in (model, model.parent / (model.name + ".data")):
        if p.exists():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()[:16]


def report_extras(out: Path, job: str) -> dict:
    """The timing breakdown and fidelity of a job, from the report it wrote (where the tree writes them)."""
    p = out / f"report.{job}.json"
    if not p.exists():
        return {}
    try:
        r = json.loads(p.read_text())
    except ValueError:
        return {}
    extra = {}
    for key in ("breakdown_s", "timings_s"):  # the phase breakdown where the tree writes one, else per pass
        if isinstance(r.get(key), dict):
            extra[key] = {k: round(float(v), 1) for k, v in r[key].items() if isinstance(v, (int, float))}
    for key in ("cosine", "verify", "auto"):
        if key in r and not isinstance(r[key], (dict, list)):
            extra[key] = r[key]
    if job == "compare":  # {output: {cosine, ...}}
        for v in r.values() if isinstance(r, dict) else ():
            if isinstance(v, dict) and "cosine" in v:
                extra["cosine"] = v["cosine"]
                break
    return extra


def table(results: dict, trees: list[str], jobs: list[str]) -> str:
    rows = [f"{'job':8} " + " ".join(f"{t + ' s':>10} {t + ' GiB':>9} {'GPU':>6}" for t in trees) + "  breakdown (last tree)"]
    for job in jobs:
        cells, brk = [], ""
        for t in trees:
            r = results.get(t, {}).get(job)
            if r is None:
                cells.append(f"{'-':>10} {'-':>9} {'-':>6}")
                continue
            wall = f"{r['wall_s']:.1f}" if r["exit"] == 0 else f"{r['exit']}"
            cells.append(f"{wall:>10} {r['peak_rss_gib']:>9.2f} {r.get('peak_gpu_gib', '-')!s:>6}")
            t = r.get("breakdown_s") or r.get("timings_s")
            if t:
                brk = " ".join(f"{k}={v}" for k, v in t.items() if v)
        rows.append(f"{job:8} " + " ".join(cells) + "  " + brk)
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Exported FP32 SDXL UNet (unet.onnx + unet.onnx.data).")
    ap.add_argument("--calib", type=Path, required=True, help="Calibration .npz (bench_sdxl's calib stage: 8 samples).")
    ap.add_argument("--heldout", type=Path, help="Held-out .npz for compare (3 samples).")
    ap.add_argument("--tree", action="append", required=True,
                    help="NAME=PATH of an onnxopt source tree (repeat: old=..., new=...).")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"Comma-separated, from {','.join(JOBS)}.")
    ap.add_argument("--provider", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--work", type=Path, default=Path("/root/speed"), help="Outputs, logs and results.json.")
    ap.add_argument("--timeout", type=float, default=540, help="Seconds per job before it is killed.")
    ap.add_argument("--budget", type=float, default=0, help="Stop starting jobs after this many seconds (0: none).")
    ap.add_argument("--auto-formats", default="fp8,int8")
    ap.add_argument("--target-cosine", type=float, default=0.998)
    ap.add_argument("--memory-budget", type=int, default=32000, help="--auto's --memory-budget (MB).")
    ap.add_argument("-v", "--verbose", action="store_true", help="Pass -v to each job (its log gets per-stage lines).")
    ap.add_argument("--warm", action="store_true", help="Read the model's data file once first (page cache).")
    ap.add_argument("--hash", action="store_true", help="Record a SHA-256 of each written model.")
    ap.add_argument("--keep", action="store_true", help="Keep written models (default: a job's model is deleted "
                    "once nothing later needs it, to bound disk use).")
    ap.add_argument("--rerun", action="store_true", help="Measure jobs that results.json already holds again.")
    ap.add_argument("--repeat", type=int, default=1, help="Runs of each job per tree (interleaved); the table shows "
                    "the fastest, the JSON every wall time (a shared machine's noise).")
    ap.add_argument("--json", type=Path, help="Also write all results here.")
    args = ap.parse_args()
    for k in ("model", "calib", "heldout", "work", "json"):  # the children run in each tree's folder
        if getattr(args, k) is not None:
            setattr(args, k, getattr(args, k).resolve())
    trees = {}
    for spec in args.tree:
        name, _, path = spec.partition("=")
        if not path or not (Path(path) / "onnxopt" / "__init__.py").exists():
            sys.exit(f"error: --tree {spec}: give NAME=PATH of a directory holding onnxopt/")
        trees[name] = Path(path).resolve()
    jobs = [j for j in args.jobs.split(",") if j]
    bad = [j for j in jobs if j not in JOBS]
    if bad:
        sys.exit(f"error: unknown jobs {bad}; use some of {','.join(JOBS)}")
    if "compare" in jobs and not args.heldout:
        sys.exit("error: the compare job needs --heldout")
    for p in (args.model, args.calib, args.heldout):
        if p is not None and not p.exists():
            sys.exit(f"error: {p} does not exist")
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if args.warm:
        t = time.perf_counter()
        data = args.model.parent / (args.model.name + ".data")
        with open(data if data.exists() else args.model, "rb") as f:
            while f.read(1 << 24):
                pass
        print(f"warm read {time.perf_counter() - t:.1f}s", flush=True)
    t_start = time.perf_counter()
    order = [(job, name, tree, k) for job in jobs for k in range(max(args.repeat, 1)) for name, tree in trees.items()]
    for job, name, tree, k in order:
        if True:
            done = results.get(name, {}).get(job, {})
            if done.get("exit") == 0 and not args.rerun and len(done.get("walls_s", [0])) > k:
                continue
            if args.budget and time.perf_counter() - t_start + 1 > args.budget:
                print(f"budget spent: {name} {job} not started", flush=True)
                continue
            out = args.work / name
            out.mkdir(exist_ok=True)
            if job == "compare" and not (out / "unet.fp8.onnx").exists():
                print(f"{name} compare: no {out / 'unet.fp8.onnx'} (run the fp8 job first with --keep)", flush=True)
                continue
            argv = job_argv(job, args.model, out, args) + (["-v"] if args.verbose else [])
            print(f"[{time.strftime('%H:%M:%S')}] {name} {job}: onnxopt {' '.join(argv)}", flush=True)
            r = run_job(tree, argv, args.timeout, out / f"{job}.log")
            r.update(report_extras(out, job))
            runs = results.get(name, {}).get(job, {}).get("walls_s", []) if args.repeat > 1 else []
            if r["exit"] == 0 and args.repeat > 1:
                r["walls_s"] = runs + [r["wall_s"]]
                r["wall_s"] = min(r["walls_s"])
            written = out / f"unet.{job}.onnx"
            if args.hash and written.exists() and r["exit"] == 0:
                r["sha256"] = file_hash(written)
            if written.exists() and not args.keep and not (job == "fp8" and "compare" in jobs):
                written.unlink()
                Path(str(written) + ".data").unlink(missing_ok=True)
            results.setdefault(name, {})[job] = r
            store.write_text(json.dumps(results, indent=1))
            print(f"    {json.dumps(r)}", flush=True)
            if r["exit"] != 0:
                print("    " + "".join((out / f"{job}.log").read_text().splitlines(True)[-5:]).replace("\n", "\n    "))
    print(table(results, list(trees), jobs))
    hashes = {j: {t: results.get(t, {}).get(j, {}).get("sha256") for t in trees} for j in jobs}
    same = {j: len(set(h.values())) == 1 for j, h in hashes.items() if all(h.values())}
    if same:
        print("identical outputs across trees: " + ", ".join(f"{j}={'yes' if v else 'NO'}" for j, v in same.items()))
    if args.json:
        args.json.write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "results": results,
                                         "identical": same}, indent=1))


if __name__ == "__main__":
    main()
