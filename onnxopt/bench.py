"""Benchmark a baseline and candidates on one backend, and report what each candidate bought.

For each model: latency (median, p90, mean) over `iters` timed runs after `warmup` untimed ones, on the
first input sample; throughput (samples/s, from the batch size and the mean latency); size on disk
(the ONNX file with its external data, or the engine); speedup against the baseline (ratio of
medians); output fidelity against the baseline over `samples` inputs (cosine, SNR, max abs error,
through `onnxopt.compare.metrics`, per output, with the worst output summarised).

Backends, both driven through Polygraphy runners, with Polygraphy's Comparator gathering the outputs:
- `trt` (onnxopt/trt/runner.py): a TensorRT engine per model (TrtRunner). An FP32 baseline is first
  converted to FP16 (`onnxopt.convert`), because the comparison that matters is against the
  FP16 engine.
- `onnxrt`: ONNX Runtime (OnnxrtRunner). Latency is measured at ORT's default optimization level
  (ORT_ENABLE_ALL: what a deployment on ORT gets; Q/DQ pairs become integer kernels there). Fidelity is
  measured on a second session at ORT_DISABLE_ALL (Q/DQ simulated exactly; the fused integer kernels
  saturate on CPUs without VNNI), with an FP32 view for graphs the CPU provider cannot run in FP16.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import external_data_helper

from . import atomicfile, modelfile
from . import ort as ortx
from .calib import CalibData, InputSpec, input_specs
from .compare import evaluation_session, metrics
from .errors import OnnxoptError
from .trt.build import BuildConfig, precision_of

log = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "onnxrt")
REPORT_VERSION = 1


@dataclass
class BenchConfig:
    backend: str = "auto"        # "trt" | "onnxrt" | "auto" (trt when tensorrt imports, else onnxrt)
    warmup: int = 10
    iters: int = 100
    samples: int = 4             # input samples for the fidelity comparison
    profiles: dict | None = None  # input -> (min, opt, max): random inputs use opt; trt builds get the profile
    seed: int = 0                # random inputs when no data is given
    threads: int = 0             # onnxrt intra-op threads; 0 = ORT's default (one per physical core)
    ort_level: str = "all"       # onnxrt optimization level of the timed session
    provider: str = "cpu"        # onnxrt execution provider
    allow_cpu_fallback: bool = False  # onnxrt: run on the CPU (one warning) when `provider` is unavailable
    fp16_baseline: bool = True   # trt: convert an FP32 baseline to FP16 first
    work_dir: str | os.PathLike | None = None  # engines and the FP16 baseline; None = a temporary folder
    build: BuildConfig = field(default_factory=BuildConfig)  # trt engine builds


# ---------------------------------------------------------------- backends
class OnnxrtBackend:
    name = "onnxrt"

    def __init__(self, config: BenchConfig):
        if config.ort_level not in ortx.LEVELS:
            raise OnnxoptError(f"unknown ORT level '{config.ort_level}'; use one of {', '.join(ortx.LEVELS)}")
        self.config = config
        self.views: set[str] = set()        # models whose fidelity ran on an FP32 view
        self.timing_notes: dict[str, str] = {}  # models that ORT could not time as asked, and how they were timed

    def artifact(self, model: Path, label: str, work_dir: Path) -> Path:
        if model.suffix != ".onnx":
            raise OnnxoptError(f"{model}: the onnxrt backend needs .onnx models (engines need --backend trt)")
        return model

    def input_specs(self, model: Path) -> list[InputSpec]:  # asked only for files that are not .onnx
        raise OnnxoptError(f"{model}: the onnxrt backend needs .onnx models (engines need --backend trt)")

    def timing_runner(self, model: Path):
        from polygraphy.backend.onnxrt import OnnxrtRunner
        c = self.config

        def make():
            m = modelfile.load(model)
            order = list(ortx.LEVELS)  # disable, basic, extended, all
            levels = order[order.index(c.ort_level)::-1]
            errors = []
            for level in levels:  # ORT's fusions fail on some Q/DQ graphs (e.g. FP8 into MatMulIntegerToFloat)
                try:
                    sess = ortx.session(m, provider=c.provider, level=level, threads=c.threads)
                except OnnxoptError as e:
                    errors.append(f"level '{level}': " + re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e)))
                    continue
                if errors:  # the table's note says it too: log it only at INFO, so it is printed once
                    log.info("%s: %s; timed at level '%s'", model.name, errors[0], level)
                    self.timing_notes[str(model)] = f"timed at ORT level '{level}': {errors[0]}"
                if precision_of(m).fp8 and c.provider == "cpu":  # the model is fine: the CPU just has no FP8 kernels
                    why = f" (level '{levels[0]}' fusions reject FP8 Q/DQ on this ORT: timed at ORT level '{level}')" if errors else ""
                    self.timing_notes[str(model)] = ("FP8 model: valid, but ONNX Runtime's CPU provider has no FP8 kernels and "
                                                     "emulates every Q/DQ, so this latency says nothing about TensorRT" + why +
                                                     "; fidelity is exact")
                return sess
            # e.g. FP16 kernels or FP16 Q/DQ scales that the CPU provider lacks
            from .cast.autocast import fp32_view
            log.info("%s: %s; timing its FP32 view instead", model.name, errors[0])
            self.timing_notes[str(model)] = f"timed on its FP32 view: {errors[0]}"
            return ortx.session(fp32_view(m), provider=c.provider, level=c.ort_level, threads=c.threads)
        return OnnxrtRunner(make)

    def fidelity_runner(self, model: Path):
        from polygraphy.backend.onnxrt import OnnxrtRunner

        def make():
            self.active = model  # which model a failure in Polygraphy's Comparator came from
            sess, viewed = evaluation_session(modelfile.load(model), self.config.provider)
            if viewed:
                self.views.add(str(model))
            return sess
        return OnnxrtRunner(make)

    def time(self, runner, feed: dict, warmup: int, iters: int) -> list[float]:
        with runner:
            feed = _coerce(feed, runner)
            for _ in range(warmup):
                runner.infer(feed, check_inputs=False)
            times = []
            for _ in range(iters):
                runner.infer(feed, check_inputs=False)
                times.append(runner.last_inference_time())
        return times

    def device(self) -> dict:
        import onnxruntime
        return {"provider": self.config.provider, "onnxruntime": onnxruntime.__version__,
                "threads": self.config.threads or "ORT default", "timing_level": self.config.ort_level,
                "fidelity_level": "disable"}


def make_backend(config: BenchConfig):
    from . import trt
    if config.backend not in BACKENDS:
        raise OnnxoptError(f"unknown backend '{config.backend}'; use one of {', '.join(BACKENDS)}")
    name = config.backend
    if name == "auto":
        name = "trt" if trt.available() else "onnxrt"
        log.info("backend: %s", name)
    if name == "trt":
        from .trt.runner import TrtBackend
        build = config.build
        if config.profiles and not build.profiles:
            build = dataclasses.replace(build, profiles=config.profiles)
        return TrtBackend(build)
    return OnnxrtBackend(config)


# ---------------------------------------------------------------- the benchmark
@dataclass
class _Entry:
    label: str
    source: Path          # what the user passed
    model: Path           # what runs (ONNX or engine): the source, or the FP16 baseline made from it
    artifact: Path = None  # the file timed: the model, or its engine
    note: str = ""


def bench(baseline: str | os.PathLike, candidates: Sequence[str | os.PathLike], *, config: BenchConfig | None = None,
          data: CalibData | str | os.PathLike | None = None, labels: Sequence[str] | None = None,
          report: str | os.PathLike | None = None) -> dict:
    """Time `baseline` and each candidate, compare their outputs with the baseline's, and return the
    report (also written as JSON to `report` when given). `data` is an .npz / CalibData of inputs;
    without it, `samples` random inputs are drawn (shapes from the models or `config.profiles`)."""
    config = config or BenchConfig()
    paths, labels = _checked_models(baseline, candidates, config, labels)
    backend = make_backend(config)
    if backend.name == "onnxrt":
        providers = ortx.check_provider(config.provider, config.allow_cpu_fallback)
        if "CUDAExecutionProvider" not in providers:
            config = dataclasses.replace(config, provider="cpu")
            backend.config = config
    entries = [_Entry(lab, p, p) for lab, p in zip(labels, paths)]
    with _work_dir(config) as work, _polygraphy_quiet():
        feeds = _prepare(backend, entries, config, data, work)
        rows = []
        for e in entries:
            log.info("timing %s", e.label)
            with _run_errors(backend, e.artifact, e.label, feeds[0]):
                times = backend.time(backend.timing_runner(e.artifact), feeds[0], config.warmup, config.iters)
            rows.append(_row(e, times, _batch(feeds[0])))
        fidelity = _fidelity(backend, entries, feeds)
    _compare_rows(backend, entries, rows, fidelity)
    result = {
        "version": REPORT_VERSION,
        "backend": backend.name,
        "machine": {**machine(), **backend.device()},
        "warmup": config.warmup,
        "iters": config.iters,
        "samples": len(feeds),
        "data": getattr(data, "describe", None) or (str(data) if data is not None else f"random (seed {config.seed})"),
        "input_shapes": {k: list(np.shape(v)) for k, v in feeds[0].items()},
        "baseline": rows[0],
        "candidates": rows[1:],
    }
    if report is not None:
        write_report(result, report)
    return result


def _checked_models(baseline, candidates, config: BenchConfig, labels) -> tuple[list[Path], list[str]]:
    """The model paths (baseline first) and their labels, checked before anything runs."""
    if not candidates:
        raise OnnxoptError("give at least one candidate model after the baseline")
    if config.iters < 1 or config.warmup < 0 or config.samples < 1:
        raise OnnxoptError("--iters and --samples must be at least 1 and --warmup at least 0")
    paths = [Path(baseline)] + [Path(c) for c in candidates]
    for p in paths:
        if not p.is_file():
            raise OnnxoptError(f"{p}: no such model file; check the path")
    labels = list(labels) if labels else _labels(paths)
    if len(labels) != len(paths):
        raise OnnxoptError(f"{len(labels)} labels for {len(paths)} models; give one label per model")
    return paths, labels


@contextlib.contextmanager
def _work_dir(config: BenchConfig):
    """`config.work_dir` (created), or a temporary folder removed afterwards."""
    if config.work_dir is not None:
        work = Path(config.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    tmp = tempfile.mkdtemp(prefix="onnxopt-bench-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare(backend, entries: list[_Entry], config: BenchConfig, data, work: Path) -> list[dict]:
    """FP16 baseline (trt), input feeds, build profiles and each entry's artifact. Returns the feeds."""
    if backend.name == "trt" and config.fp16_baseline:
        _fp16_baseline(entries[0], work)
    for e in entries[1:]:
        if backend.name == "trt" and e.model.suffix == ".onnx" and _is_fp32(e.model):
            log.warning("candidate %s is FP32; its engine will be compared with an FP16 baseline", e.label)
    specs = input_specs(modelfile.load(entries[0].model)) if entries[0].model.suffix == ".onnx" else \
        backend.input_specs(entries[0].model)
    feeds = _feeds(specs, config, data)
    if backend.name == "trt" and not backend.build_config.profiles:
        backend.build_config = dataclasses.replace(backend.build_config, profiles=_profiles_of(specs, feeds))
    for e in entries:
        e.artifact = backend.artifact(e.model, e.label, work)
    return feeds


def _compare_rows(backend, entries: list[_Entry], rows: list[dict], fidelity: list) -> None:
    """Speedup, size ratio and fidelity against the baseline row; backend notes and builds."""
    base = rows[0]
    for row, fid in zip(rows, fidelity):
        row["speedup"] = base["latency_ms"]["median"] / row["latency_ms"]["median"] if row["latency_ms"]["median"] > 0 else float("nan")
        row["size_ratio"] = row["size_bytes"] / base["size_bytes"] if base["size_bytes"] else float("nan")
        row["fidelity"] = fid
    for row, e in zip(rows, entries):
        if backend.name == "onnxrt":
            notes = [row["note"]] if row["note"] else []
            if str(e.artifact) in backend.timing_notes:
                notes.append(backend.timing_notes[str(e.artifact)])
            if str(e.artifact) in backend.views:
                notes.append("fidelity on its FP32 view (ORT cannot run the graph as it is)")
            row["note"] = "; ".join(notes)
        if backend.name == "trt" and e.label in backend.builds:
            row["build"] = backend.builds[e.label]


@contextlib.contextmanager
def _run_errors(backend, model: Path, label: str, feed: dict | list[dict]):
    """An ONNX Runtime failure while running a model becomes one OnnxoptError line (which input, what range)."""
    try:
        yield
    except OnnxoptError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT's pybind exceptions share no useful base class
        if backend.name != "onnxrt" or not type(e).__module__.startswith("onnxruntime"):
            raise
        raise ortx.run_error(e, modelfile.load(model), feed, label) from None


def _labels(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def _is_fp32(path: Path) -> bool:
    """An ONNX graph with no FP16/BF16 tensor and no Q/DQ: a plain FP32 model."""
    p = precision_of(modelfile.load(path))
    return not (p.low_float or p.int8 or p.fp8 or p.int4)


def _fp16_baseline(e: _Entry, work: Path) -> None:
    if e.model.suffix != ".onnx" or not _is_fp32(e.model):
        return
    from .api import convert
    out = work / f"{e.model.stem}.fp16.onnx"
    log.info("converting the FP32 baseline %s to FP16 (%s)", e.model, out)
    e.model = convert(e.model, out, dtype="fp16")
    e.label = f"{e.label} (fp16)"
    e.note = "FP16 conversion of the FP32 baseline (onnxopt convert --fp16)"


def _feeds(specs: list[InputSpec], config: BenchConfig, data) -> list[dict]:
    if data is None:
        shapes = {name: opt for name, (_, opt, _) in (config.profiles or {}).items()}
        for s in specs:  # dynamic dimensions default to 1 (a latency benchmark of one sample), said once
            if s.name not in shapes and any(not isinstance(d, int) or d <= 0 for d in s.shape):
                shapes[s.name] = tuple(d if isinstance(d, int) and d > 0 else 1 for d in s.shape)
                log.warning("input '%s' has dynamic shape %s: benchmarking %s (give --shapes %s:... for others)", s.name,
                            "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in s.shape),
                            "x".join(map(str, shapes[s.name])), s.name)
        data = CalibData.random(specs, config.samples, seed=config.seed, shapes=shapes)
    elif not isinstance(data, CalibData):
        data = CalibData.from_path(data, specs)
    feeds = list(itertools.islice(iter(data), config.samples))
    if not feeds:
        raise OnnxoptError(f"{data.describe}: no input samples; give an .npz with at least one sample")
    return feeds


def _profiles_of(specs: list[InputSpec], feeds: list[dict]) -> dict | None:
    """Profiles for the dynamic inputs that cover the feeds: min/max over them, opt = the timed one."""
    out = {}
    for s in specs:
        if all(d is not None for d in s.shape):
            continue
        shapes = np.array([np.shape(f[s.name]) for f in feeds])
        out[s.name] = (tuple(int(d) for d in shapes.min(0)), tuple(int(d) for d in shapes[0]), tuple(int(d) for d in shapes.max(0)))
    return out or None


def _coerce(feed: dict, runner) -> dict:
    """The feed in the dtypes the (active) runner expects, e.g. FP16 inputs of a converted graph."""
    meta = runner.get_input_metadata(use_numpy_dtypes=False)
    out = {}
    for name, (dtype, _) in meta.items():
        if name not in feed:
            raise OnnxoptError(f"no data for input '{name}'; the models must share their inputs (found {sorted(feed)})")
        out[name] = np.ascontiguousarray(np.asarray(feed[name]).astype(dtype.numpy(), copy=False))
    return out


def _batch(feed: dict) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if np.ndim(first) else 1


def _row(e: _Entry, times: list[float], batch: int) -> dict:
    ms = sorted(t * 1e3 for t in times)
    mean = statistics.fmean(ms)
    return {
        "label": e.label,
        "model": str(e.source),
        "artifact": str(e.artifact) if e.artifact != e.source else None,
        "size_bytes": artifact_bytes(e.artifact),
        "latency_ms": {"median": statistics.median(ms), "p90": _percentile(ms, 90), "mean": mean, "min": ms[0]},
        "batch": batch,
        "throughput_per_s": batch * 1e3 / mean if mean > 0 else float("inf"),
        "note": e.note,
    }


def _percentile(sorted_ms: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(sorted_ms), q))


def _fidelity(backend, entries: list[_Entry], feeds: list[dict]) -> list[dict | None]:
    """Outputs of every model on every feed (Polygraphy's Comparator, one runner active at a time),
    each candidate's compared with the baseline's."""
    from polygraphy.comparator import Comparator

    runners = [backend.fidelity_runner(e.artifact) for e in entries]
    try:
        results = Comparator.run(runners, data_loader=feeds)
    except Exception as err:  # noqa: BLE001 - see _run_errors
        model = Path(getattr(backend, "active", entries[0].artifact))
        label = next((e.label for e in entries if e.artifact == model), model.name)
        with _run_errors(backend, model, label, feeds):
            raise err
    outs = [[it for it in iterations] for _, iterations in results]
    base = outs[0]
    names = list(base[0].keys())
    report: list[dict | None] = [None]
    for e, its in zip(entries[1:], outs[1:]):
        per = {}
        for name in names:
            if name not in its[0]:
                log.warning("%s has no output '%s'; skipped in its fidelity", e.label, name)
                continue
            ref = np.concatenate([np.asarray(b[name], np.float64).ravel() for b in base])
            cand = np.concatenate([np.asarray(c[name], np.float64).ravel() for c in its])
            per[name] = metrics(ref, cand)
        if not per:
            raise OnnxoptError(f"{e.label} shares no output name with the baseline; compare models of the same network")
        report.append({"outputs": per, **_worst(per)})
    return report


def _worst(per: dict) -> dict:
    def pick(key, fn):
        vals = [m[key] for m in per.values()]
        return float("nan") if any(math.isnan(v) for v in vals) else fn(vals)
    return {"cosine": pick("cosine", min), "snr_db": pick("snr_db", min), "max_abs": pick("max_abs", max)}


def artifact_bytes(path: Path) -> int:
    """Bytes on disk: an engine, or an ONNX file with the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    if path.suffix == ".onnx":
        files = set()
        model = modelfile.load(path)
        for t in modelfile.all_tensors(model):
            if external_data_helper.uses_external_data(t):
                files.add(external_data_helper.ExternalDataInfo(t).location)
        total += sum(os.path.getsize(f) for f in files)
    return total


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "python": platform.python_version(), "onnx": onnx.__version__}


@contextlib.contextmanager
def _polygraphy_quiet():
    """Polygraphy logs every runner activation at INFO; keep it for -vv."""
    from polygraphy.logger import G_LOGGER
    severity = G_LOGGER.INFO if log.isEnabledFor(logging.DEBUG) else G_LOGGER.WARNING
    with G_LOGGER.verbosity(severity):
        yield


# ---------------------------------------------------------------- output
def write_report(result: dict, path: str | os.PathLike) -> Path:
    """JSON, written atomically (non-finite numbers as strings: JSON has no inf/nan)."""
    with atomicfile.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    return Path(path)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def format_table(result: dict) -> str:
    """The report as a Markdown table, with the backend and machine on a line above it."""
    m = result["machine"]
    where = f"GPU {m['gpu']}, TensorRT {m['tensorrt']}" if result["backend"] == "trt" else \
        f"ONNX Runtime {m['onnxruntime']} {m['provider']}, {m['threads']} threads, timed at level '{m['timing_level']}'"
    lines = [f"backend {result['backend']}: {where}; CPU {m['cpu']} ({m['cores']} cores); "
             f"{result['warmup']} warmup + {result['iters']} timed runs; fidelity over {result['samples']} sample(s) of {result['data']}",
             "",
             "| model | size (MB) | median (ms) | p90 (ms) | throughput (/s) | speedup | cosine | SNR (dB) | max abs err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate([result["baseline"]] + list(result["candidates"])):
        lat, fid = row["latency_ms"], row.get("fidelity")
        label = row["label"] + (" (baseline)" if i == 0 else "")
        cells = [label, f"{row['size_bytes'] / 2**20:.2f}", f"{lat['median']:.3f}", f"{lat['p90']:.3f}",
                 f"{row['throughput_per_s']:.1f}", f"{row['speedup']:.2f}x"]
        if fid:
            cells += [_num(fid["cosine"], 6), _num(fid["snr_db"], 1), _num(fid["max_abs"], 4, sci=True)]
        else:
            cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row['label']}: {_short(row['note'])}" for row in [result["baseline"]] + list(result["candidates"]) if row.get("note")]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def _short(text: str, n: int = 240) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _num(v, digits: int, sci: bool = False) -> str:
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}" if sci else f"{v:.{digits}f}"
