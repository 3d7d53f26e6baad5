"""`--auto`'s staged sensitivities end to end (reference, every candidate's error and gain, one verification), as the
AutoQuant pass runs them, with the session counts, phase times and peak RSS; the sensitivities are written to JSON
so that two trees (or two settings) can be compared number for number.

    python tools/auto_sens_proxy.py MODEL CALIB.npz --stages 8 [--inline] [--provider cuda] --json out.json
    python tools/auto_sens_proxy.py --same a.json b.json      # exit 1 unless every sensitivity is bit-identical

`--inline` lays the stages out as the CUDA provider does (gates as Where, no If) on any provider, so the dev box can
measure the CUDA path's session counts. Run it with PYTHONPATH at either tree (old/new) to compare them.
Full size on the GPU machine (lead):

    python3 tools/auto_sens_proxy.py /root/sdxl/unet.onnx /root/sdxl/calib.npz --provider cuda --stages 32 \
        --memory-budget 32000 --json $OUT/sens_new.json
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _t(f, *a, **k):
    t = time.perf_counter()
    out = f(*a, **k)
    return out, time.perf_counter() - t


def measure(args, work: Path) -> dict:
    from onnxopt import attention_guard, autoquant, calib, modelfile, pipeline
    from onnxopt.passes import AutoQuant
    from onnxopt.passes.autoquant import split_feeds
    if args.error_batches:  # a what-if for this measurement only (the package's constant is not changed on disk)
        autoquant.staged.ERROR_BATCHES = args.error_batches
    for flag, name in ((args.no_unified, "UNIFIED"), (args.no_suffix, "SUFFIX")):
        if flag and hasattr(autoquant.staged, name):  # what-ifs: the layout before these changes
            setattr(autoquant.staged, name, False)
    p = AutoQuant(tuple(args.formats.split(",")), target_cosine=0.99)
    model, t_load = _t(pipeline.load, str(args.model), p.min_opset, work)
    graph = modelfile.import_graph(model)
    del model
    attention_guard.remove(graph)
    data = calib.CalibData.from_path(args.calib, calib.input_specs(modelfile.export_graph(graph)))
    search, verify = split_feeds(data, p.verify_fraction, p.merge_batch)
    cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
    (amax, means), t_cal = _t(autoquant.calibrate, graph, search, cands, provider=args.provider,
                              memory_budget_mb=args.memory_budget, progress=False)
    fp32 = modelfile.export_graph(graph)
    n = args.stages or autoquant.staged.stages_needed(fp32, cands.layers, args.memory_budget)
    where = autoquant.staged.fp32_stages(fp32, n, search[0], cands.layers)
    gated = modelfile.import_graph(fp32)
    del fp32
    index, t_build = _t(autoquant.build_gated, gated, cands, amax, means, "fp16", p.block_size)
    shapes = autoquant.shape_outputs(gated, list(cands.layers))
    gm = modelfile.export_graph(gated, opset=p.min_opset)
    del gated
    ev, t_ref = _t(autoquant.StagedEvaluator, gm, index, search, verify, args.provider, shapes, where, workdir=work,
                   progress=False, memory_budget_mb=args.memory_budget, inline=args.inline or None)
    loads_ref = ev.loads
    todo = [k for k in index]
    t = time.perf_counter()
    sens = {f"{k[0]}|{k[1]}": float(v) for k, v in ev.sensitivities(todo, progress=False)}
    t_sens = time.perf_counter() - t
    mix = {}
    for (layer, f), v in sorted(((tuple(k.split("|")), v) for k, v in sens.items()), key=lambda kv: kv[1]):
        mix.setdefault(layer, f)  # each layer in its least harmful format: one verification chain
    verified, t_verify = _t(ev.metrics, ev.gates(mix), "all")
    out = {"model": str(args.model), "provider": args.provider, "inline": ev.plan.inline, "stages": ev.plan.n,
           "candidates": len(todo), "load_s": round(t_load, 1), "calibrate_s": round(t_cal, 1),
           "build_gated_s": round(t_build, 1), "reference_s": round(t_ref, 1), "sensitivities_s": round(t_sens, 1),
           "verify_s": round(t_verify, 1), "session_load_s": round(ev.stats["load_s"], 1),
           "sessions_loaded": ev.loads, "sessions_loaded_reference": loads_ref, "peak_alive": ev.peak_live,
           "gain_s": round(sum(s["gain_s"] for s in ev.stats["stages"].values()), 1),
           "verified_cosine": verified["cosine"], "error_batches": autoquant.staged.ERROR_BATCHES,
           "types_s": round(ev.stats.get("types_s", 0.0), 1),
           "per_stage": {int(k): {a: round(b, 3) if isinstance(b, float) else b for a, b in v.items()}
                         for k, v in ev.stats["stages"].items()},
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "sensitivities": sens}
    ev.close()
    return out


def same(a: Path, b: Path) -> int:
    import numpy as np
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    sa, sb = x["sensitivities"], y["sensitivities"]
    diff = [k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k)]
    keys = sorted(sa.keys() & sb.keys())
    ra, rb = (np.argsort(np.argsort([d[k] for k in keys])) for d in (sa, sb))
    rho = float(np.corrcoef(ra, rb)[0, 1]) if len(keys) > 1 else 1.0
    print(f"{len(sa)} vs {len(sb)} sensitivities, {len(diff)} differ (Spearman {rho:.4f}); verified cosine "
          f"{x['verified_cosine']!r} vs {y['verified_cosine']!r}")
    for k in diff[:10]:
        print(f"  {k}: {sa.get(k)!r} vs {sb.get(k)!r}")
    return 0 if not diff and x["verified_cosine"] == y["verified_cosine"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("calib", type=Path, nargs="?")
    ap.add_argument("--stages", type=int, default=0, help="0: the auto rule (autoquant.staged.stages_needed)")
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--formats", default="fp8,int8")
    ap.add_argument("--memory-budget", type=int, default=4096)
    ap.add_argument("--inline", action="store_true", help="gates as Where (the CUDA layout) on any provider")
    ap.add_argument("--error-batches", type=int, default=0, help="what-if: batches per candidate error (0: the package's)")
    ap.add_argument("--no-unified", action="store_true", help="what-if: inlined stages as separate FP32/error/whole sessions")
    ap.add_argument("--no-suffix", action="store_true", help="what-if: candidate errors on whole-stage sessions")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--same", type=Path, nargs=2, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.same:
        return same(*args.same)
    import logging
    logging.basicConfig(level=logging.WARNING)
    from onnxopt import modelfile
    with tempfile.TemporaryDirectory(prefix="auto-proxy-") as d, modelfile.spilling(d):
        out = measure(args, Path(d))
    print(json.dumps({k: v for k, v in out.items() if k != "sensitivities"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
