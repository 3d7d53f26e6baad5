"""SmoothQuant / AWQ checks that the accuracy matrix (bench_accuracy.py) does not cover:

- folding exactness on MiniLM: the smoothed (SmoothQuant auto) and AWQ-scaled FP32 graphs against the
  original, relative L2 error of the sentence embeddings (ORT_DISABLE_ALL);
- INT4 file size against the FP16 model, for a MatMul-dominated model (an 8-layer 1024-wide MLP) and MiniLM;
- wall time of quantize() on MiniLM for INT4 RTN / AWQ-full and INT8 / INT8 + SmoothQuant auto
  (`--timing`; pin it to 2 cores with `taskset -c 0,1` and OPENBLAS_NUM_THREADS=2 for the issue's limit).

    python tools/bench_sqawq.py [--work work] [--json out.json] [--timing]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models as rm  # noqa: E402


def _embed(model, feeds) -> np.ndarray:
    from onnxopt import ort
    sess = ort.session(model, level="disable")
    names = {i.name for i in sess.get_inputs()}
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + 16] for k, v in feeds.items() if k in names})[0] for i in range(0, n, 16)])


def folding(prep) -> list[dict]:
    from onnxopt import calib, modelfile
    from onnxopt.api import prepare
    from onnxopt.passes import QDQ
    from onnxopt.quant import int4_weights
    from onnxopt.rewrite import awq, smoothquant
    with np.load(prep.eval) as z:
        feeds = {k: z[k] for k in z.files}
    rows = []
    for name in ("smoothquant-auto", "awq-full"):
        mode = "int8" if name.startswith("smooth") else "int4"
        m = prepare(str(prep.model), mode)
        ref = _embed(m, feeds)
        graph = modelfile.import_graph(m)
        data = calib.CalibData.from_path(prep.calib, calib.input_specs(m))
        t = time.perf_counter()
        if mode == "int8":
            # the layers `quantize --int8 --smoothquant auto` smooths: the INT8 pass's plan
            rep = smoothquant.smooth(graph, data, QDQ(mode="int8").plan(graph), alpha="auto", progress=False)
            groups = rep["groups"]
        else:
            layers, _ = int4_weights.select_layers(graph)
            rep, _ = awq.apply(graph, data, layers, method="full", block_size=128, progress=False)
            groups = rep["groups"]
        wall = time.perf_counter() - t
        got = _embed(modelfile.export_graph(graph), feeds)
        err = float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64)))
        folds = [g["fold"] for g in groups if g.get("alpha") is not None]
        rows.append({"check": f"fold exactness, {name} (MiniLM FP32)", "rel_error": err, "pass": err <= 1e-5,
                     "wall_s": round(wall, 1), "scaled_activations": len(folds),
                     "folded_into_producer": sum(f.startswith("folded") for f in folds),
                     "inserted_mul": sum(f.startswith("inserted") for f in folds)})
    return rows


def _mlp(path: Path, width=1024, depth=8) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxopt import modelfile
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    modelfile.save(onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])), path)
    return path


def sizes(prep, tmp: Path) -> list[dict]:
    from onnxopt import QuantConfig, quantize
    from onnxopt.api import convert
    rows = []
    for name, src, data in (("MLP 8x1024 (MatMul only)", _mlp(tmp / "mlp.onnx"), None), ("MiniLM", prep.model, prep.calib)):
        fp16 = convert(src, tmp / "fp16.onnx")
        out = tmp / "int4.onnx"
        quantize(src, out, config=QuantConfig(mode="int4", awq="none", progress=False), data=data,
                 calib_random=None if data else 2)
        ratio = rm.file_mb(out) / rm.file_mb(fp16)
        rows.append({"check": f"INT4 (block 128) size / FP16 size, {name}", "fp16_mb": round(rm.file_mb(fp16), 2),
                     "int4_mb": round(rm.file_mb(out), 2), "ratio": round(ratio, 3),
                     "pass": ratio <= 0.30 if "MatMul" in name else None})
    return rows


def timing(prep, tmp: Path) -> list[dict]:
    from onnxopt import QuantConfig, quantize
    rows = []
    for name, cfg in (("int4 RTN", dict(mode="int4", awq="none")), ("int4 AWQ-full", dict(mode="int4", awq="full")),
                      ("int8", dict(mode="int8")), ("int8 + SmoothQuant auto", dict(mode="int8", smoothquant="auto"))):
        out = tmp / "q.onnx"
        t = time.perf_counter()
        res = quantize(prep.model, out, config=QuantConfig(progress=False, **cfg), data=prep.calib)
        wall = time.perf_counter() - t
        cos = rm.evaluate("minilm", prep.model, out, prep.eval)["value"]
        rows.append({"check": f"quantize() wall s, {name} (MiniLM)", "wall_s": round(wall, 1), "cosine": round(cos, 5),
                     "pass": wall < 120 if "AWQ" in name else None,
                     "passes_s": {k: round(v, 2) for k, v in res.report["timings_s"].items()}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(rm.DEFAULT_WORK))
    ap.add_argument("--json", default=None)
    ap.add_argument("--timing", action="store_true", help="only the wall-time rows")
    args = ap.parse_args(argv)
    prep = rm.prepare("minilm", args.work)
    with tempfile.TemporaryDirectory(prefix="bench_sqawq.") as d:
        rows = timing(prep, Path(d)) if args.timing else folding(prep) + sizes(prep, Path(d))
    print("| check | value | pass | notes |")
    print("|---|---|---|---|")
    for r in rows:
        value = r.get("rel_error", r.get("ratio", r.get("wall_s")))
        notes = {k: v for k, v in r.items() if k not in ("check", "rel_error", "ratio", "pass", "wall_s" if "wall" in r["check"] else "")}
        print(f"| {r['check']} | {value:.3g} | {r['pass']} | {notes} |")
    if args.json:
        meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
