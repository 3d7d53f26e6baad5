"""Calibration memory is bounded: peak RSS of `onnxopt.quantize` (FP8, max calibration) does not grow with
the number of calibration samples, and on a large model stays near the cost of holding the model plus
running it in ONNX Runtime.

    python tools/bench_memory.py [--cases samples,large,sparsegpt] [--large-gb 1.0] [--json out.json]

Cases (each run in its own subprocess, peak RSS = VmHWM of that process):
- samples: EfficientNet-Lite0 quantized with 16 and with 256 calibration images (chunked .npz directory,
  16 images per file, so the input data is streamed as well).
- sparsegpt: MiniLM (real weights, exported by real_models.py under --work, or `--minilm DIR` with model.onnx, calib.npz)
  pruned 2:4 by magnitude and by SparseGPT (`api.sparsify_model`): peak RSS of each.
- large: a generated ~1 GB FP32 model (a stack of 4096x4096 MatMul+Relu layers, external data) quantized
  to FP8, against a bound of 2 x model size + the peak RSS of an ORT inference session of the FP32 model
  measured alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models as rm  # noqa: E402

HIDDEN = 4096
TOKENS = 64


# ---------------------------------------------------------------- data / models
def chunked_crops(dst: Path, n: int, per_file: int = 16) -> Path:
    """`n` EfficientNet crops as a directory of .npz files of `per_file` samples each."""
    marker = dst / f"n{n}.done"
    if marker.is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in dst.glob("*.npz"):
        f.unlink()
    for i in range(0, n, per_file):
        x = rm.image_crops(min(per_file, n - i), seed=100 + i, scale=(0.4, 1.0), flip_p=0.5)
        np.savez(dst / f"chunk{i // per_file:04d}.npz", input=x)
    marker.write_text("")
    return dst


def large_model(path: Path, gb: float) -> Path:
    """A stack of [TOKENS, HIDDEN] x [HIDDEN, HIDDEN] MatMul + Relu layers totalling ~`gb` GB of FP32
    weights, written layer by layer straight to the external data file."""
    import onnx
    from onnx import TensorProto, helper

    from onnxopt import modelfile as oio

    layers = max(1, int(round(gb * 2**30 / (HIDDEN * HIDDEN * 4))))
    if path.is_file() and path.with_name(path.name + ".data").is_file():
        m = onnx.load(str(path), load_external_data=False)
        if sum(1 for n in m.graph.node if n.op_type == "MatMul") == layers:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    x = "x"
    with open(path.parent / data_name, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) * (1.4 / np.sqrt(HIDDEN))).astype(np.float32)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[HIDDEN, HIDDEN])
            offset = f.tell()
            f.write(w.tobytes())
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=k, value=v)
            t.data_location = TensorProto.EXTERNAL
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"layer{i}/MatMul"))
            y = "y" if i == layers - 1 else f"h{i}"
            nodes.append(helper.make_node("Relu", [f"mm{i}"], [y], name=f"layer{i}/Relu") if i < layers - 1
                         else helper.make_node("Identity", [f"mm{i}"], [y], name=f"layer{i}/Out"))
            x = y
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TOKENS, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    oio.stamp_ir_version(model)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def large_calib(path: Path, n: int = 8) -> Path:
    if not path.is_file():
        rng = np.random.default_rng(1)
        np.savez(path, x=rng.standard_normal((n, TOKENS, HIDDEN), dtype=np.float32))
    return path


# ---------------------------------------------------------------- workers (subprocess)
def _work(spec: dict) -> dict:
    t = time.perf_counter()
    if spec["kind"] == "quantize":
        from onnxopt import QuantConfig, quantize
        quantize(spec["model"], spec["out"], config=QuantConfig(mode="fp8", calib_method="max", progress=False),
                 data=spec["data"])
    elif spec["kind"] == "sparsify":
        from onnxopt import api
        api.sparsify_model(spec["model"], spec["out"], data=spec["data"], method=spec["method"], progress=False)
    else:  # ORT inference of the model alone, one batch
        from onnxopt import modelfile as oio
        from onnxopt import ort as oort
        sess = oort.session(oio.load(spec["model"]), level=spec.get("level", "disable"))
        with np.load(spec["data"]) as z:
            feed = {k: z[k][:1] for k in z.files}
        sess.run(None, feed)
    return {"wall_s": time.perf_counter() - t}


def worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    base = rm.peak_rss_mb()
    try:
        out = {"status": "ok", **_work(spec)}
    except BaseException as e:
        out = {"status": "error", "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    out.update(peak_rss_mb=rm.peak_rss_mb(), start_rss_mb=base)
    print("@@RESULT " + json.dumps(out), flush=True)
    return 0


def run(spec: dict, timeout: int) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": str(rm.ROOT)})
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            res = json.loads(line[len("@@RESULT "):])
            res["process_wall_s"] = time.perf_counter() - t
            return res
    return {"status": "error", "error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="samples,large")
    ap.add_argument("--samples", default="16,256", help="calibration sample counts for the 'samples' case")
    ap.add_argument("--large-gb", type=float, default=1.0)
    ap.add_argument("--work", default=str(rm.DEFAULT_WORK))
    ap.add_argument("--minilm", default=None, help="directory with MiniLM model.onnx and calib.npz (default: export it)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args(argv)
    work = Path(args.work) / "memory"
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = args.cases.split(",")
    if "samples" in cases:
        prep = rm.prepare("effnet", args.work)
        for n in (int(s) for s in args.samples.split(",")):
            data = chunked_crops(work / f"effnet_calib_{n}", n)
            print(f"[effnet fp8, {n} samples] ...", file=sys.stderr, flush=True)
            res = run({"kind": "quantize", "model": str(prep.model), "data": str(data),
                       "out": str(runs / f"effnet_fp8_{n}.onnx")}, args.timeout)
            rows.append({"case": f"effnet FP8 calib, {n} samples", "samples": n, "model_mb": rm.file_mb(prep.model), **res})
    if "sparsegpt" in cases:
        d = Path(args.minilm) if args.minilm else rm.prepare("minilm", args.work).model.parent
        for method in ("magnitude", "sparsegpt"):
            print(f"[minilm 2:4 {method}] ...", file=sys.stderr, flush=True)
            res = run({"kind": "sparsify", "method": method, "model": str(d / "model.onnx"), "data": str(d / "calib.npz"),
                       "out": str(runs / f"minilm_{method}.onnx")}, args.timeout)
            rows.append({"case": f"MiniLM 2:4 {method}", "samples": 64, "model_mb": rm.file_mb(d / "model.onnx"), **res})
    if "large" in cases:
        model = large_model(work / "large" / "model.onnx", args.large_gb)
        data = large_calib(work / "large" / "calib.npz")
        mb = rm.file_mb(model)
        print(f"[large {mb:.0f} MB: ORT inference alone] ...", file=sys.stderr, flush=True)
        inf = run({"kind": "infer", "model": str(model), "data": str(data)}, args.timeout)
        rows.append({"case": "large FP32: ORT inference alone (1 batch)", "samples": 1, "model_mb": mb, **inf})
        print(f"[large {mb:.0f} MB: FP8 quantize] ...", file=sys.stderr, flush=True)
        res = run({"kind": "quantize", "model": str(model), "data": str(data), "out": str(runs / "large_fp8.onnx")}, args.timeout)
        bound = 2 * mb + inf["peak_rss_mb"] if inf.get("status") == "ok" else None
        rows.append({"case": "large FP32 -> FP8 quantize", "samples": 8, "model_mb": mb, "bound_mb": bound,
                     "within_bound": (res["peak_rss_mb"] <= bound) if bound and res.get("status") == "ok" else None, **res})
    print(table(rows))
    if args.json:
        meta = {"machine": f"{platform.node()} {os.cpu_count()} cpus",
                "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


def table(rows: list[dict]) -> str:
    out = ["| case | model MB | peak RSS MB | start RSS MB | wall s | bound MB (2x model + ORT) | within |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['case']} | {r['model_mb']:.0f} | {r.get('status')}: {r.get('error', '')[:80]} | | | | |")
            continue
        bound = f"{r['bound_mb']:.0f}" if r.get("bound_mb") else "-"
        within = {True: "yes", False: "NO", None: "-"}[r.get("within_bound")]
        out.append(f"| {r['case']} | {r['model_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['start_rss_mb']:.0f} | "
                   f"{r['wall_s']:.1f} | {bound} | {within} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
