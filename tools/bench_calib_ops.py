"""Issue 25: what each calibration statistic costs in ONNX Runtime, per provider, and whether the CUDA forms give
the host's numbers. A synthetic graph of T activations of n elements each (y_i = x * c_i, c_i spread over
three decades so ranges grow across batches) runs through `calib.collect` once per statistic:

  absmax        in-graph ReduceMax (what --fp8's max calibration costs; the floor)
  topk-unsorted TopAbs as the CPU runs it (ORT's CUDA TopK: one thread block per flattened tensor)
  topk-sorted   TopAbs as CUDA now runs it (sorted, K > 4096: cub's device-wide radix sort)
  hist-graph    Histogram binned in the graph (ScatterElements add, float64 counts)
  hist-host     Histogram on whole tensors fetched to the host (numpy bincount)

and checks: hist-graph counts == hist-host counts (bit for bit), topk-sorted value == topk-unsorted value.

    python tools/bench_calib_ops.py --provider cuda --sizes 1310720,5242880,20971520 --tensors 8 --batches 4
    python tools/bench_calib_ops.py --provider cpu --sizes 1000000 --tensors 4 --batches 2      (dev box)

Prints one row per (size, statistic): seconds for all batches (session creation excluded: it is timed apart)
and per element; `--json` writes them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxopt import calib  # noqa: E402

STATS = ("absmax", "topk-unsorted", "topk-sorted", "hist-graph", "hist-host")


def model(n: int, tensors: int):
    """x[n] -> y_i = x * c_i (i < tensors): `tensors` activations of n elements, each a node output."""
    scales = np.geomspace(1.0, 1000.0, tensors).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", f"c{i}"], [f"y{i}"]) for i in range(tensors)]
    inits = [helper.make_tensor(f"c{i}", TensorProto.FLOAT, [], [float(s)]) for i, s in enumerate(scales)]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [n]) for i in range(tensors)]
    g = helper.make_graph(nodes, "calib_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def reducer(stat: str):
    if stat == "absmax":
        return calib.AbsMax()
    if stat.startswith("topk"):
        return calib.TopAbs(99.99, device_sort=stat == "topk-sorted")
    return calib.Histogram(in_graph=stat == "hist-graph")


def data(path: Path, n: int, batches: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batches, n)).astype(np.float32)
    hit = rng.random((batches, n)) < 3e-4
    x[hit] *= rng.uniform(20, 60, hit.sum()).astype(np.float32)
    x *= np.geomspace(0.1, 10.0, batches).astype(np.float32)[:, None]  # later batches grow the ranges
    np.savez(path, x=x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--sizes", default="1310720,5242880,20971520", help="Elements per activation (comma-separated).")
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--stats", default=",".join(STATS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_calib_ops"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True
    print(f"{'elements':>10} {'statistic':>14} {'seconds':>9} {'ns/elem':>8}", flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        path = args.work / f"x{n}_{args.batches}.npz"
        if not path.exists():
            data(path, n, args.batches)
        m = model(n, args.tensors)
        cd = calib.CalibData.from_path(path, calib.input_specs(m))
        got = {}
        for stat in args.stats.split(","):
            red = {f"y{i}": [reducer(stat)] for i in range(args.tensors)}
            calib.collect(m, cd, {"y0": [reducer(stat)]}, provider=args.provider, progress=False)  # warm-up
            t = time.perf_counter()
            calib.collect(m, cd, red, provider=args.provider, progress=False)
            s = time.perf_counter() - t
            got[stat] = red
            per = s / (n * args.tensors * args.batches) * 1e9
            rows.append({"elements": n, "statistic": stat, "seconds": s, "ns_per_element": per,
                         "provider": args.provider})
            print(f"{n:>10} {stat:>14} {s:>9.3f} {per:>8.2f}", flush=True)
        if "hist-graph" in got and "hist-host" in got:
            same = all(np.array_equal(got["hist-graph"][k][0].counts, got["hist-host"][k][0].counts)
                       and got["hist-graph"][k][0].range == got["hist-host"][k][0].range for k in got["hist-host"])
            ok &= same
            print(f"{n:>10} hist-graph == hist-host (counts, range): {same}", flush=True)
        if "topk-sorted" in got and "topk-unsorted" in got:
            same = all(got["topk-sorted"][k][0].value == got["topk-unsorted"][k][0].value for k in got["topk-sorted"])
            ok &= same
            print(f"{n:>10} topk-sorted == topk-unsorted (99.99th percentile): {same}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "exact": ok}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
