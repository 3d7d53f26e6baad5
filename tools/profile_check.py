"""Where convert --fp16's finite check and compare spend their time (issue 25, speed2), piece by piece, on one
machine: run it on the GPU machine with the full-size SDXL outputs of tools/bench_speed.py (--keep).

    python tools/profile_check.py check   /root/speed/new/unet.fp16.onnx --provider cuda
    python tools/profile_check.py compare /root/sdxl/unet.onnx /root/speed/new/unet.fp8.onnx /root/sdxl/heldout.npz --provider cuda

check: the old load-only check (onnx checker on the model with its embedded weights, the exact emulation with
its weights, an ORT session of it) against the new one (finite.check_loads: the weightless written graph, the
checker while ORT builds the session), each piece timed (wall and this process's CPU seconds), and where ORT
places the nodes (a CPU fallback on CUDA shows as nodes on CPUExecutionProvider).
compare: each model's session set-up and first/next runs, then compare() as a whole (both sessions built at
once where they fit). Prints one line per piece and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxopt import emulate, finite, modelfile  # noqa: E402
from onnxopt import ort as ortx  # noqa: E402

ROWS: dict = {}


class timed:
    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self.t, time.process_time() - self.c
        ROWS[self.label] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        print(f"{self.label:58s} {wall:8.2f} s wall {cpu:8.2f} s cpu", flush=True)


def placements(model, provider: str) -> dict:
    """Nodes per execution provider, from ORT's verbose session log."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    err: list = []
    m = finite.weightless(model)
    modelfile.stamp_ir_version(m)
    with ortx._captured_stderr(err):  # noqa: SLF001 - a diagnostic tool
        ort.InferenceSession(m.SerializeToString(), so, providers=[p for p in ortx._providers(provider)])  # noqa: SLF001
    text = "".join(err)
    out = {ep: int(n) for n, ep in re.findall(r"(\d+) Node\(s\) placed on \[(\w+)\]", text)}
    if not out:
        out = {ep: "all" for ep in re.findall(r"All nodes placed on \[(\w+)\]", text)}
    cpu_ops = sorted(set(re.findall(r"Node\(s\) placed on \[CPUExecutionProvider\].*?(?:\n\s+\S+ \(([^)]+)\))", text)))
    return {"nodes": out, "cpu_ops_sample": cpu_ops[:20]}


def check(args) -> None:
    with timed("load (lazy)"):
        m = modelfile.load(args.model)
    print(f"nodes {len(m.graph.node)}, initializers {len(m.graph.initializer)}, bytes {modelfile.model_bytes(m) / 2**30:.2f} GiB")
    with timed("new: check_loads (whole)"):
        loaded = finite.check_loads(m, args.provider)
    print(f"    loaded: {loaded}")
    with timed("new piece: weightless()"):
        light = finite.weightless(m)
    with timed("new piece: check_data()"):
        finite.check_data(m)
    with timed("new piece: checker on the weightless graph"):
        finite._checker(light)  # noqa: SLF001
    with timed("new piece: ORT session, weightless written graph"):
        s = ortx.session(light, provider=args.provider, level="disable", lean=True)
    del s
    if args.old:
        with timed("old piece: checker with embedded weights"):
            finite._checker(m)  # noqa: SLF001
        with timed("old piece: emulated_view (weights behind Casts)"):
            view = emulate.emulated_view(m)
        with timed("old piece: ORT session, emulation with weights"):
            s = ortx.session(view, provider=args.provider, level="disable", lean=True)
        del s
        with timed("diag: ORT session, weightless emulation"):
            s = ortx.session(finite.weightless(view), provider=args.provider, level="disable", lean=True)
        del s, view
    ROWS["placements"] = placements(m, args.provider)
    print("placements:", ROWS["placements"])


def compare(args) -> None:
    import numpy as np
    from onnxopt import calib
    from onnxopt.compare import compare as run_compare
    from onnxopt.compare import evaluation_session
    ref, cand = modelfile.load(args.ref), modelfile.load(args.cand)
    data = calib.CalibData.from_path(args.data, calib.input_specs(ref))
    feeds = list(data)
    print(f"fit together on {args.provider}: {ortx.fit_together([ref, cand], args.provider, 4096)}; "
          f"GPU bytes {ortx.device_memory_bytes()}; {len(feeds)} batches")
    for name, m in (("reference", ref), ("candidate", cand)):
        with timed(f"{name}: session"):
            s, viewed = evaluation_session(m, args.provider)
        outs = [o.name for o in m.graph.output]
        types = {i.name: i.type for i in s.get_inputs()}
        for i, f in enumerate(feeds):
            f = {k: (v.astype(np.float16) if types.get(k) == "tensor(float16)" else v) for k, v in f.items()}
            with timed(f"{name}: run {i + 1} (I/O binding on CUDA)"):
                ortx.run_fetched(s, outs, f)
            with timed(f"{name}: run {i + 1} (plain run)"):
                s.run(outs, f)
        del s
    with timed("compare() whole"):
        res = run_compare(args.ref, args.cand, args.data, provider=args.provider)
    print({k: v["cosine"] for k, v in res.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("check")
    c.add_argument("model")
    c.add_argument("--no-old", dest="old", action="store_false", help="Skip timing the old check's pieces.")
    p = sub.add_parser("compare")
    p.add_argument("ref")
    p.add_argument("cand")
    p.add_argument("data")
    for x in (c, p):
        x.add_argument("--provider", default="cuda", choices=("cpu", "cuda"))
        x.add_argument("--json", type=Path)
    args = ap.parse_args()
    ortx.check_provider(args.provider)
    check(args) if args.what == "check" else compare(args)
    if args.json:
        args.json.write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
