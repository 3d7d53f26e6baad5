"""Timing model of `quantize --auto` with staged evaluation: where the time of the search goes, measured on a
sample of candidates per stage and extrapolated to all of them (so a full-size run's time is known before it runs).

    python tools/auto_staged_timing.py MODEL CALIB.npz --stages 4 [--provider cuda] [--per-stage 4] [--one-graph 3]

Prints, per stage: weights, candidates, session load, seconds per candidate (one stage forward over the search
batches), the gain probe, one pass of the FP32 stage and of the whole gated stage; the one-graph evaluator's
seconds per candidate (a whole forward) with --one-graph N; and the estimated totals.

The full-size SDXL run on the GPU machine is one command (export and data by tools/bench_sdxl.py, then the search;
over 1000 candidates the auto rule stages it, one stage per 128 candidates; --auto-stages 32 halves each stage):

    python tools/bench_sdxl.py --work /root/sdxl --stages export,calib && \
    python -m onnxopt quantize /root/sdxl/unet.onnx --auto --formats fp8,int8 --target-cosine 0.99 \
        --provider cuda --auto-stages 32 --memory-budget 32000 --calib /root/sdxl/calib.npz \
        --sensitivity $OUT/sens.json --report $OUT/auto.json -o /root/sdxl/unet.auto.onnx
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt import attention_guard, autoquant, calib, modelfile, pipeline
from onnxopt.passes import AutoQuant  # noqa: E402
from onnxopt.passes.autoquant import split_feeds  # noqa: E402


def _t(f, *a, **k):
    t = time.perf_counter()
    out = f(*a, **k)
    return out, time.perf_counter() - t


def measure(args, work: Path) -> dict:
    p = AutoQuant(tuple(args.formats.split(",")), target_cosine=0.99, block_size=args.block_size)
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
    where = autoquant.staged.fp32_stages(fp32, args.stages)
    gated = modelfile.import_graph(fp32)
    index, t_build = _t(autoquant.build_gated, gated, cands, amax, means, "fp32", p.block_size)
    shapes = autoquant.shape_outputs(gated, list(cands.layers))
    gm = modelfile.export_graph(gated, opset=p.min_opset)
    del gated
    ev, t_ref = _t(autoquant.StagedEvaluator, gm, index, search, verify, args.provider, shapes, where,
                   workdir=work, progress=False, memory_budget_mb=0)
    rows, total = [], t_cal + t_build + t_ref
    for s in range(ev.plan.n):
        keys = [k for k, i in index.items() if ev.plan.gate_stages.get(i) == {s}]
        if not keys:
            continue
        sample = keys[:: max(1, len(keys) // args.per_stage)][: args.per_stage]
        load0 = ev.stats["load_s"]
        rse, t_c = _t(ev._stage_errors, s, sample, False)
        load = ev.stats["load_s"] - load0
        per = (t_c - load) / len(sample)
        _, t_g = _t(ev._gain, s, rse)
        wbytes = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(ev.plan.proto(s, ev.types)))
        passes = {}
        for tag, only in (("fp32_pass_s", ()), ("gated_pass_s", None)):  # one pass over the search batches
            sess = ev._session(s, only=only)
            t = time.perf_counter()
            for b in ev.ids["search"]:
                ev._run(sess, s, ev._feed(s, b, ev.zeros()))
            passes[tag] = round(time.perf_counter() - t, 3)
            del sess
        rows.append({"stage": s, "weights_mb": round(wbytes / 2**20, 1), "candidates": len(keys), "load_s": round(load, 2),
                     "per_candidate_s": round(per, 4), "gain_probe_s": round(t_g, 2), **passes,
                     "stage_s": round(load + per * len(keys) + t_g, 1)})
        total += load + per * len(keys) + t_g
    mix = {n: l.formats[1] if len(l.formats) > 1 else "none" for n, l in cands.layers.items()}
    _, t_verify = _t(ev.metrics, ev.gates(mix), "verify")
    out = {"model": str(args.model), "provider": args.provider, "stages": ev.plan.n, "candidates": len(index),
           "search_batches": len(search), "verify_batches": len(verify), "load_s": round(t_load, 1),
           "calibrate_s": round(t_cal, 1), "build_gated_s": round(t_build, 1), "reference_s": round(t_ref, 1),
           "verify_chain_s": round(t_verify, 1), "per_stage": rows}
    # search_target verifies at most 10 mixes, plus the final one: each a chain over the verify batches
    out["estimate_staged_s"] = round(total + 11 * t_verify, 1)
    ev.close()
    del ev
    if args.one_graph:
        full, t_full_load = _t(autoquant.Evaluator, gm, index, search, verify, args.provider, shapes)
        keys = list(index)[:: max(1, len(index) // args.one_graph)][: args.one_graph]
        _, t = _t(lambda: [full.metrics(full.gates({k[0]: k[1]})) for k in keys])
        out["one_graph"] = {"load_and_reference_s": round(t_full_load, 1), "per_candidate_s": round(t / len(keys), 4),
                            "estimate_s": round(t_cal + t_build + t_full_load + t / len(keys) * len(index)
                                                + 11 * t / len(keys) * len(verify) / max(1, len(search)), 1)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--formats", default="fp8,int8")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--memory-budget", type=int, default=4096)
    ap.add_argument("--per-stage", type=int, default=4, help="candidates timed per stage")
    ap.add_argument("--one-graph", type=int, default=0, help="also time N candidates on the one-graph evaluator")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="auto-timing-") as d, modelfile.spilling(d):
        out = measure(args, Path(d))
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
