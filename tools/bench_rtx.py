"""TensorRT-RTX engine builds on the CPU: per model, build time, peak RSS, Total Weights Memory, fused attention
kernels by precision, quantized layers in quantized kernels, engine bytes. No timing of the engines: they run
only on RTX GPUs, so this is a build-and-inspect benchmark.

    python tools/bench_rtx.py unet.fp16.onnx unet.fp8.onnx --label fp16 --label fp8 \\
        --shapes sample:2x4x128x128 --shapes encoder_hidden_states:2x77x2048 --shapes text_embeds:2x1280 \\
        --shapes time_ids:2x6 --json bench_rtx.json

Each build runs `python -m onnxopt build --backend rtx` in its own subprocess (from this checkout), whose
peak RSS comes from wait4(). Models with external data are read in place. Engines go to --work (default: a
temporary folder, removed after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_one(model: Path, label: str, work: Path, shapes, targets) -> dict:
    out, rep_path = work / f"{label}.plan", work / f"{label}.json"
    cmd = [sys.executable, "-m", "onnxopt", "build", str(model), "--backend", "rtx", "-o", str(out), "--report", str(rep_path), "-q"]
    for s in shapes:
        cmd += ["--shapes", s]
    for t in targets:
        cmd += ["--compute-capability", t]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"label": label, "model": str(model), "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
           "exit_code": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
        return row
    rep = json.loads(rep_path.read_text())
    a, w = rep["attention"], rep["weights"]
    row.update(build_s=rep["build_seconds"], targets=rep["targets"], dropped_targets=rep["dropped_targets"],
               total_weights_memory=w["engine_weights_memory"], fp16_weight_bytes=w["fp16_bytes"],
               file_quantized_bytes=w["file_quantized_bytes"], engine_bytes=rep["engine_bytes"],
               attention_blocks=a["blocks"], fused_attention=a["fused_by_precision"], quantized_unfused=len(a["quantized_unfused"]),
               quantized_layers=rep["quantized_layers"], in_quantized_kernels=rep["quantized_in_quantized_kernels"],
               scale_warnings=rep["scale_warnings"], tensorrt_rtx=rep["tensorrt_rtx"])
    return row


def table(rows: list[dict]) -> str:
    head = f"| {'model':<14} | build s | peak RSS GiB | Total Weights MB | vs first | fused attention | quantized in quantized kernels | engine MB |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    base = next((r.get("total_weights_memory") for r in rows if r.get("total_weights_memory")), None)
    for r in rows:
        if r["exit_code"]:
            lines.append(f"| {r['label']:<14} | failed: {r.get('error', '')} |")
            continue
        fused = ", ".join(f"{v} {p}" for p, v in sorted(r["fused_attention"].items())) or "0"
        tw = r["total_weights_memory"] or 0
        lines.append(f"| {r['label']:<14} | {r['build_s']:>7.1f} | {r['peak_rss_gib']:>12.2f} | {tw / 1e6:>16.1f} | "
                     f"{(tw / base if base else 0):>8.3f} | {fused + ' of ' + str(r['attention_blocks']):>15} | "
                     f"{str(r['in_quantized_kernels']) + '/' + str(r['quantized_layers']):>30} | {r['engine_bytes'] / 1e6:>9.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="ONNX files (external data next to them is fine)")
    ap.add_argument("--label", action="append", default=[], help="row label per model (default: file name)")
    ap.add_argument("--shapes", action="append", default=[], help="name:1x4x128x128 or name:MIN/OPT/MAX (repeatable)")
    ap.add_argument("--compute-capability", action="append", default=[], help="target, e.g. 8.9 (default: 8.0 8.6 8.9 12.0)")
    ap.add_argument("--work", type=Path, help="keep engines and per-build reports here")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    labels = args.label + [m.name.removesuffix(".onnx") for m in args.models[len(args.label):]]
    with tempfile.TemporaryDirectory(prefix="bench-rtx-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for model, label in zip(args.models, labels):
            print(f"building {label} ({model}) ...", file=sys.stderr, flush=True)
            rows.append(build_one(model.resolve(), label, work, args.shapes, args.compute_capability))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                                         "rows": rows}, indent=1))
    return 1 if any(r["exit_code"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
