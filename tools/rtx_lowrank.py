"""What the low-rank branch costs in a TensorRT-RTX engine (CPU build; placement and layer counts, never speed).

    python tools/rtx_lowrank.py A.onnx B.onnx [--shapes noisy:1x1x128x128 ...] [--json out.json]

For each model: kernels in the engine (compute and elementwise), quantized layers in quantized kernels, and
where the branch's nodes went: kernels holding only branch layers (extra kernels) and branch Adds fused into
the quantized GEMM's kernel.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from onnxopt import modelfile
from onnxopt.rewrite import lowrank
from onnxopt.errors import OnnxoptError
from onnxopt.trt import rtx
from onnxopt.trt import report as R
from onnxopt.trt.build import BuildConfig, parse_profiles


def summarize(path: Path, shapes: tuple) -> dict:
    cfg = BuildConfig(profiles=parse_profiles(shapes)) if shapes else None
    with tempfile.TemporaryDirectory() as d:
        res = rtx.build(path, Path(d) / "m.plan", config=cfg)
    log = R.parse_log(res.log)
    rep = R.engine_report(modelfile.load(path), log, res.engine_bytes, res.dropped)
    branch = {n.name for n in modelfile.import_graph(modelfile.load(path)).nodes if lowrank.is_branch(n)}
    only_branch = [k for k in log.kernels if k.layers and set(k.layers) <= branch]
    mixed = [k for k in log.kernels if set(k.layers) & branch and not set(k.layers) <= branch]
    return {"model": str(path), "kernels": len(log.kernels), "compute_kernels": sum(k.computes for k in log.kernels),
            "by_precision": dict(Counter(k.precision for k in log.kernels if k.computes)),
            "quantized_layers": rep["quantized_layers"], "quantized_in_quantized_kernels": rep["quantized_in_quantized_kernels"],
            "engine_bytes": res.engine_bytes, "weights_memory": log.weights_memory, "branch_nodes": len(branch),
            "branch_only_kernels": len(only_branch), "branch_only_compute": sum(k.computes for k in only_branch),
            "kernels_mixing_branch_and_main": len(mixed),
            "examples": [{"kernel": k.name, "type": k.type, "precision": k.precision, "layers": k.layers[:6]}
                         for k in (mixed[:4] + only_branch[:4])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--shapes", action="append", default=[])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    for m in a.models:
        try:
            rows.append(summarize(m, a.shapes))
        except OnnxoptError as e:  # one model failing to build still leaves the others' rows
            rows.append({"model": str(m), "error": str(e)[:300], "examples": []})
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "examples"}))
        for e in r["examples"]:
            print("   ", e)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
