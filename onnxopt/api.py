"""The Python API of `onnxopt quantize`: QuantConfig (its flat option set), the recipe of passes it stands for
(`recipe`), the Runner that runs it (`runner`), and the file-level functions `quantize`, `convert` and
`sparsify_model`. Model-family QuantConfigs (`--preset`) are in `onnxopt.presets`.

`recipe(config)` turns a config into passes: [Sparsify] -> [SmoothQuant] -> [LowRank] -> QDQ | [AWQ] -> [LowRank]
-> Int4 -> Autocast; `runner(config, ...)` adds the data and the run's resources (settings.RunSettings).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from . import calib, pipeline
from . import formats as registry
from .errors import OnnxoptError
from .sampler import SamplerOptions
from .passes import AWQ, QDQ, Autocast, AutoQuant, BlockFP, Int4, LowRank, SmoothQuant, Sparsify
from .settings import MEMORY_BUDGET_MB, RunSettings

MODES = registry.modes()
DEFAULT_METHOD = {m: registry.get(m).calib_method for m in MODES if registry.get(m).calib_method}
MIN_OPSET = {m: max(registry.get(m).min_opset, QDQ.min_opset) for m in MODES}
QuantResult = pipeline.Result


@dataclass
class QuantConfig:
    mode: str = registry.FP8.name               # one of registry.modes()
    weight_only: bool = False                  # nvfp4: FP4 weights, FP16 activations (W4A16)
    calib_method: str | None = None            # "max" | "percentile" | "entropy" | "mse"; None = mode default
    percentile: float = 99.99
    exclude: tuple = ()                        # regexes on node names
    op_types: tuple = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    high_precision: str = registry.FP16.name    # one of registry.high_precision()
    io_dtype: str | None = None                # None keeps graph I/O dtypes
    quantize_mha: bool = True                  # Q/DQ on attention BMMs (Q·Kᵀ, softmax·V)
    keep_fp32_ops: tuple = ()                  # op types autocast leaves in FP32
    bias_correction: bool = True               # fold -ΔW·E[x] of weight quantization into the bias
    shared_rounding: bool = True               # a weight read by several layers: rounded for all its uses
    shared_lead_high_precision: bool = True    # layers up to a shared weight's first use stay high precision
    weight_rounding: str | None = None         # INT8/FP8 weights: "nearest" | "feedback" (GPTQ); None = the format's
    smoothquant: float | str | None = None     # alpha, "auto", or None
    smoothquant_op_types: tuple | None = None  # the layers SmoothQuant smooths; None: op_types (`--int8`'s default: GEMMs)
    lowrank: int | str | None = None           # low-rank branch: rank, "auto", or None (off)
    lowrank_budget: float | None = None        # --lowrank auto: extra bytes / quantized weight bytes (default 0.1)
    awq: str = "full"                          # int4 / nvfp4 weights: "none" | "lite" | "clip" | "full"
    block_size: int | None = None              # int4: along K (0 = per-channel); None: the format's (INT4: 128)
    int8_layers: str | None = None             # int4: regex of layers kept at per-channel INT8 weights
    sparsity: str | None = None                # "2:4": sparsify before quantization
    sparsity_method: str = "magnitude"         # "magnitude" | "sparsegpt"
    provider: str = "cpu"                      # calibration execution provider
    memory_budget_mb: int = MEMORY_BUDGET_MB               # calibration: weights held at once (else stages), whole activations per pass
    calib_batches: int | None = None           # use at most this many calibration batches
    calib_max_batch: int | None = None         # split calibration feeds to at most this batch (bounds activations)
    progress: bool = True
    auto: bool = False                         # per-layer format search (AutoQuant) instead of one mode
    formats: tuple = registry.auto_defaults()   # --auto: candidate formats besides FP16
    target_cosine: float | None = None         # --auto targets (exactly one)
    target_top1: float | None = None
    bits: float | None = None
    target_psnr: float | None = None           # --auto --target-psnr: on the sampler's final samples
    sampler: SamplerOptions | None = None      # with target_psnr: the loop and its held-out seeds
    psnr_of: str | None = None                 # with target_psnr: "mean" (default) or "worst" held-out seed
    sensitivity: str | None = None             # --auto: saved sensitivities (restartable search)
    cost_model: str = "bits"                   # --auto: "bits", or "rtx" (TensorRT-RTX engine reports)
    engine_shapes: tuple = ()                  # --cost-model rtx: "name:1x31" or "name:MIN/OPT/MAX" to build for
    auto_stages: int | None = None             # --auto: stages of the staged evaluation (None/0: auto)

    def __post_init__(self):
        if self.mode not in MODES:
            raise OnnxoptError(f"unknown mode '{self.mode}'; use one of {', '.join(MODES)}")
        if self.calib_method is not None and self.calib_method not in calib.METHODS:
            raise OnnxoptError(f"unknown calibration method '{self.calib_method}'; use one of {', '.join(calib.METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise OnnxoptError(f"percentile {self.percentile} is out of range; use a value in (0, 100], e.g. 99.99")
        if self.high_precision not in registry.high_precision():
            raise OnnxoptError(f"unknown --high-precision '{self.high_precision}'; use {', '.join(registry.high_precision())}")
        self.exclude = tuple(self.exclude or ())
        self.op_types = tuple(self.op_types)

    def run_settings(self, *, allow_cpu_fallback: bool = False, seed: int = 0) -> RunSettings:
        """The run's resources this config holds (provider, memory budget, progress) with the API's others."""
        return RunSettings(provider=self.provider, allow_cpu_fallback=allow_cpu_fallback,
                           memory_budget_mb=self.memory_budget_mb, progress=self.progress, seed=seed)

    @property
    def method(self) -> str:
        return self.calib_method or registry.get(self.mode).calib_method or "max"


def recipe(config: QuantConfig) -> pipeline.Recipe:
    """The passes `config` stands for, each checked as it is built."""
    c = config
    passes = []
    if c.sparsity:
        passes.append(Sparsify(c.sparsity, method=c.sparsity_method, exclude=c.exclude))
    if c.auto:
        passes.append(AutoQuant(tuple(c.formats), target_cosine=c.target_cosine, target_top1=c.target_top1, bits=c.bits,
                                target_psnr=c.target_psnr, sampler=c.sampler, psnr_of=c.psnr_of or "mean", sensitivity=c.sensitivity, cost_model=c.cost_model,
                                engine_shapes=c.engine_shapes, block_size=registry.INT4.block_size if c.block_size is None
                                else c.block_size, exclude=c.exclude,
                                op_types=c.op_types, quantize_mha=c.quantize_mha, stages=c.auto_stages or 0, lowrank=c.lowrank,
                                **({} if c.lowrank_budget is None else {"lowrank_budget": c.lowrank_budget})))
    elif c.mode in BlockFP.FORMATS:
        passes += _lowrank(c)
        passes.append(BlockFP(c.mode, weight_only=c.weight_only, awq=c.awq if registry.get(c.mode).awq else "none",
                              calib_method=c.calib_method, percentile=c.percentile,
                              exclude=c.exclude, op_types=c.op_types, quantize_mha=c.quantize_mha,
                              bias_correction=c.bias_correction))
    elif registry.get(c.mode).weight_only:
        if c.awq != "none" and registry.get(c.mode).awq:  # the default "full" means nothing to a format without AWQ
            passes.append(AWQ(c.awq))
        passes += _lowrank(c)
        passes.append(Int4(block_size=c.block_size, int8_layers=c.int8_layers, exclude=c.exclude, op_types=c.op_types,
                           format=c.mode))
    else:
        if c.smoothquant is not None:
            ops = c.op_types if c.smoothquant_op_types is None else tuple(o for o in c.op_types if o in c.smoothquant_op_types)
            passes.append(SmoothQuant(c.smoothquant, exclude=c.exclude, op_types=ops))
        passes += _lowrank(c)
        passes.append(QDQ(c.mode, calib_method=c.calib_method, percentile=c.percentile, exclude=c.exclude,
                          op_types=c.op_types, quantize_mha=c.quantize_mha, bias_correction=c.bias_correction,
                          shared_rounding=c.shared_rounding, weight_rounding=c.weight_rounding,
                          shared_lead_high_precision=c.shared_lead_high_precision))
    passes.append(Autocast(c.high_precision, io_dtype=c.io_dtype, keep_fp32_ops=c.keep_fp32_ops))
    return pipeline.Recipe(passes, max_batch=c.calib_max_batch)


def _lowrank(c: QuantConfig) -> list:
    if c.lowrank is None:
        return []
    return [LowRank(c.lowrank) if c.lowrank_budget is None else LowRank(c.lowrank, budget=c.lowrank_budget)]


def runner(config: QuantConfig, *, data=None, calib_random: int | None = None, seed: int = 0, shapes: dict | None = None,
           allow_cpu_fallback: bool = False) -> pipeline.Runner:
    """A Runner for `config`, fully checked (no model is read)."""
    return pipeline.Runner.from_settings(recipe(config), config.run_settings(allow_cpu_fallback=allow_cpu_fallback, seed=seed),
                                         data=data, calib_random=calib_random, shapes=shapes,
                                         calib_batches=config.calib_batches)


def quantize(model, output=None, *, config: QuantConfig | None = None, data=None, calib_random: int | None = None,
             seed: int = 0, shapes: dict | None = None) -> pipeline.Result:
    """Quantize `model` (path or ModelProto) and save it to `output` if given."""
    config = config or QuantConfig()
    res = runner(config, data=data, calib_random=calib_random, seed=seed, shapes=shapes).run(model, output)
    res.report = {"mode": config.mode, "config": asdict(config), **res.report}
    return res


def prepare(model, mode: str, workdir: str | None = None) -> onnx.ModelProto:
    """Load (lazily), check the opset and raise it to what `mode` needs, infer shapes."""
    return pipeline.load(model, MIN_OPSET[mode], workdir)


# ---------------------------------------------------------------- file-level API of single passes
def convert(model_path, output, dtype: str = registry.FP16.name, *, io_dtype: str | None = None, keep_fp32_ops=(),
            data=None, calib_random: int | None = None, shapes: dict | None = None, seed: int = 0,
            provider: str = "cpu", measure: bool = True, verify: bool = True, report: dict | None = None) -> Path:
    """The FP16 (or BF16) baseline of a model: `onnxopt convert model.onnx --fp16 -o out.onnx`.
    With calibration data (`data`: path or CalibData, or `calib_random` samples) the FP32 region follows
    measured ranges (a few generated samples serve where no data is given and the input shapes are static)
    and the written graph is checked for finite outputs (onnxopt.finite). `measure=False` skips the ranges,
    `verify=False` the check; `report`, if given, receives the run's report."""
    runner = pipeline.Runner.from_settings([Autocast(dtype, io_dtype=io_dtype, keep_fp32_ops=keep_fp32_ops, measure_ranges=measure)],
                                           RunSettings(provider=provider, progress=False, seed=seed), data=data,
                                           calib_random=calib_random, shapes=shapes, check_finite=verify)
    res = runner.run(model_path, output)
    if report is not None:
        report.update(res.report)
    return res.path


def sparsify_model(input_path, output_path, *, data=None,
                   calib_limit: int | None = None, calib_random: int | None = None, shapes: dict | None = None,
                   seed: int = 0, provider: str = "cpu", memory_budget_mb: int = MEMORY_BUDGET_MB, progress: bool = True,
                   **options) -> dict:
    """File-level `sparsify`: load, prune, save (the input stays untouched). `data` may be a CalibData or a path
    (.npz, .npy, directory of .npz); `calib_random` generates that many random samples instead. `options` are
    the Sparsify pass's (pattern, method, exclude, min_params, damp, block, sequential)."""
    settings = RunSettings(provider=provider, memory_budget_mb=memory_budget_mb, progress=progress, seed=seed)
    runner = pipeline.Runner.from_settings([Sparsify(**options)], settings, data=data, calib_random=calib_random,
                                           shapes=shapes, calib_batches=calib_limit)
    return runner.run(input_path, output_path).report["sparsity"]
