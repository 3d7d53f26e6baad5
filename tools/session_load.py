"""ONNX Runtime session load time and peak memory with its buffer-reuse planner on and off (issue 25).

onnxopt's sessions turn `enable_mem_reuse` off (onnxopt/ort.py): the planner's cost grows with tensors x free
buffers, and a quantized graph has many of both. This measures what that costs and saves, each case in its own
process (peak RSS is the child's ru_maxrss), at ORT_DISABLE_ALL as onnxopt runs:

    python tools/session_load.py unet.onnx unet.fp8.onnx --data calib.npz [--provider cuda] [--runs 2] [--json out.json]

Feeds: the first sample of each input in --data (float inputs cast to the session's type; --shape NAME:AxBx..
replaces one input by seeded normal values of that shape). Outputs of the two settings are compared bit for bit.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np, onnxruntime as ort
path, reuse, data, provider, runs, shapes = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6])
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
so.log_severity_level = 4
so.enable_mem_reuse = reuse
prov = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
t = time.perf_counter()
s = ort.InferenceSession(path, so, providers=prov)
load = time.perf_counter() - t
d = dict(np.load(data)) if data else {}
feed = {}
for i in s.get_inputs():
    if i.name in shapes:
        a = np.random.default_rng(0).standard_normal(shapes[i.name]).astype(np.float32)
    else:
        a = d[i.name][0]
    if "float16" in i.type:
        a = a.astype(np.float16)
    elif i.type == "tensor(float)":
        a = a.astype(np.float32)
    feed[i.name] = a
t = time.perf_counter()
for _ in range(runs):
    out = s.run(None, feed)
run = (time.perf_counter() - t) / max(runs, 1)
np.save(sys.argv[7], out[0])
print(json.dumps({"load_s": load, "run_s": run, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(model: str, reuse: bool, args, shapes: dict, out_npy: str) -> dict:
    """One child process: session load, `--runs` forwards, peak RSS."""
    got = subprocess.run([sys.executable, "-c", CHILD, model, "1" if reuse else "0", args.data or "", args.provider,
                          str(args.runs), json.dumps(shapes), out_npy], capture_output=True, text=True, timeout=args.timeout)
    if got.returncode != 0:
        return {"error": (got.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(got.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", help=".npz of inputs (first sample of each is fed)")
    ap.add_argument("--shape", action="append", default=[], help="NAME:AxBx... seeded normal input of that shape")
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    shapes = {s.split(":")[0]: [int(x) for x in s.split(":")[1].split("x")] for s in args.shape}
    import numpy as np
    import tempfile
    rows = []
    print(f"{'model':40s} {'reuse':>5s} {'load s':>8s} {'run s':>8s} {'peak MB':>8s}  same outputs")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            res = {}
            for reuse in (True, False):
                res[reuse] = measure(model, reuse, args, shapes, f"{tmp}/{int(reuse)}.npy")
            same = all("error" not in r for r in res.values()) and bool(
                np.array_equal(np.load(f"{tmp}/1.npy"), np.load(f"{tmp}/0.npy"), equal_nan=True))
            for reuse, r in res.items():
                row = {"model": model, "mem_reuse": reuse, "provider": args.provider, **r, "same_outputs": same}
                rows.append(row)
                if "error" in r:
                    print(f"{model[-40:]:40s} {str(reuse):>5s} error: {r['error']}")
                else:
                    print(f"{model[-40:]:40s} {str(reuse):>5s} {r['load_s']:8.2f} {r['run_s']:8.2f} "
                          f"{r['peak_rss_mb']:8.0f}  {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
