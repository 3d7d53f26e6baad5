"""The write phase alone (and SmoothQuant's fold), without calibration: where `--fp8`/`--int8`'s write time goes and
what the writer's in-flight byte cap costs. Activation ranges are 1.0 and bias-correction means 1.0 (the numbers do
not change the work); the fold uses seeded positive per-channel scales on every planned layer.

    python tools/bench_write.py MODEL --mode fp8 [--threads 16] [--in-flight-mb 512,1024,2048] [--fold] [--profile p.prof]

Prints and writes (--json) per in-flight cap: write seconds, the fold's seconds, peak RSS (whole process, so run one
cap per process for RSS: --in-flight-mb takes a list for speed) and a SHA-256 of every quantized weight's codes and
scales in graph order (the same at any cap and thread count). On the GPU machine (lead, 16 cores, full-size SDXL):

    for c in 512 1024 2048; do python3 tools/bench_write.py /root/sdxl/unet.onnx --mode fp8 --in-flight-mb $c --json $OUT/w_fp8_$c.json; done
    python3 tools/bench_write.py /root/sdxl/unet.onnx --mode int8 --fold --json $OUT/w_int8.json
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(args, work: Path, cap_mb: int) -> dict:
    import numpy as np
    import onnx_graphsurgeon as gs
    from onnxopt import modelfile, pipeline, presets
    try:
        from onnxopt.rewrite import fold
    except ImportError:  # a tree before the layout move
        from onnxopt import fold
    from onnxopt import graph as G
    from onnxopt.passes import QDQ
    from onnxopt.quant import rules, writer
    model = pipeline.load(str(args.model), 13, work)
    graph = modelfile.import_graph(model)
    del model
    opts = QDQ(mode=args.mode, exclude=presets.SDXL_EXCLUDE, quantize_mha=args.mode == "fp8")
    plan = rules.plan(graph, opts)
    out = {"mode": args.mode, "in_flight_mb": cap_mb, "layers": len(plan.nodes), "threads": args.threads}
    if args.fold:
        rng = np.random.default_rng(0)
        layers = [n for n in plan.nodes if n.op in fold.CONSUMER_OPS and _has_weight(n)]
        t = time.perf_counter()
        ahead = getattr(fold, "input_channel_absmax_ahead", None)
        maxes = ahead([[n] for n in layers]) if ahead else ([fold.input_channel_absmax(n)] for n in layers)
        taken = G.taken_names(graph)
        for n, (w_max,) in zip(layers, maxes):
            s = np.sqrt(np.maximum(w_max, 1e-6)) * rng.uniform(0.5, 2.0, w_max.shape)
            fold.fold_input_scale(graph, [n], s / s.mean(), taken=taken)
        graph.cleanup().toposort()
        out["fold_s"] = round(time.perf_counter() - t, 2)
        plan = rules.plan(graph, opts)
    amax = {t: 1.0 for t in plan.activations}
    means = {n.inputs[0].name: np.ones(_in_channels(n), np.float64) for n in plan.nodes
             if n.op in ("Conv", "ConvTranspose", "Gemm") and _has_weight(n)}
    qplan = writer.QuantPlan.uniform(args.mode, plan, amax, means)
    t = time.perf_counter()
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    layers = writer.write(graph, qplan, high_precision="fp16", threads=args.threads, in_flight_bytes=cap_mb << 20)
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
    out["write_s"] = round(time.perf_counter() - t, 2)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    h = hashlib.sha256()
    def byte_codes(t) -> bool:  # INT8 codes (numpy int8) or FP8 ones (graphsurgeon keeps an ONNX type number)
        return isinstance(t, gs.Constant) and t.dtype is not None and (
            isinstance(t.dtype, int) or np.dtype(t.dtype).itemsize == 1)
    for c in sorted((t for t in graph.tensors().values() if byte_codes(t)), key=lambda c: c.name):
        h.update(c.name.encode() + np.ascontiguousarray(G.read_values(c)).tobytes())
    for name in sorted(layers):
        h.update(repr(sorted((k, str(v)) for k, v in layers[name].items())).encode())
    out["sha256"] = h.hexdigest()[:16]
    return out


def _has_weight(n) -> bool:
    import onnx_graphsurgeon as gs
    from onnxopt.graph import weight_of
    return len(n.inputs) > 1 and isinstance(weight_of(n.inputs[1])[0], gs.Constant)


def _in_channels(n) -> int:
    try:
        from onnxopt.rewrite import fold
    except ImportError:
        from onnxopt import fold
    shape = fold.effective_shape(n)
    if n.op == "Conv":
        return int(shape[1]) * int(n.attrs.get("group", 1))
    if n.op == "ConvTranspose":
        return int(shape[0])
    return int(shape[1] if n.attrs.get("transB", 0) else shape[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--mode", default="fp8", choices=("fp8", "int8"))
    ap.add_argument("--threads", type=int, default=0, help="0: one per core (at most 16), as the CLI")
    ap.add_argument("--in-flight-mb", default="512", help="comma-separated caps (MB), each a fresh load and write")
    ap.add_argument("--fold", action="store_true", help="first fold seeded SmoothQuant-like scales into every layer")
    ap.add_argument("--profile", type=Path, help="cProfile of the write (main thread)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from onnxopt import modelfile
    rows = []
    for cap in [int(c) for c in args.in_flight_mb.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-write-") as d, modelfile.spilling(d):
            rows.append(run(args, Path(d), cap))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
