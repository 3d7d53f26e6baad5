"""Where calibration's host memory and time go on the GPU machine (issue 25, int8fast): one child process per
variant runs calib.collect over the full model with one in-graph reducer (the session set-ups and forwards of a
calibration pass, nothing else), sampling the process's RSS (anonymous vs file-backed) every 50 ms.

    python3 tools/calib_sessions.py /root/sdxl/unet.onnx /root/sdxl/calib.npz --provider cuda --json $OUT/cs.json

Variants AHEADxSTAGES: sessions built ahead on threads (calib.collect's `prefetch`; 0 = one session at a time) x
stages (3: the 4096 MB host budget's count, today's default on CUDA; 1: one session for the whole model, which
the default would become if its host RSS allows). 0x3 is the default calibration. Before them,
one child reports the RSS of the libraries alone: after `import onnxruntime, onnxopt`, after a one-node CUDA
session, after a Conv and a MatMul ran on CUDA (cuDNN and cuBLAS loaded); another times the whole model's session
set-up with ORT loading its own weights and twice inside `ort.device_weights` (the second session should find every
weight on the device; "sharing failed": ORT refused the DLPack views). Prints one row per variant: wall, peak RSS
(ru_maxrss) and RssAnon / RssFile at the sampled peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 2**20
    return out


class Sampler:
    """RSS every 50 ms on a thread; `peak` is the sample with the highest VmRSS."""

    def __init__(self):
        self.peak = {"VmRSS": 0.0}
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            s = _status()
            if s.get("VmRSS", 0) > self.peak["VmRSS"]:
                self.peak = s
            time.sleep(0.05)

    def close(self) -> dict:
        self.stop = True
        self.t.join()
        return {k: round(v, 3) for k, v in self.peak.items()}


def child_libraries(args) -> dict:
    rows = {}
    import numpy as np
    import onnx
    from onnx import helper
    import onnxruntime  # noqa: F401
    import onnxopt  # noqa: F401
    from onnxopt import ort as ortx
    rows["imports"] = _status()
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", 1, [1])], [helper.make_tensor_value_info("y", 1, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = ortx.session(m, provider=args.provider)
    s.run(None, {"x": np.ones(1, np.float32)})
    rows["cuda session"] = _status()
    w = onnx.numpy_helper.from_array(np.random.rand(64, 64, 3, 3).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(np.random.rand(64, 64).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("MatMul", ["c", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", 1, [1, 64, 64, 64])],
                          [helper.make_tensor_value_info("y", 1, None)], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = ortx.session(m, provider=args.provider, level="basic", lean=True)
    s.run(None, {"x": np.random.rand(1, 64, 64, 64).astype(np.float32)})
    rows["conv + matmul ran"] = _status()
    return {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in rows.items()}


def child_sharing(args) -> dict:
    """Session set-up of the whole model: ORT loading its own weights vs `ort.device_weights` (first session reads
    and copies on threads, the second finds them on the device)."""
    from onnxopt import modelfile
    from onnxopt import ort as ortx
    model = modelfile.load(args.model)
    out = {}
    t = time.perf_counter()
    s = ortx.session(model, provider=args.provider, level="basic", lean=True)
    out["own weights: session s"] = round(time.perf_counter() - t, 2)
    del s
    with ortx.device_weights(args.provider) as shared:
        for k in (1, 2):
            t = time.perf_counter()
            s = ortx.session(model, provider=args.provider, level="basic", lean=True, shared=True)
            out[f"shared weights: session {k} s"] = round(time.perf_counter() - t, 2)
            del s
        out["uploads"] = shared.uploads if shared else None
        out["sharing failed"] = shared.broken if shared else None
    out.update(_status())
    return out


def child_collect(args) -> dict:
    from onnxopt import calib, modelfile
    model = modelfile.load(args.model)
    data = calib.CalibData.from_path(args.calib, calib.input_specs(model), max_batch=1, limit=max(1, args.batches // 2))
    out = next(n.output[0] for n in reversed(model.graph.node) if n.op_type == "Conv")
    sampler = Sampler()
    t0 = time.perf_counter()
    calib.collect(model, data, {out: [calib.AbsMax()]}, provider=args.provider, progress=False,
                  stages=args.stages or None, prefetch=args.ahead)
    wall = time.perf_counter() - t0
    peak = sampler.close()
    return {"wall_s": round(wall, 2), "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "peak_sample_gib": peak, "batches": len(data)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("--provider", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--batches", type=int, default=4, help="Calibration batches per variant (CFG halves: samples x 2).")
    ap.add_argument("--variants", default="0x3,1x3,2x3,0x1",
                    help="AHEADxSTAGES; STAGES 0: the default count (calib.collect.weight_budget: the host budget).")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=("libraries", "sharing", "collect"))
    ap.add_argument("--ahead", type=int, default=0)
    ap.add_argument("--stages", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"libraries": child_libraries, "sharing": child_sharing, "collect": child_collect}[args.child](args)))
        return
    results = {}
    base = [sys.executable, __file__, args.model, args.calib, "--provider", args.provider, "--batches", str(args.batches)]
    for name, extra in [("libraries", ["--child", "libraries"]), ("sharing", ["--child", "sharing"])] + [
            (v, ["--child", "collect", "--ahead", v.split("x")[0], "--stages", v.split("x")[1]])
            for v in args.variants.split(",")]:
        r = subprocess.run(base + extra, capture_output=True, text=True, env=dict(os.environ))
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        results[name] = json.loads(lines[-1]) if lines and r.returncode == 0 else {"error": r.stderr[-800:]}
        print(f"{name:10s} {json.dumps(results[name])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
