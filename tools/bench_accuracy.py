"""Accuracy matrix on real models: onnxopt's modes (default options, Python API) and the ONNX Runtime
`quantize_static` anchor, on MiniLM (mean cosine of sentence embeddings) and EfficientNet-Lite0 (top-1
agreement), against the FP32 model, with ORT at ORT_DISABLE_ALL on held-out data.

    python tools/bench_accuracy.py [--models minilm,effnet] [--modes fp8,int8,...] [--json out.json]

Each quantization runs in its own subprocess, which reports its wall time and peak RSS
(VmHWM of /proc/self/status). A row whose onnxopt feature is not there yet prints
'n/a (not implemented)'. Models and data are exported once and cached under --work (see real_models.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models as rm  # noqa: E402

NA = "n/a (not implemented)"


@dataclass(frozen=True)
class Target:
    """value >= floor, and (if `rel`) value >= value of row `rel` + margin (strictly above when margin == 0)."""
    floor: float | None = None
    rel: str | None = None
    margin: float = 0.0

    def text(self) -> str:
        parts = []
        if self.floor is not None:
            parts.append(f">= {self.floor:g}")
        if self.rel:
            parts.append(f">= {self.rel} + {self.margin:g}" if self.margin else f"> {self.rel}")
        return " and ".join(parts) or "-"

    def check(self, value: float, others: dict[str, float]) -> bool | None:
        if value is None or value != value:  # missing or NaN
            return False
        ok = True
        if self.floor is not None:
            ok &= value >= self.floor
        if self.rel:
            base = others.get(self.rel)
            if base is None or base != base:
                return None  # the row it depends on did not run
            ok &= value >= base + self.margin if self.margin else value > base
        return bool(ok)


@dataclass(frozen=True)
class Row:
    model: str
    mode: str
    kind: str                       # "onnxopt" (quantize), "sparsify" (sparsity alone), "ort" (quantize_static)
    config: dict = field(default_factory=dict)   # QuantConfig fields / sparsify method / ORT type
    target: Target | None = None
    note: str = ""                  # the issue author's ModelOpt / ORT numbers


def _sparse_rows(model: str, modes: tuple[str, ...], alone_margin: float) -> list[Row]:
    rows = [Row(model, "2:4-mag", "sparsify", {"method": "magnitude"}, None,
                "magnitude 2:4 measured 0.61" if model == "minilm" else ""),
            Row(model, "2:4-sgpt", "sparsify", {"method": "sparsegpt"}, Target(rel="2:4-mag", margin=alone_margin))]
    for q in modes:
        rows.append(Row(model, f"2:4-mag+{q}", "onnxopt", {"mode": q, "sparsity": "2:4", "sparsity_method": "magnitude"}))
        rows.append(Row(model, f"2:4-sgpt+{q}", "onnxopt", {"mode": q, "sparsity": "2:4", "sparsity_method": "sparsegpt"},
                        Target(rel=f"2:4-mag+{q}")))
    return rows


ROWS: list[Row] = [
    Row("minilm", "fp8", "onnxopt", {"mode": "fp8"}, Target(0.997), "ModelOpt 0.9957"),
    Row("minilm", "int8", "onnxopt", {"mode": "int8"}, Target(0.95), "ModelOpt 0.863, ORT 0.027"),
    Row("minilm", "int8+sq", "onnxopt", {"mode": "int8", "smoothquant": "auto"}, Target(0.99)),
    Row("minilm", "int4-rtn", "onnxopt", {"mode": "int4", "awq": "none", "block_size": 128}, None, "ModelOpt RTN 0.942"),
    Row("minilm", "int4-awq", "onnxopt", {"mode": "int4", "awq": "full", "block_size": 128},
        Target(0.98, rel="int4-rtn", margin=0.005), "ModelOpt AWQ-clip 0.952"),
    *_sparse_rows("minilm", ("fp8", "int8"), 0.1),
    Row("minilm", "ort-int8", "ort", {"type": "int8"}, None, "ORT quantize_static QDQ"),
    Row("minilm", "ort-fp8", "ort", {"type": "fp8"}, None, "ORT quantize_static QDQ"),
    Row("effnet", "int8", "onnxopt", {"mode": "int8"}, Target(0.85), "ModelOpt 0.828, ORT 0.828"),
    Row("effnet", "fp8", "onnxopt", {"mode": "fp8"}, Target(0.75), "ModelOpt 0.672, ORT fails"),
    *_sparse_rows("effnet", ("int8", "fp8"), 0.0),
    Row("effnet", "ort-int8", "ort", {"type": "int8"}, None, "ORT quantize_static QDQ"),
    Row("effnet", "ort-fp8", "ort", {"type": "fp8"}, None, "ORT quantize_static QDQ"),
]


# Layer groups for --sensitivity: each run quantizes only the layers whose node name matches the group.
GROUPS = {
    "minilm": {"query": "query/", "key": "key/", "value": "value/", "attn-out": "attention/output/dense",
               "ffn-up": "intermediate/dense", "ffn-down": r"layer\.\d+/output/dense",
               **{f"layer.{i}": rf"layer\.{i}/" for i in range(6)}},
    "effnet": {"stem": "conv_stem", "expand": "expand_conv", "depthwise": "depthwise_conv", "project": "project_conv",
               "head+fc": "conv_head|_fc", "blocks.0-3": r"_blocks\.[0-3]/", "blocks.4-7": r"_blocks\.[4-7]/",
               "blocks.8-11": r"_blocks\.([89]|1[01])/", "blocks.12-15": r"_blocks\.1[2-5]/"},
}


def only(regex: str) -> tuple[str, ...]:
    """An `exclude` that leaves only node names matching `regex` quantized."""
    return (rf"^(?!.*(?:{regex}))",)


def sensitivity_rows(rows: list[Row]) -> list[Row]:
    out = []
    for r in rows:
        if r.kind != "onnxopt":
            continue
        for g, rx in GROUPS[r.model].items():
            out.append(Row(r.model, f"{r.mode}@{g}", "onnxopt", {**r.config, "exclude": only(rx)}, None,
                           f"only {g} quantized"))
    return out


# ---------------------------------------------------------------- workers (run in a subprocess)
def _not_implemented(e: BaseException) -> bool:
    if isinstance(e, (ImportError, NotImplementedError)):
        return True
    # a QuantConfig field that does not exist yet
    return isinstance(e, TypeError) and "unexpected keyword argument" in str(e)


def _work_onnxopt(spec: dict) -> dict:
    from onnxopt import QuantConfig, quantize
    cfg = QuantConfig(progress=False, **{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    t = time.perf_counter()
    res = quantize(spec["model"], spec["out"], config=cfg, data=spec["calib"])
    return {"wall_s": time.perf_counter() - t, "report": _summary(res.report)}


def _work_sparsify(spec: dict) -> dict:
    from onnxopt import api
    t = time.perf_counter()
    rep = api.sparsify_model(spec["model"], spec["out"], data=spec["calib"], pattern="2:4",
                                  method=spec["config"]["method"], progress=False)
    return {"wall_s": time.perf_counter() - t, "report": _summary(rep)}


def _work_ort(spec: dict) -> dict:
    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self, path):
            with np.load(path) as z:
                self.arrays = {k: z[k] for k in z.files}
            self.i = 0

        def get_next(self):
            n = next(iter(self.arrays.values())).shape[0]
            if self.i >= n:
                return None
            self.i += 1
            return {k: v[self.i - 1:self.i] for k, v in self.arrays.items()}

        def rewind(self):
            self.i = 0

    qtype = QuantType.QInt8 if spec["config"]["type"] == "int8" else QuantType.QFLOAT8E4M3FN
    tried = []
    t = time.perf_counter()
    # FP8 in ORT's quantizer may need the Distribution calibrator; try MinMax first like INT8.
    methods = [CalibrationMethod.MinMax] + ([CalibrationMethod.Distribution] if qtype != QuantType.QInt8 else [])
    for method in methods:
        try:
            quantize_static(spec["model"], spec["out"], Reader(spec["calib"]), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=qtype, weight_type=qtype, calibrate_method=method,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
            return {"wall_s": time.perf_counter() - t, "report": {"calibrate_method": method.name, "failed_methods": tried}}
        except Exception as e:
            tried.append(f"{method.name}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
            if method is methods[-1]:
                raise RuntimeError("; ".join(tried)) from None


def _summary(report) -> dict:
    """Scalar entries of a report (the full one can be large)."""
    if not isinstance(report, dict):
        return {}
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool)) or v is None}


def worker(spec_json: str) -> int:
    """Quantize (peak RSS and wall time measured up to here), then evaluate in the same fresh process, so
    the parent never holds onnxopt modules that a teammate has changed since it started."""
    spec = json.loads(spec_json)
    rss0 = rm.peak_rss_mb()
    fn = {"onnxopt": _work_onnxopt, "sparsify": _work_sparsify, "ort": _work_ort}[spec["kind"]]
    try:
        out = {"status": "ok", **fn(spec)}
    except BaseException as e:  # reported to the parent, which keeps going
        status = "na" if _not_implemented(e) else "error"
        out = {"status": status, "error": _first_line(e), "traceback": traceback.format_exc()[-3000:]}
    out["peak_rss_mb"] = rm.peak_rss_mb()
    out["start_rss_mb"] = rss0
    if out["status"] == "ok":
        try:
            ev = rm.evaluate(spec["name"], spec["model"], spec["out"], spec["eval"])
            out.update(ev, file_mb=rm.file_mb(spec["out"]))
            if ev["value"] != ev["value"]:
                out.update(status="error", error="NaN outputs")
        except Exception as e:
            out.update(status="error", error="evaluation: " + _first_line(e), traceback=traceback.format_exc()[-3000:])
    print("@@RESULT " + json.dumps(out), flush=True)
    return 0


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:300] if s else ''}"


# ---------------------------------------------------------------- parent
def run_row(row: Row, prep: rm.Prepared, runs: Path, timeout: int) -> dict:
    out = runs / (row.model + "_" + re.sub(r"[^A-Za-z0-9.-]+", "_", row.mode) + ".onnx")
    for p in (out, out.with_name(out.name + ".data")):
        if p.exists():
            p.unlink()
    spec = {"kind": row.kind, "name": row.model, "config": row.config, "model": str(prep.model),
            "calib": str(prep.calib), "eval": str(prep.eval), "out": str(out)}
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(rm.ROOT)})
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout} s"}
    res = None
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            res = json.loads(line[len("@@RESULT "):])
    if res is None:
        return {"status": "error", "error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    res["process_wall_s"] = time.perf_counter() - t
    if row.kind == "ort" and res["status"] != "ok":
        res["status"] = "fails"  # the anchor's own failure is a result, not a harness error
    return res


def fmt_value(r: dict) -> str:
    if r["status"] == "na":
        return NA
    if r["status"] in ("error", "fails"):
        return r["status"]
    v = r["value"]
    return f"{v:.4f}" + (" (fp32 view)" if r.get("fp32_view") else "")


def table(results: list[dict]) -> str:
    head = "| model | mode | metric | value | target | pass | wall s | peak RSS MB | file MB | reference (issue) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        ok = {True: "pass", False: "FAIL", None: "-"}[r.get("pass")]
        wall = f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
        mb = f"{r['file_mb']:.1f}" if r.get("file_mb") is not None else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {rm.metric_name(r['model'])} | {fmt_value(r)} | {r['target']} | {ok} "
                     f"| {wall} | {rss} | {mb} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(rm.MODELS), help="comma list of: " + ", ".join(rm.MODELS))
    ap.add_argument("--modes", default=None, help="comma list of modes (default all): " +
                    ", ".join(sorted({r.mode for r in ROWS})))
    ap.add_argument("--work", default=str(rm.DEFAULT_WORK))
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--timeout", type=int, default=1800, help="per-run limit in seconds")
    ap.add_argument("--sensitivity", action="store_true",
                    help="instead of the selected rows, run each onnxopt row once per layer group with only that group "
                         "quantized (where the accuracy goes)")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    modes = args.modes.split(",") if args.modes else None
    rows = [r for r in ROWS if r.model in models and (modes is None or r.mode in modes)]
    if args.sensitivity:
        rows = sensitivity_rows(rows)
    if not rows:
        print("no rows selected", file=sys.stderr)
        return 2
    work = Path(args.work)
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    results = []
    for row in rows:
        prep = rm.prepare(row.model, work)
        print(f"[{row.model} {row.mode}] ...", file=sys.stderr, flush=True)
        rm.reference(prep.model, prep.eval)  # computed once, cached on disk for the workers
        res = run_row(row, prep, runs, args.timeout)
        res.update(model=row.model, mode=row.mode, kind=row.kind, config=row.config, note=row.note,
                   target=row.target.text() if row.target else "-")
        print(f"[{row.model} {row.mode}] {fmt_value(res)}" + (f"  {res.get('error')}" if res.get("error") else ""),
              file=sys.stderr, flush=True)
        results.append(res)
    for row, res in zip(rows, results):
        others = {r["mode"]: r.get("value") for r in results if r["model"] == row.model and r["status"] == "ok"}
        res["pass"] = row.target.check(res.get("value"), others) if row.target and res["status"] == "ok" else (
            False if row.target and res["status"] == "error" else None)
    print(table(results))
    if args.json:
        meta = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "python": platform.python_version(),
                "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
