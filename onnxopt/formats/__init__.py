"""The format registry: one `Format` object per number format, registered by name (as ml_dtypes makes a
dtype one object). Everything outside this package asks it instead of spelling a format's constants or
testing its name; `base.py` documents how to add a format.

    from onnxopt import formats
    f = formats.get("fp8")            # raises OnnxoptError listing the names
    f.qmax, f.calib_method, f.quantize_weight(w, axis, "fp16")
"""
from __future__ import annotations

from ..errors import OnnxoptError
from .base import Format, round_scale

_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add `fmt` under its name (once); returns it."""
    if fmt.name in _REGISTRY and _REGISTRY[fmt.name] is not fmt:
        raise ValueError(f"format '{fmt.name}' is registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    """The format called `name` (a Format passes through)."""
    if isinstance(name, Format):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise OnnxoptError(f"unknown format '{name}'; use one of {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """Every registered format's name, in registration order."""
    return tuple(_REGISTRY)


def _where(pred) -> tuple[Format, ...]:
    return tuple(f for f in _REGISTRY.values() if pred(f))


def modes() -> tuple[str, ...]:
    """Uniform modes of `onnxopt quantize` (--int8, --fp8, --int4)."""
    return tuple(f.name for f in _where(lambda f: f.mode))


def static() -> tuple[str, ...]:
    """Formats quantizing activations per tensor from calibrated ranges, each with its own placement plan."""
    return tuple(f.name for f in _where(lambda f: f.planned and f.activations == "static"))


def activation_formats() -> tuple[str, ...]:
    """Formats usable for activations (static or dynamic)."""
    return tuple(f.name for f in _where(lambda f: f.quantized and f.activations != "none"))


def weight_only() -> tuple[str, ...]:
    """Formats quantizing weights only (activations stay in high precision)."""
    return tuple(f.name for f in _where(lambda f: f.weight_only))


def auto_candidates() -> tuple[str, ...]:
    """Candidates `--auto` may offer per layer (besides "none", FP16)."""
    return tuple(f.name for f in _where(lambda f: f.auto))


def auto_defaults() -> tuple[str, ...]:
    """`--auto`'s default candidates."""
    return tuple(f.name for f in _where(lambda f: f.auto_default))


def auto_with_variants(names) -> tuple[str, ...]:
    """`names` plus the variants `--auto` offers with them (`Format.auto_with_base`: int8 brings int8-sq) where the
    base is the only candidate with static activations: SmoothQuant is how INT8's per-tensor scale survives outlier
    channels, while beside FP8 (whose exponent holds them) the search has that choice already (MiniLM `--auto`
    fp8,int8 with int8-sq offered too came out costlier: 8.56-9.22 weight bits vs 8.44, BENCHMARKS.md). A format
    with `auto_beside` comes whenever that one is a candidate (nvfp4 brings its weight-only form nvfp4-wo)."""
    names = tuple(names)
    static_ = [n for n in names if n in _REGISTRY and get(n).activations == "static" and not get(n).base]
    return names + tuple(f.name for f in _where(lambda f: ((f.auto_with_base and static_ == [f.base])
                                                           or (f.auto_beside and f.auto_beside in names))
                                                and f.name not in names))


def high_precision() -> tuple[str, ...]:
    """Unquantized float formats (cast, not scaled): fp16, bf16, fp32."""
    return tuple(f.name for f in _where(lambda f: not f.quantized))


def low_precision() -> tuple[str, ...]:
    """Unquantized float formats narrower than FP32 (what `convert` and `--io-dtype` offer)."""
    return tuple(f.name for f in _where(lambda f: not f.quantized and f.bits < 32))


def from_storage(stored: str, scale: str = "", *, weight_only: bool = False) -> Format | None:
    """The format a DequantizeLinear holds, from its input's numpy dtype name (and its scale's), or None.
    Later registrations win, so a format sharing storage with an older one (MXFP8's E4M3 codes with E8M0
    scales) is recognised by its narrower `recognises`. Where the stored type alone cannot tell (INT8 codes are
    W8A8's and W8A16's), the layer's role decides: `weight_only` for a weight whose activation has no Q/DQ."""
    return _by_role([f for f in reversed(list(_REGISTRY.values()))
                     if f.quantized and not f.base and f.recognises(stored, scale)], weight_only)


def from_engine(precision: str, *, weight_only: bool = False) -> Format | None:
    """The format of a TensorRT kernel datatype string ("Int8", "FP8", "Half"), or None; `weight_only` for a
    quantized weight constant in a kernel whose activations are high precision (as `from_storage`)."""
    return _by_role([f for f in reversed(list(_REGISTRY.values())) if precision in f.engine_precisions], weight_only)


def _by_role(found: list, weight_only: bool) -> Format | None:
    """The first of `found` whose weight-only-ness is `weight_only`, else the first."""
    return next((f for f in found if f.weight_only == weight_only), found[0] if found else None)


def with_weight_only_variant() -> tuple[str, ...]:
    """Formats that also come weight-only (--weight-only) besides the weight-only formats."""
    return tuple(f.name for f in _where(lambda f: f.weight_only_variant))


def dequantize_ops() -> tuple[str, ...]:
    """Op types that dequantize a registered format: DequantizeLinear and the formats' own (TensorRT's MXFP8 one)."""
    return tuple(dict.fromkeys(f.dequantize_op for f in _REGISTRY.values()))


def from_dequantize_op(op: str) -> Format | None:
    """The format whose own dequantize op `op` is (None for the standard DequantizeLinear or any other op)."""
    return next((f for f in _where(lambda f: f.dequantize_op == op and op != "DequantizeLinear")), None)


def from_dynamic_op(op: str) -> Format | None:
    """The format whose run-time activation quantizer `op` is, or None."""
    return next((f for f in _where(lambda f: op and f.dynamic_op == op)), None)


def block_format_of(stored: str, ops=()) -> Format | None:
    """The block format (dynamic per-block activations: NVFP4, MXFP8) of a weight stored as numpy dtype name
    `stored` and dequantized by the ops `ops`, or None."""
    for op in ops:
        if from_dequantize_op(op) is not None:
            return from_dequantize_op(op)
    f = from_storage(stored)
    return f if f is not None and f.activations == "dynamic" else None


def weight_bits() -> dict[str, float]:
    """--auto's weight-bit cost of each candidate, "none" (FP16) included."""
    return {"none": get("fp16").cost_weight_bits, **{n: get(n).cost_weight_bits for n in auto_candidates()}}


def activation_bits() -> dict[str, float]:
    """--auto's activation-bit cost of each candidate, "none" (FP16) included."""
    return {"none": float(get("fp16").bits), **{n: get(n).cost_activation_bits for n in auto_candidates()}}


from . import bf16, fp8, fp16, fp32, int4, int8  # noqa: E402  (the built-in formats register below)

INT8, INT8_SQ, FP8, INT4, FP16, BF16, FP32 = (int8.INT8, int8.INT8_SQ, fp8.FP8_E4M3, int4.INT4, fp16.FP16, bf16.BF16,
                                             fp32.FP32)
for _f in (FP8, INT8, INT4, INT8_SQ, FP16, BF16, FP32):
    register(_f)

from . import mxfp8, nvfp4  # noqa: E402  (block formats: real TensorRT form + standard-ONNX emulation)

NVFP4, MXFP8 = register(nvfp4.NVFP4_FORMAT), register(mxfp8.MXFP8_FORMAT)
NVFP4_WO = register(nvfp4.NVFP4_WO)  # W4A16 with NVFP4's weights: an --auto candidate beside nvfp4

from . import w8a16  # noqa: E402  (INT8 weight-only)

W8A16 = register(w8a16.W8A16)

__all__ = ["Format", "round_scale", "register", "get", "names", "modes", "static", "activation_formats",
           "weight_only", "with_weight_only_variant", "dequantize_ops", "from_dequantize_op", "from_dynamic_op",
           "block_format_of", "auto_candidates", "auto_defaults", "auto_with_variants", "high_precision", "low_precision", "from_storage", "from_engine",
           "weight_bits", "activation_bits", "INT8", "INT8_SQ", "FP8", "INT4", "FP16", "BF16", "FP32", "NVFP4", "NVFP4_WO", "MXFP8", "W8A16"]
