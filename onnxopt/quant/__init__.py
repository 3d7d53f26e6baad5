"""quantize(): calibrate, place Q/DQ for TensorRT, autocast the rest, save.

Order of the passes (techniques stack): sparsify -> smooth -> calibrate -> Q/DQ -> autocast.
"""
from __future__ import annotations

import gc
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import autocast, calib, finite, io, precision
from .. import graph as G
from ..errors import OnnxoptError
from . import bias_correction, qdq, rules

log = logging.getLogger(__name__)

MODES = ("int8", "fp8", "int4")
DEFAULT_METHOD = {"fp8": "max", "int8": "mse"}
MIN_OPSET = {"int8": 19, "fp8": 19, "int4": 21}  # FP16 scales on Q/DQ need opset 19
SUPPORTED_OPSETS = range(7, 24)


@dataclass
class QuantConfig:
    mode: str = "fp8"                          # "int8" | "fp8" | "int4"
    calib_method: str | None = None            # "max" | "percentile" | "entropy" | "mse"; None = mode default
    percentile: float = 99.99
    exclude: tuple = ()                        # regexes on node names
    op_types: tuple = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    high_precision: str = "fp16"               # "fp16" | "bf16" | "fp32"
    io_dtype: str | None = None                # None keeps graph I/O dtypes
    quantize_mha: bool = True                  # Q/DQ on attention BMMs (Q·Kᵀ, softmax·V)
    keep_fp32_ops: tuple = ()                  # op types autocast leaves in FP32
    bias_correction: bool = True               # fold -ΔW·E[x] of weight quantization into the bias
    smoothquant: float | str | None = None     # alpha, "auto", or None
    awq: str = "full"                          # int4: "none" | "lite" | "clip" | "full"
    block_size: int = 128                      # int4; 0 = per-channel
    int8_layers: str | None = None             # int4: regex of layers kept at per-channel INT8 weights
    sparsity: str | None = None                # "2:4": sparsify before quantization
    sparsity_method: str = "magnitude"         # "magnitude" | "sparsegpt"
    provider: str = "cpu"                      # calibration execution provider
    memory_budget_mb: int = 4096               # calibration: weights held at once (else stages), whole activations per pass
    calib_batches: int | None = None           # use at most this many calibration batches
    calib_max_batch: int | None = None         # split calibration feeds to at most this batch (bounds activations)
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise OnnxoptError(f"unknown mode '{self.mode}'; use one of {', '.join(MODES)}")
        if self.calib_method is not None and self.calib_method not in calib.METHODS:
            raise OnnxoptError(f"unknown calibration method '{self.calib_method}'; use one of {', '.join(calib.METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise OnnxoptError(f"percentile {self.percentile} is out of range; use a value in (0, 100], e.g. 99.99")
        if self.high_precision not in autocast.DTYPES:
            raise OnnxoptError(f"unknown --high-precision '{self.high_precision}'; use fp16, bf16 or fp32")
        self.exclude = tuple(self.exclude or ())
        self.op_types = tuple(self.op_types)

    @property
    def method(self) -> str:
        return self.calib_method or DEFAULT_METHOD.get(self.mode, "max")


@dataclass
class QuantResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    path: Path | None = None


def prepare(model, mode: str, workdir: str | None = None) -> onnx.ModelProto:
    """Load (lazily), check the opset and raise it to what the mode needs, infer shapes.
    Big embedded weights move to an external file in `workdir` first, so that no pass copies them."""
    m = model if isinstance(model, onnx.ModelProto) else io.load(model)
    if workdir is not None:
        m = io.externalize_if_large(m, workdir, copy=isinstance(model, onnx.ModelProto))
    opset = io.opset_of(m)
    if opset not in SUPPORTED_OPSETS:
        raise OnnxoptError(f"opset {opset} is not supported (need {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}); re-export the model with opset 17")
    need = MIN_OPSET[mode]
    if opset < need:
        m = _convert_opset(m, need)
    return io.infer_shapes(m)


def _convert_opset(m: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Raise the default-domain opset. When no op of the model changed between the two versions, only the
    import changes (fast on big graphs); otherwise onnx's version converter rewrites the nodes."""
    from onnx import defs, version_converter
    current = io.opset_of(m)
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
        raise OnnxoptError(f"cannot convert opset {io.opset_of(m)} to {target} ({str(e).splitlines()[0][:120]}); re-export the model with opset {target}") from None
    log.info("converted opset %d -> %d", io.opset_of(m), target)
    return out


def load_data(data, model: onnx.ModelProto, *, calib_random: int | None = None, seed: int = 0,
              shapes: dict | None = None, limit: int | None = None, max_batch: int | None = None) -> calib.CalibData:
    specs = calib.input_specs(model)
    if isinstance(data, calib.CalibData):
        return data
    if data is not None:
        return calib.CalibData.from_path(data, specs, limit=limit, max_batch=max_batch)
    if calib_random:
        return calib.CalibData.random(specs, calib_random, seed=seed, shapes=shapes, max_batch=max_batch)
    raise OnnxoptError("no calibration data; pass --calib FILE.npz (or a directory) or --calib-random N")


def quantize(model, output=None, *, config: QuantConfig | None = None, data=None, calib_random: int | None = None,
             seed: int = 0, shapes: dict | None = None) -> QuantResult:
    """Quantize `model` (path or ModelProto) and save it to `output` if given."""
    config = config or QuantConfig()
    t0 = time.perf_counter()
    if output is not None and not isinstance(model, onnx.ModelProto):
        io.check_output_path(output, model)
    # New weights (2:4, SmoothQuant, quantized, FP16) spill to the work directory and stay lazy.
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as work, io.spilling(work):
        return _quantize(model, output, config, data, calib_random, seed, shapes, work, t0)


def _quantize(model, output, config, data, calib_random, seed, shapes, work, t0) -> QuantResult:
    m = prepare(model, config.mode, work)
    fp32 = _fp32_source(m)
    data = load_data(data, fp32, calib_random=calib_random, seed=seed, shapes=shapes, limit=config.calib_batches,
                     max_batch=config.calib_max_batch)
    graph = io.import_graph(fp32)
    report: dict = {"mode": config.mode, "config": {k: v for k, v in asdict(config).items()}}
    timings = report.setdefault("timings_s", {})

    if config.sparsity:
        from .. import sparsity
        t = time.perf_counter()
        report["sparsity"] = sparsity.sparsify(graph, pattern=config.sparsity, method=config.sparsity_method, data=data,
                                               exclude=config.exclude, provider=config.provider,
                                               memory_budget_mb=config.memory_budget_mb, progress=config.progress)
        timings["sparsify"] = time.perf_counter() - t

    ranges = None  # INT4 calibrates elsewhere: the finite check covers it (issue 10)
    if config.mode == "int4":
        from . import int4
        t = time.perf_counter()
        report["int4"] = int4.quantize_int4(graph, data, config)
        timings["int4"] = time.perf_counter() - t
    else:
        ranges = _quantize_w8a8(graph, data, config, report)

    t = time.perf_counter()
    # The graph before autocast, for the finite repair (issue 10); big models get the checker only.
    before_autocast = io.export_graph(graph, opset=MIN_OPSET[config.mode]) if finite.runs_outputs(fp32, config.memory_budget_mb) else None
    # Range-aware autocast (issue 10): W8A8 measured the ranges in its calibration pass; INT4 relies on the finite check.
    report["autocast"] = autocast.to_low_precision(graph, config.high_precision, io_dtype=config.io_dtype,
                                                   keep_fp32_ops=config.keep_fp32_ops, ranges=ranges,
                                                   keep_fp32_nodes=tuple(report.get("fp32_scale_layers", ())))
    timings["autocast"] = time.perf_counter() - t
    out = io.export_graph(graph, opset=MIN_OPSET[config.mode])
    del graph  # the exported protobuf now owns the weights; keep one copy
    gc.collect()  # graphsurgeon graphs are cyclic: free their arrays now, not at some later collection
    # Finite-output guarantee (issue 10): valid graph, finite where FP32 is; widen the FP32 region if not.
    t = time.perf_counter()
    rebuild = None if before_autocast is None else autocast.reconverter(
        before_autocast, config.high_precision, io_dtype=config.io_dtype, keep_fp32_ops=config.keep_fp32_ops,
        ranges=ranges, opset=MIN_OPSET[config.mode], keep_fp32_nodes=tuple(report.get("fp32_scale_layers", ())))
    out, report["finite"] = finite.verify(fp32, out, data, rebuild, provider=config.provider,
                                          memory_budget_mb=config.memory_budget_mb)
    del before_autocast
    timings["finite_check"] = time.perf_counter() - t
    path = None
    if output is not None:
        t = time.perf_counter()
        path = io.save(out, output, input_path=None if isinstance(model, onnx.ModelProto) else model)
        timings["save"] = time.perf_counter() - t
        out = io.load(path)  # lazy again, pointing at the saved file rather than the work directory
    else:
        io.internalize(out)  # the work directory is about to go
    timings["total"] = time.perf_counter() - t0
    return QuantResult(out, report, path)


def _fp32_source(m: onnx.ModelProto) -> onnx.ModelProto:
    """FP16/BF16 input models are calibrated and rewritten through their FP32 view."""
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if any(t.data_type in low for t in m.graph.initializer) or any(v.type.tensor_type.elem_type in low for v in m.graph.input):
        log.info("low-precision input model: working on its FP32 view")
        return io.infer_shapes(autocast.fp32_view(m))
    return m


def _quantize_w8a8(graph: gs.Graph, data: calib.CalibData, config: QuantConfig, report: dict) -> dict:
    """Calibrate, place Q/DQ; returns the measured max |x| of the float tensors (for range-aware autocast)."""
    timings = report["timings_s"]
    plan = rules.plan(graph, config)
    if not plan.nodes:
        reasons = sorted(set(plan.skipped.values()))[:3]
        raise OnnxoptError("nothing to quantize: no Conv, ConvTranspose, MatMul or Gemm passes the placement rules"
                           + (f" ({'; '.join(reasons)})" if reasons else "") + "; nothing was written")
    if config.smoothquant is not None:
        if config.mode != "int8":
            raise OnnxoptError("--smoothquant applies to --int8 only")
        from .. import smoothquant
        t = time.perf_counter()
        report["smoothquant"] = smoothquant.smooth(graph, data, plan, config)
        timings["smoothquant"] = time.perf_counter() - t
        plan = rules.plan(graph, config)

    t = time.perf_counter()
    range_r = precision.range_reducers(graph)  # merged into the same pass
    amax, means = calibrate(graph, data, plan, config, extra=range_r)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    tensors = graph.tensors()
    layers = {}
    inputs_before_qdq = {id(n): n.inputs[0].name for n in plan.nodes}
    for name, uses in plan.activations.items():
        scale = qdq.activation_scale(amax[name], config.mode, config.high_precision)
        qdq.insert_activation_qdq(graph, tensors[name], uses, scale, config.mode)
    done: dict[str, gs.Variable] = {}
    shared = {c.name for _, _, c, _ in plan.weights if len(c.outputs) > 1}
    for node, idx, const, axis in plan.weights:
        key = const.name
        if key not in done:
            src = node.inputs[idx]
            values = _fold_chain(src) if src is not const else None
            mean = means.get(inputs_before_qdq[id(node)]) if key not in shared else None
            corrected = {}

            def on_error(w, w_deq, node=node, mean=mean):
                if mean is not None:
                    corrected["bias_correction"] = bias_correction.apply(graph, node, w, w_deq, mean)
            done[key], info = qdq.quantize_weight(graph, const, axis, config.mode, config.high_precision, values,
                                                  on_error=on_error if mean is not None else None)
            layers[node.name] = {**info, **corrected}
        node.inputs[idx] = done[key]
    timings["qdq"] = time.perf_counter() - t
    report["layers"] = {n.name: {"op": n.op, **layers.get(n.name, {})} for n in plan.nodes}
    # Layers whose weight scales underflow FP16 stay FP32 (issue 10): autocast reads this list.
    report["fp32_scale_layers"] = [n for n, info in layers.items() if "fp32_scale" in info]
    report["activations"] = {k: float(v) for k, v in amax.items()}
    report["skipped"] = plan.skipped
    report["coverage"] = {"quantized": len(plan.nodes), "skipped": len(plan.skipped)}
    log.info("quantized %d layers (%d activations, %d weights), skipped %d", len(plan.nodes),
             len(plan.activations), len(plan.weights), len(plan.skipped))
    return precision.ranges_of(range_r)


def _fold_chain(t: gs.Tensor) -> np.ndarray:
    """Values of a weight seen through Cast/Transpose/Identity, so the quantized initializer is what the layer consumes."""
    const, chain = G.weight_of(t)
    w = G.read_values(const)
    for node in reversed(chain):
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            w = np.transpose(w, perm) if perm is not None else w.T
        elif node.op == "Cast":
            w = w.astype(np.float32)
    return w


def calibrate(graph: gs.Graph, data: calib.CalibData, plan: rules.Plan, config: QuantConfig, extra: dict | None = None):
    """Clip range of each planned activation, by the configured method (Concat groups share the largest),
    and, for bias correction, the per-channel mean of each weighted layer's input. One pass over the data."""
    method = config.method
    def reducer():
        if method == "max":
            return calib.AbsMax()
        if method == "percentile":  # exact, from the top values each batch keeps in the graph
            return calib.TopAbs(config.percentile)
        return calib.Histogram()
    ranges = {n: reducer() for n in plan.activations if n not in plan.fixed_amax}
    mean_r = {}
    if config.bias_correction:
        for node, _, _, _ in plan.weights:
            if node.op not in bias_correction.OPS:
                continue
            mean_r.setdefault(node.inputs[0].name, calib.ChannelMean(bias_correction.input_axis(node),
                                                                     bias_correction.input_rank(node)))
    reducers: dict[str, list] = {}
    for group in (ranges, mean_r):
        for n, r in group.items():
            reducers.setdefault(n, []).append(r)
    for n, rs in (extra or {}).items():  # more reducers riding on the same pass (autocast ranges)
        reducers.setdefault(n, []).extend(rs)
    calib.collect_graph(graph, data, reducers, provider=config.provider, memory_budget_mb=config.memory_budget_mb,
                        progress=config.progress)
    amax = dict(plan.fixed_amax)
    for name, r in ranges.items():
        amax[name] = calib.amax_from_histogram(r, method, config.mode) if isinstance(r, calib.Histogram) else r.value
    for group in plan.shared_scales:
        shared = max(amax[n] for n in group)
        for n in group:
            amax[n] = shared
    return amax, {n: r.value for n, r in mean_r.items() if r.value is not None}
