"""One pipeline of composable passes.

A recipe is a list of passes (see `onnxopt.passes`): each pass has typed options, checked when it is
built, and a `run(ctx) -> dict` that rewrites `ctx.graph` in place and returns its report section.
The `Runner` owns everything around the passes: loading (lazy, opset raised to what the passes need,
FP32 view of FP16/BF16 inputs), calibration data, the weight spill, export, per-pass timings, the report
and the atomic save. quantize, sparsify and convert all run through it.

    onnxopt.run([Sparsify("2:4"), SmoothQuant(0.8), QDQ("int8"), Autocast("fp16")], "m.onnx", "out.onnx",
                data="calib.npz")
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, Sequence

import onnx
import onnx_graphsurgeon as gs

from . import atomicfile, calib, finite, lazyscale, modelfile, opset_upgrade, ort, progress
from .cast import autocast
from .errors import OnnxoptError
from .pass_protocol import AwqChoice, Pass
from .settings import MEMORY_BUDGET_MB, PROVIDERS, RUN_SETTINGS, RunSettings

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(7, 24)
OPSET_UPGRADE = 13  # models below SUPPORTED_OPSETS are converted to this opset first


def _setting(name: str) -> property:
    """A read-only Context attribute that is the run's `settings.<name>`."""
    return property(lambda ctx: getattr(ctx.settings, name), doc=f"RunSettings.{name} of this run")


@dataclass
class Context:
    """What a pass sees: the graph it rewrites in place and the run's shared settings and state."""
    graph: gs.Graph
    data: calib.CalibData | None
    workdir: Path
    recipe: tuple
    settings: RunSettings = field(default_factory=RunSettings)
    high_precision: str = "fp32"   # precision of what is not quantized (the recipe's Autocast), for scale rounding
    report: dict = field(default_factory=dict)
    # Hand-offs between passes: what the AWQ pass chose for the Int4 pass after it, and the nodes a
    # quantizing pass needs kept in FP32 (weight scales below FP16's range) for Autocast.
    awq: AwqChoice | None = None
    fp32_nodes: list = field(default_factory=list)
    # `extra_reducers` (tensor name -> calib reducers) ride on the Q/DQ pass's one calibration pass.
    extra_reducers: dict = field(default_factory=dict)
    reference: onnx.ModelProto | None = None  # the FP32 source (lazy weights), for checks against it
    opset: int = 0                            # default-domain opset of the export (0: the model's)
    # Range-aware autocast: the quantizing pass fills these max |x| reducers in its one calibration pass
    # when the recipe's Autocast asks for ranges (None: nobody measured them).
    measure_ranges: bool = False
    range_reducers: dict | None = None
    rebuild: Callable | None = None           # Autocast's "convert again with these nodes in FP32" (finite repair)
    checks_outputs: bool = False              # the finite check will run the model (finite.runs_outputs), so a repair helps
    check_data: calib.CalibData | None = None  # generated samples when no data was given

    # The run's settings a pass reads most, read-only (ctx.settings has them all).
    provider = _setting("provider")
    memory_budget_mb = _setting("memory_budget_mb")
    progress = _setting("progress")
    threads = _setting("threads")

    def require_data(self, who: str) -> calib.CalibData:
        if self.data is None:
            raise OnnxoptError(f"{who} needs calibration data; pass --calib FILE.npz (or --calib-random N)")
        return self.data

    def following(self, pass_type: type, after: "Pass"):
        """The first pass of `pass_type` after `after` in the recipe (None if there is none)."""
        seen = False
        for p in self.recipe:
            if p is after:
                seen = True
            elif seen and isinstance(p, pass_type):
                return p
        return None


@dataclass
class Recipe:
    """Passes plus the data setting a model family needs (presets return these)."""
    passes: tuple
    max_batch: int | None = None   # split calibration feeds to at most this batch

    def __post_init__(self):
        self.passes = tuple(self.passes)


@dataclass
class Result:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    path: Path | None = None


def check_recipe(passes: Sequence) -> tuple:
    passes = tuple(passes)
    if not passes:
        raise OnnxoptError("empty recipe; give at least one pass, e.g. [QDQ('fp8'), Autocast('fp16')]")
    for p in passes:
        if not isinstance(p, Pass):
            raise OnnxoptError(f"{p!r} is not a pass (needs name, min_opset, needs_data, check_recipe and run); "
                               "use the classes in onnxopt.passes")
    for i, p in enumerate(passes):
        p.check_recipe(passes, i)
    return passes


def _positive(value, what: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise OnnxoptError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class Runner:
    """Runs a recipe on a model file (or ModelProto). All settings are checked when it is built, before any
    model is read. `verify(path, report)` (optional) runs after the save, e.g. a finite-output check."""
    recipe: Sequence
    data: object = None                     # .npz / .npy / directory path, or a calib.CalibData
    calib_random: int | None = None         # generate N samples instead of `data`
    seed: int = 0
    shapes: dict | None = None              # input name -> shape for generated data
    calib_batches: int | None = None        # use at most N calibration batches
    max_batch: int | None = None            # split calibration feeds to at most this batch
    provider: str = "cpu"
    allow_cpu_fallback: bool = False
    memory_budget_mb: int = MEMORY_BUDGET_MB
    progress: bool = True
    check_finite: bool = True               # run the written graph against the FP32 model before the save
    skip_nonfinite: bool = False            # leave out calibration samples holding inf/NaN (else an error)
    threads: int = 0                        # worker threads for per-weight numpy work (0: one per core)
    verify: Callable | None = None

    def __post_init__(self):
        if isinstance(self.recipe, Recipe):
            self.max_batch = self.max_batch if self.max_batch is not None else self.recipe.max_batch
            self.recipe = self.recipe.passes
        self.recipe = check_recipe(self.recipe)
        if self.data is not None and self.calib_random is not None:
            raise OnnxoptError("--calib and --calib-random both given; use one source of calibration data")
        if isinstance(self.data, (str, os.PathLike)) and not Path(self.data).exists():
            raise OnnxoptError(f"calibration data {self.data} does not exist; pass an .npz, .npy or a directory of .npz")
        if self.calib_batches is not None and self.calib_random is not None:
            raise OnnxoptError("--calib-batches limits --calib data; with --calib-random, N itself is the number of samples")
        if self.shapes and not self.calib_random:
            raise OnnxoptError("--shapes sets the shapes of generated data; use it with --calib-random N")
        _positive(self.calib_random, "--calib-random")
        _positive(self.calib_batches, "--calib-batches")
        _positive(self.max_batch, "--max-batch")
        _positive(self.memory_budget_mb, "--memory-budget")
        _positive(self.seed, "--seed", allow_zero=True)
        _positive(self.threads, "--threads", allow_zero=True)
        if self.provider not in PROVIDERS:
            raise OnnxoptError(f"unknown provider '{self.provider}'; use one of {', '.join(PROVIDERS)}")
        self.provider = _checked_provider(self.provider, self.allow_cpu_fallback)
        self.settings = RunSettings(self.provider, self.allow_cpu_fallback, self.memory_budget_mb, self.progress, self.seed,
                                    self.threads)
        if self.needs_data and self.data is None and not self.calib_random:
            who = ", ".join(p.name for p in self.recipe if p.needs_data)
            raise OnnxoptError(f"no calibration data; the {who} pass needs calibration data: pass --calib FILE.npz "
                               "(or a directory) or --calib-random N")

    @classmethod
    def from_settings(cls, recipe, settings: RunSettings, **data) -> "Runner":
        """The one way the package builds a Runner: `recipe` with the run's resources `settings` (made once from
        the CLI or the API); `data` are the calibration-data and check fields (data, calib_random, shapes,
        calib_batches, max_batch, skip_nonfinite, check_finite, verify)."""
        return cls(recipe, seed=settings.seed, provider=settings.provider, allow_cpu_fallback=settings.allow_cpu_fallback,
                   memory_budget_mb=settings.memory_budget_mb, progress=settings.progress, threads=settings.threads, **data)

    @property
    def needs_data(self) -> bool:
        return any(p.needs_data for p in self.recipe)

    @property
    def min_opset(self) -> int:
        return max(p.min_opset for p in self.recipe)

    def run(self, model, output=None) -> Result:
        """Run the recipe on `model` (path or ModelProto); save to `output` if given."""
        t0 = time.perf_counter()
        if output is not None and not isinstance(model, onnx.ModelProto):
            atomicfile.check_output_path(output, model)
        # New weights (2:4, SmoothQuant, quantized, FP16) spill to the work directory and stay lazy.
        with tempfile.TemporaryDirectory(prefix="onnxopt-") as work, modelfile.spilling(work):
            return self._run(model, output, Path(work), t0)

    def _run(self, model, output, work: Path, t0: float) -> Result:
        m = load(model, self.min_opset, work)
        fp32 = fp32_source(m)
        data = self._data(fp32) if (self.needs_data or self.data is not None or self.calib_random) else None
        report: dict = {"recipe": [describe(p) for p in self.recipe], "timings_s": {}}
        if data is not None and data.skipped:
            report["skipped_nonfinite"] = data.skipped
            log.warning("left out %d calibration sample(s) holding inf or NaN (--skip-nonfinite)", data.skipped)
        ctx = Context(modelfile.import_graph(fp32), data, work, self.recipe, self.settings,
                      high_precision=_high_precision(self.recipe), report=report, reference=fp32,
                      opset=self.min_opset, measure_ranges=any(getattr(p, "wants_ranges", False) for p in self.recipe),
                      checks_outputs=finite.runs_outputs(fp32, self.memory_budget_mb))
        del m
        timings = report["timings_s"]
        timings["load"] = time.perf_counter() - t0
        # The passes' calibration sessions share one device copy of the weights (ort.device_weights) only where the
        # SmoothQuant products are computed in the graph (lazyscale.in_graph), i.e. where the second pass reads the
        # same bytes: otherwise nothing is shared and the copy only holds every weight on the device (H100, full-size
        # SDXL --int8: 1bcd316, sharing on, 3.20 GiB peak RSS and 24.7 GB GPU; 8775b59, none, 2.25 GiB and 7.7 GB).
        shares = lazyscale.in_graph(self.settings.provider)
        with ort.device_weights(self.settings.provider) if shares else contextlib.nullcontext():
            for p in self.recipe:
                t = time.perf_counter()
                log.info("pass %s", p.name)
                with progress.stage(f"pass {p.name}", self.progress):
                    report[p.name] = section = p.run(ctx)
                timings[p.name] = time.perf_counter() - t
                if isinstance(section, dict) and "coverage" in section:
                    report["coverage"] = section["coverage"]  # the quantizing pass's layer counts
        t = time.perf_counter()
        out = modelfile.export_graph(ctx.graph, opset=self.min_opset or None)
        ctx.graph = None  # the exported protobuf now owns the weights; keep one copy
        gc.collect()      # graphsurgeon graphs are cyclic: free their arrays now, not at some later collection
        timings["export"] = time.perf_counter() - t
        if self.check_finite:
            t = time.perf_counter()
            with progress.stage("finite-output check", self.progress):
                out, report["finite"] = self._check_finite(fp32, out, ctx)
            timings["finite_check"] = time.perf_counter() - t
        ctx.rebuild = None
        del fp32
        path = None
        if output is not None:
            t = time.perf_counter()
            with progress.stage(f"saving {output}", self.progress):
                path = modelfile.save(out, output, input_path=None if isinstance(model, onnx.ModelProto) else model)
            timings["save"] = time.perf_counter() - t
            # `out` now reads its weights from the saved file rather than the work directory (no reload: a model
            # saved as one file would be read whole)
            report["output_bytes"] = output_bytes(path)
            if self.verify is not None:
                t = time.perf_counter()
                report["verify"] = self.verify(path, report)
                timings["verify"] = time.perf_counter() - t
        else:
            modelfile.internalize(out)  # the work directory is about to go
        timings["total"] = time.perf_counter() - t0
        report["breakdown_s"] = breakdown(report, self.recipe)
        log.info("timings: %s", ", ".join(f"{k} {v:.1f} s" for k, v in report["breakdown_s"].items()))
        return Result(out, report, path)

    def _check_finite(self, reference: onnx.ModelProto, out: onnx.ModelProto, ctx: Context):
        """A valid graph whose outputs are finite where the FP32 model's are (onnxopt.finite): else the
        Autocast pass's rebuild widens the FP32 region, or the run ends with one error line."""
        data = ctx.data if ctx.data is not None else ctx.check_data
        if data is None:
            return out, {"checked": "load only (no data to run)", "loaded": finite.check_loads(out, ctx.provider)}
        return finite.verify(reference, out, data, ctx.rebuild, provider=ctx.provider, memory_budget_mb=self.memory_budget_mb)

    def _data(self, model: onnx.ModelProto) -> calib.CalibData | None:
        if isinstance(self.data, calib.CalibData):
            return self.data
        specs = calib.input_specs(model)
        if self.data is not None:
            return calib.CalibData.from_path(self.data, specs, limit=self.calib_batches, max_batch=self.max_batch,
                                             skip_nonfinite=self.skip_nonfinite)
        if self.calib_random:
            return calib.CalibData.random(specs, self.calib_random, seed=self.seed, shapes=self.shapes,
                                          max_batch=self.max_batch)
        return None


def run(recipe, model, output=None, *, data=None, **settings) -> Result:
    """Run `recipe` (a list of passes or a Recipe) on `model` and save to `output`. `settings` are Runner
    fields: calib_random, seed, shapes, calib_batches, max_batch, provider, memory_budget_mb, progress."""
    resources = {k: settings.pop(k) for k in RUN_SETTINGS if k in settings}
    return Runner.from_settings(recipe, RunSettings(**resources), data=data, **settings).run(model, output)


def _checked_provider(name: str, allow_fallback: bool) -> str:
    """An unavailable provider is an error before any work (or "cpu" with the fallback allowed), once
    `ort.check_provider(name, allow_fallback) -> [ORT provider names]` is there."""
    check = getattr(ort, "check_provider", None)
    if check is None or name == "cpu":
        return name
    return name if "CUDAExecutionProvider" in check(name, allow_fallback) else "cpu"


# A pass's own timings_s keys -> the phase of the run's breakdown they belong to.
PHASES = ("load", "calibrate", "plan", "search", "write", "check", "save")
_PASS_PHASES = {"calibrate": "calibrate", "statistics": "calibrate", "sensitivity": "search", "search": "search",
                "choose_verify": "search", "insert": "write", "write": "write", "fold": "write"}


def breakdown(report: dict, recipe) -> dict:
    """The run's seconds by phase (PHASES, then total) from the report's timings: load; each pass's own
    calibrate / search / write timings, the rest of the pass (placement rules, rewrites, statistics it does
    not time separately) as plan; the graph's export as write; the finite-output check and the verification after the save as check; save."""
    t = report.get("timings_s", {})
    out = dict.fromkeys(PHASES, 0.0)
    out["load"] = t.get("load", 0.0)
    for p in recipe:
        total = t.get(p.name, 0.0)
        inner = (report.get(p.name) or {}).get("timings_s") if isinstance(report.get(p.name), dict) else None
        known = 0.0
        for k, v in (inner or {}).items():
            if k in _PASS_PHASES and isinstance(v, (int, float)):
                out[_PASS_PHASES[k]] += v
                known += v
        out["plan"] += max(total - known, 0.0)
    out["write"] += t.get("export", 0.0)
    out["check"] = t.get("finite_check", 0.0) + t.get("verify", 0.0)
    out["save"] = t.get("save", 0.0)
    out["total"] = t.get("total", sum(out.values()))
    return {k: round(v, 3) for k, v in out.items()}


def describe(p) -> dict:
    opts = asdict(p) if is_dataclass(p) else {}
    return {"pass": p.name, **opts}


def _high_precision(recipe) -> str:
    """The precision the recipe's autocast pass gives the unquantized rest (scales are rounded to it)."""
    return next((p.high_precision for p in recipe if getattr(p, "high_precision", None)), "fp32")


def output_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ---------------------------------------------------------------- loading
def load(model, min_opset: int = 0, workdir=None) -> onnx.ModelProto:
    """Load (lazily), check the opset and raise it to `min_opset`, infer shapes. Big embedded weights move to
    an external file in `workdir` first, so that no pass copies them."""
    m = model if isinstance(model, onnx.ModelProto) else modelfile.load(model)
    if workdir is not None:
        m = modelfile.externalize_if_large(m, workdir, copy=isinstance(model, onnx.ModelProto))
    opset = opset_upgrade.opset_of(m)
    if 0 < opset < SUPPORTED_OPSETS.start:
        m = opset_upgrade.upgrade_opset(m, max(min_opset, OPSET_UPGRADE))
        opset = opset_upgrade.opset_of(m)
    if opset not in SUPPORTED_OPSETS:
        raise OnnxoptError(f"opset {opset} is not supported (need {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}); "
                           "re-export the model with opset 17")
    if opset < min_opset:
        m = convert_opset(m, min_opset)
    return opset_upgrade.infer_shapes(m)


def convert_opset(m: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Raise the default-domain opset. When no op of the model changed between the two versions, only the
    import changes (fast on big graphs); otherwise onnx's version converter rewrites the nodes."""
    from onnx import defs, version_converter
    current = opset_upgrade.opset_of(m)
    ops = {n.op_type for n in m.graph.node if n.domain in ("", "ai.onnx")}
    try:
        unchanged = all(defs.get_schema(op, target).since_version <= current for op in ops)
    except Exception:
        unchanged = False
    if unchanged:
        out = onnx.ModelProto()
        out.CopyFrom(m)
        for o in out.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
        log.info("raised opset %d -> %d (no op changed)", current, target)
        return out
    try:
        out = version_converter.convert_version(m, target)
    except Exception as e:
        raise OnnxoptError(f"cannot convert opset {current} to {target} ({str(e).splitlines()[0][:120]}); "
                           f"re-export the model with opset {target}") from None
    log.info("converted opset %d -> %d", current, target)
    return out


def fp32_source(m: onnx.ModelProto) -> onnx.ModelProto:
    """FP16/BF16 input models are calibrated and rewritten through their FP32 view."""
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if any(t.data_type in low for t in m.graph.initializer) or any(v.type.tensor_type.elem_type in low for v in m.graph.input):
        log.info("low-precision input model: working on its FP32 view")
        return opset_upgrade.infer_shapes(autocast.fp32_view(m))
    return m
