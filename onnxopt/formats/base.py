"""The `Format` interface: everything onnxopt knows about one number format, in one object.

A format is registered by name (`onnxopt.formats.register`) and looked up with `formats.get(name)`; the
rest of the package asks it, never spells its constants or tests its name. To add a format, write one
module under `onnxopt/formats/` that builds an instance of `Format` (or of a subclass overriding the
numerics), and add it to the `register` loop at the end of `formats/__init__.py`. Then, with no other edit:

- `onnxopt quantize --<name>` exists if `mode` is true (cli/quantize.py makes one flag per mode). A `planned`
  format with `activations == "static"` runs through the QDQ pass: TensorRT's placement rules (quant/rules.py)
  decide the layers, activations get calibrated per-tensor Q/DQ (`write_activation`), weights per-channel
  DequantizeLinear (`quantize_weight` + `write_weight`), bias correction if `bias_correction`. Any other mode
  runs through the per-layer pass (passes/weight_only.py `Int4(format=name)`): every MatMul/Gemm with a 2-D constant
  weight gets `quantize_weight(w, axis, block_size=...)` behind a (blocked) DequantizeLinear, and, where
  `activations == "dynamic"` (NVFP4, MXFP8), the nodes of `write_dynamic_activation` on the layer's input.
- `--auto` offers it per layer if `auto` is true, at `cost_weight_bits` / `cost_activation_bits`; the gated
  graph and the final graph both use `quantize_weight`/`dequantize` through quant/writer.py's `fake_weight`.
- calibration measures static activation ranges with `calib_method` ("max" | "percentile" | "entropy" | "mse");
  the mse/entropy clip search simulates `cast`/`to_float` of `clip_qtype`.
- `inspect` and the engine report name it from a DequantizeLinear's stored type (`recognises`:
  `storage_names`, and `scale_names` where the codes' type is shared, e.g. E4M3 codes with E8M0 scales) and from
  TensorRT's kernel datatype strings (`engine_precisions`, e.g. "FP8", "Int4", "FP4").
- Placement that differs from INT8/FP8 in TensorRT (say, only MatMul/Gemm) is a rule in quant/rules.py.

Numerics contract (tests compare with ORT at ORT_DISABLE_ALL): `cast(x / scale)` gives exactly the codes
QuantizeLinear gives (round half to even, saturate to [qmin, qmax]); `to_float(codes) * scale` exactly what
DequantizeLinear gives; `fake_quant` is their composition with the scales `quantize_weight` picks, so the
gated graph of `--auto` and the final graph cannot disagree. Scales are float32, rounded to FP16 by
`round_scale` when the graph's high precision is "fp16" (the engine holds them so); a format whose scales are
themselves a low-precision type (E8M0, FP8) rounds them in `quantize_weight` and writes them in
`write_weight`/`weight_constant`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal FP16: scales below it lose precision
FP16_MAX = float(np.finfo(np.float16).max)


def round_scale(scale, high_precision: str) -> np.ndarray:
    """Scales as the engine will hold them: FP16 graphs keep FP16 scales, so quantize with exactly those."""
    scale = np.asarray(scale, dtype=np.float32)
    if high_precision == "fp16":
        # A scale beyond FP16's range (amax > qmax x 65504) stays FP32, as does the island autocast keeps around it
        # (precision.plan_fp32: such a Q/DQ pair's range exceeds FP16); rounding it would give inf (issue 22).
        fits = scale <= FP16_MAX
        low = np.clip(np.maximum(scale, FP16_TINY), 0, FP16_MAX).astype(np.float16).astype(np.float32)
        scale = np.where(fits, low, scale).astype(np.float32)
    return scale


def scales_underflow(amax: np.ndarray, raw_scale: np.ndarray, high_precision: str) -> bool:
    """Whether per-channel scales below FP16's normal range hold most of the weight energy (most of the layer,
    not a few weak channels): such a layer keeps FP32 scales, and so stays FP32 itself (issue 10)."""
    if high_precision != "fp16":
        return False
    energy = np.square(np.asarray(amax, np.float64).reshape(-1))
    return float(energy[np.asarray(raw_scale).reshape(-1) < FP16_TINY].sum()) > 0.5 * float(energy.sum())


@dataclass(frozen=True)
class Format:
    """One number format. Fields are facts; methods are the numerics and the ONNX form.

    Defaults describe a symmetric, zero-point-0, scaled format with per-output-channel weights and per-tensor
    static activations (INT8, FP8 E4M3); a blocked or weight-only format overrides `weights`, `activations`
    and `quantize_weight`/`dequantize`; a high-precision float (FP16, BF16) sets `quantized=False`.
    """
    name: str                       # registry key and CLI spelling: "fp8", "int8", "int4", "fp16"
    bits: int                       # bits per stored element (4 for INT4: two codes per byte)
    qmax: float                     # largest code magnitude: 448 (E4M3), 127 (INT8), 7 (INT4); FP16's max for floats
    qmin: float                     # most negative code: -448, -127, -8
    np_dtype: np.dtype              # numpy/ml_dtypes storage type of the codes (the Q output / DQ input)
    onnx_type: int                  # onnx.TensorProto data type of the same
    description: str = ""           # one line for help texts
    quantized: bool = True          # False for FP16/BF16: values are cast, not scaled
    weights: str = "per-channel"    # weight granularity: "per-channel" | "per-block" | "none"
    activations: str = "static"     # "static" (calibrated per-tensor Q/DQ) | "dynamic" (per-block at run time) | "none"
    block_size: int = 0             # default block (per-block weights or dynamic activations); 0 = none
    calib_method: str = "max"       # default activation calibration method ("max" | "percentile" | "entropy" | "mse")
    calib_qtype: str = ""           # which quantizer the mse/entropy clip search simulates (a format name; "" = own)
    smoothquant: bool = False       # SmoothQuant (activation outliers folded into weights) helps/applies
    smoothquant_default: tuple = ()  # op types `quantize` smooths (alpha auto, with the shift) unless told otherwise
    awq: bool = False               # AWQ (activation-aware weight scaling and clipping) applies
    bias_correction: bool = True    # the writer folds −ΔW·E[x] of weight quantization into the bias
    weight_rounding: str = "nearest"  # per-channel weights: "nearest" | "feedback" (GPTQ from calibration, quant.feedback)
    denoiser_recipe: bool = False   # on a diffusion denoiser (onnxopt.denoiser) `quantize` defaults to its quality recipe
    mode: bool = False              # a uniform mode of `onnxopt quantize` (--<name>)
    auto: bool = False              # a candidate of `--auto`
    auto_default: bool = False      # in `--auto`'s default candidate list
    planned: bool = False           # has a placement plan of its own (quant.rules for static activations)
    base: str = ""                  # a variant of another format (int8-sq is INT8 after SmoothQuant): its name
    auto_with_base: bool = False    # `--auto` offers this variant with its base (int8 brings int8-sq; formats.auto_with_variants)
    auto_beside: str = ""           # `--auto` offers this format whenever the named one is a candidate (nvfp4 brings nvfp4-wo)
    weight_bits: float = 0.0        # --auto cost: bits per weight parameter (0: = bits)
    activation_bits: float = 0.0    # --auto cost: bits per activation element (weight-only: 16)
    min_opset: int = 19             # opset its ONNX form needs (FP16 scales on Q/DQ: 19; blocked DQ: 21)
    weight_only_variant: bool = False  # also comes weight-only (--weight-only: NVFP4 W4A16)
    awq_ratios_above: tuple = ()    # block-range ratios above 1 AWQ's clip search also tries (scales rounded down clip)
    dequantize_op: str = "DequantizeLinear"  # op type dequantizing it (MXFP8: TensorRT's own)
    dynamic_op: str = ""            # op type quantizing its activations at run time ("" = none)
    storage_names: tuple = ()       # numpy dtype names of DQ inputs that mean this format ("int8", "uint8")
    scale_names: tuple = ()         # scale dtype names that go with them (empty: any)
    engine_precisions: tuple = ()   # TensorRT kernel datatype strings ("Int8", "UInt8")
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # format-specific facts

    # ------------------------------------------------------------ derived facts
    @property
    def cost_weight_bits(self) -> float:
        """Bits per weight parameter --auto charges."""
        return self.weight_bits or float(self.bits)

    @property
    def cost_activation_bits(self) -> float:
        """Bits per activation element --auto charges (16 where activations stay FP16)."""
        return self.activation_bits or (float(self.bits) if self.activations != "none" else 16.0)

    @property
    def weight_only(self) -> bool:
        """Weights quantized, activations left in high precision (INT4 W4A16)."""
        return self.quantized and self.activations == "none"

    @property
    def block_weight(self) -> bool:
        """Weights written by the format's own nodes (`write_block_weight`: NVFP4's two-level scales, MXFP8's
        TensorRT op), placed by FP8's rules and then the block rules (quant.rules.block_format_reason), whether or
        not the activations are quantized too."""
        return type(self).write_block_weight is not Format.write_block_weight

    @property
    def clip_qtype(self) -> str:
        """The format whose quantizer the mse/entropy clip-range search simulates."""
        return self.calib_qtype or self.base or self.name

    # ------------------------------------------------------------ element numerics
    def cast(self, x_over_scale: np.ndarray) -> np.ndarray:
        """Codes of x / scale as QuantizeLinear gives them: round half to even, saturate to [qmin, qmax]."""
        return np.clip(np.rint(x_over_scale), self.qmin, self.qmax).astype(self.np_dtype)

    def to_float(self, codes: np.ndarray) -> np.ndarray:
        """Codes as float32 (DequantizeLinear before the scale)."""
        return np.asarray(codes).astype(np.float32)

    def zero_point(self, shape=()) -> np.ndarray:
        """The (zero) zero point, in the storage type, that the Q/DQ nodes carry."""
        return np.zeros(shape, dtype=self.np_dtype)

    # ------------------------------------------------------------ scales
    def scale_of(self, amax, high_precision: str) -> np.ndarray:
        """Scale(s) mapping `amax` to qmax (1 where amax is 0), rounded as the engine holds them."""
        amax = np.asarray(amax)
        return round_scale(np.where(amax > 0, amax / self.qmax, 1.0), high_precision)

    def activation_scale(self, amax: float, high_precision: str) -> np.ndarray:
        """Per-tensor activation scale from a calibrated range (1/qmax where the range is 0 or not finite)."""
        amax = float(amax) if amax and np.isfinite(amax) and amax > 0 else 1.0
        return round_scale(np.array(amax / self.qmax, dtype=np.float32), high_precision)

    # ------------------------------------------------------------ weights
    def weight_amax(self, w: np.ndarray, axis: int) -> np.ndarray:
        """max |w| per slice along `axis` (the output channels), keepdims so it broadcasts over w."""
        if w.ndim <= 1:
            return np.abs(w)
        red = tuple(i for i in range(w.ndim) if i != axis)
        # max(max w, -min w): the same numbers as max |w| without an |w| copy of the weight (4x faster)
        return np.maximum(np.max(w, axis=red, keepdims=True), -np.min(w, axis=red, keepdims=True))

    def quantize_weight(self, w: np.ndarray, axis: int, high_precision: str, *, block_size: int = 0, clip=None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(codes, scales) of weight `w` whose output channels run along `axis`. Per-channel formats: one scale
        per output channel, shaped to broadcast over w. Per-block formats (2-D weights): blocks of `block_size`
        (0: one block) along the other axis, K; scales [ceil(K/B), N] for axis 1, transposed for axis 0; `clip`
        per-block clip ratios in the [ceil(K/B), N] layout. `high_precision` "fp16" rounds scales to FP16."""
        scale = self.scale_of(self.weight_amax(w, axis), high_precision)
        return self.cast(w / scale), scale

    def dequantize(self, codes: np.ndarray, scales: np.ndarray, axis: int = 1, *, block_size: int = 0) -> np.ndarray:
        """float32 weights from (codes, scales) as `quantize_weight(w, axis)` returned them (DequantizeLinear's result)."""
        return self.to_float(codes) * scales

    def fake_quant(self, w: np.ndarray, axis: int, high_precision: str, *, block_size: int = 0, clip=None) -> np.ndarray:
        """Quantize-dequantize: what a layer will compute with instead of `w` (the exact numpy emulation)."""
        q, s = self.quantize_weight(w, axis, high_precision, block_size=block_size, clip=clip)
        return self.dequantize(q, s, axis, block_size=block_size)

    def weight_constant(self, name: str, codes: np.ndarray) -> gs.Constant:
        """The initializer holding `codes` (spilled inside a quantize run: no second copy at export)."""
        from .. import modelfile
        return modelfile.constant(name, codes)

    def write_weight(self, graph: gs.Graph, base: str, codes: np.ndarray, scales: np.ndarray, attrs: dict, *,
                     zero_point: bool = True, dtype=np.float32, shape=None, qname: str | None = None, unique=None
                     ) -> gs.Variable:
        """DequantizeLinear-only weight: codes (initializer `qname`, default `{base}_quantized`) + float32 scales
        (+ zero point) -> variable `{base}_dequantized` from node `{base}_DequantizeLinear` (`attrs`: axis,
        block_size). `unique(name)` makes the other names unique. Returns the output variable."""
        name = unique or (lambda n: n)
        qc = self.weight_constant(qname or f"{base}_quantized", codes)
        sc = gs.Constant(name(f"{base}_scale"), np.ascontiguousarray(scales, dtype=np.float32))
        inputs = [qc, sc]
        if zero_point:
            inputs.append(gs.Constant(name(f"{base}_zero_point"), self.zero_point(sc.values.shape)))
        out = gs.Variable(name(f"{base}_dequantized"), dtype=dtype, shape=list(codes.shape) if shape is None else shape)
        graph.nodes.append(gs.Node("DequantizeLinear", name=name(f"{base}_DequantizeLinear"), inputs=inputs, outputs=[out],
                                   attrs=attrs))
        return out

    def write_block_weight(self, graph: gs.Graph, base: str, w_kn: np.ndarray, transposed: bool, name, clip=None,
                           dtype=None) -> tuple[gs.Variable, dict]:
        """Block formats with their own weight form (NVFP4, MXFP8): the nodes dequantizing weight w_kn [K, N] (or its
        transpose for Gemm transB), `name` making names unique. Returns (output, report info). Others do not implement it."""
        raise NotImplementedError(f"{self.name} has no weight form of its own")

    # ------------------------------------------------------------ activations
    def write_activation(self, graph: gs.Graph, tensor: gs.Tensor, uses, scale: np.ndarray, base: str | None = None
                         ) -> gs.Variable:
        """Static per-tensor QuantizeLinear -> DequantizeLinear on `tensor`, rewiring only the listed
        (node, input index) uses; new tensors named from `base` (default: the tensor's name). Returns the DQ output."""
        base = base or tensor.name
        s = gs.Constant(f"{base}_scale", np.asarray(scale, dtype=np.float32))
        zp = gs.Constant(f"{base}_zero_point", self.zero_point())
        q = gs.Variable(f"{base}_quantized", dtype=self.np_dtype, shape=tensor.shape)
        dq = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=tensor.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", name=f"{base}_QuantizeLinear", inputs=[tensor, s, zp], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{base}_DequantizeLinear", inputs=[q, s, zp], outputs=[dq]))
        for node, idx in uses:
            node.inputs[idx] = dq
        return dq

    def write_dynamic_activation(self, graph: gs.Graph, tensor: gs.Tensor, uses, *, axis: int = -1,
                                 base: str | None = None) -> gs.Variable:
        """Formats with `activations == "dynamic"` (NVFP4, MXFP8): the nodes that quantize `tensor` per block
        of `block_size` along `axis` at run time (no calibrated scale) and dequantize it, rewiring the listed
        uses; returns the dequantized tensor. Static formats do not implement it."""
        raise NotImplementedError(f"{self.name} has no dynamic activation quantization")

    # ------------------------------------------------------------ recognition
    def recognises(self, stored: str, scale: str = "") -> bool:
        """Whether a DequantizeLinear whose input is stored as numpy dtype name `stored` (and whose scale is
        `scale`, '' if unknown) holds this format."""
        return stored in self.storage_names and (not scale or not self.scale_names or scale in self.scale_names)


def emitters(graph: gs.Graph, base: str):
    """(var, const, node) builders that append to `graph` with names under `base`, for the emulation subgraphs:
    var(name, dtype) a new tensor, const(name, array) a constant, node(op, inputs, outputs, **attrs) its first output."""
    def var(n, dtype=np.float32):
        return gs.Variable(f"{base}_{n}", dtype=dtype)

    def const(n, a):
        return gs.Constant(f"{base}_{n}", np.asarray(a))

    def node(op, inputs, outputs, **attrs):
        graph.nodes.append(gs.Node(op, name=f"{base}_{op}_{len(graph.nodes)}", inputs=inputs, outputs=outputs, attrs=attrs))
        return outputs[0]
    return var, const, node


def reshape_back(graph: gs.Graph, y: gs.Tensor, like: gs.Tensor, name, prefix: str, dtype) -> gs.Variable:
    """`y` (the 2-D view a dynamic block quantizer needs) reshaped back to `like`'s shape by Shape + Reshape;
    `name` makes unique node/tensor names, `prefix` starts them."""
    shp = gs.Variable(name(f"{prefix}_shape"), dtype=np.int64, shape=[len(like.shape) if like.shape is not None else None])
    out = gs.Variable(name(f"{prefix}_dequantized_nd"), dtype=dtype, shape=like.shape)
    graph.nodes.append(gs.Node("Shape", name=name(f"{prefix}_Shape"), inputs=[like], outputs=[shp]))
    graph.nodes.append(gs.Node("Reshape", name=name(f"{prefix}_Reshape_back"), inputs=[y, shp], outputs=[out]))
    return out
