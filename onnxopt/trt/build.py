"""TensorRT engines from ONNX through Polygraphy's loaders.

    network_from_onnx_path(path, strongly_typed=...)          # polygraphy.backend.trt.loader.NetworkFromOnnxPath
    CreateConfig(fp16=, bf16=, int8=, fp8=, sparse_weights=, profiles=[Profile().add(name, min, opt, max)],
                 load_timing_cache=, builder_optimization_level=, memory_pool_limits=)   # ...trt.config
    engine_from_network(network, config=, save_timing_cache=)   # ...trt.loader.EngineFromNetwork
    save_engine(engine, path=)                                  # ...trt.loader.SaveEngine

Typing: strongly typed by default: the graph's own types (FP16 tensors, INT8/FP8 Q/DQ) are what
onnxopt placed, and TensorRT 11 builds strongly typed networks only (its precision BuilderFlags are gone).
On TensorRT 10, `strongly_typed=False` builds weakly typed with the precision flags that the graph's types
need. TensorRT-RTX (versions 1.x) is refused here: it is the `rtx` module's backend.

Nothing here imports tensorrt at module level; `precision_of` and `parse_profiles` are pure ONNX.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx
from onnx import TensorProto

from .. import atomicfile, modelfile
from ..errors import OnnxoptError
from . import import_tensorrt, major_version

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

_INT8 = {TensorProto.INT8, TensorProto.UINT8}
_FP8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ}
_INT4 = {TensorProto.INT4, TensorProto.UINT4}


@dataclass
class BuildConfig:
    profiles: dict[str, tuple[Shape, Shape, Shape]] | None = None  # input -> (min, opt, max)
    timing_cache: str | os.PathLike | None = None  # loaded if present, then saved (merged) after the build
    opt_level: int | None = None                   # builder optimization level 0..5; None: TensorRT's default (3)
    workspace_mb: int | None = None                # workspace memory pool limit; None: TensorRT's default
    sparse_weights: bool | None = None             # None: on when the graph holds 2:4-sparse weights
    strongly_typed: bool | None = None             # None: strongly typed; False (TensorRT 10 only): weakly typed + flags


@dataclass
class Precision:
    """Reduced-precision types that a graph uses (what a weakly typed TensorRT 10 build must enable)."""
    fp16: bool = False
    bf16: bool = False
    int8: bool = False   # INT8/UINT8 Q/DQ
    fp8: bool = False    # FP8 Q/DQ
    int4: bool = False   # INT4 weight DequantizeLinear (needs no builder flag: kINT4 is for plugins)

    @property
    def low_float(self) -> bool:
        return self.fp16 or self.bf16


@dataclass
class BuildResult:
    path: Path
    seconds: float
    tensorrt: str
    strongly_typed: bool
    sparse_weights: bool
    precision_flags: tuple[str, ...] = ()  # the CreateConfig precision flags that were set (weakly typed builds)


# ---------------------------------------------------------------- pure ONNX helpers
def parse_profiles(items: Sequence[str], option: str = "--shapes") -> dict[str, tuple[Shape, Shape, Shape]]:
    """`name:min/opt/max` (e.g. `sample:1x4x64x64/2x4x128x128/2x4x128x128`) or `name:shape` (a fixed
    shape: min = opt = max) -> {name: (min, opt, max)}. `option` names the flag in error messages."""
    out = {}
    for item in items or ():
        m = re.fullmatch(r"(.+):(\d+(?:x\d+)*)(?:/(\d+(?:x\d+)*)/(\d+(?:x\d+)*))?", item.strip())
        if not m:
            raise OnnxoptError(f"bad {option} entry '{item}'; write name:MINxDIMS/OPTxDIMS/MAXxDIMS (e.g. sample:1x4x64x64/2x4x128x128/2x4x128x128) or name:1x4x128x128")
        dims = [tuple(int(v) for v in g.split("x")) for g in m.groups()[1:] if g is not None]
        lo, opt, hi = (dims * 3)[:3] if len(dims) == 1 else dims
        if not (len(lo) == len(opt) == len(hi)):
            raise OnnxoptError(f"{option} {item}: min, opt and max must have the same rank")
        if any(a > b for a, b in zip(lo, opt)) or any(a > b for a, b in zip(opt, hi)):
            raise OnnxoptError(f"{option} {item}: need min <= opt <= max in every dimension")
        out[m.group(1)] = (lo, opt, hi)
    return out


def check_profiles(model: onnx.ModelProto, profiles: dict | None, option: str = "--shapes") -> None:
    """Profile shapes name real inputs, keep their rank and static dimensions, and have min <= opt <= max."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in model.graph.input if vi.name not in inits}
    for name, shapes in (profiles or {}).items():
        if name not in inputs:
            raise OnnxoptError(f"{option} names input '{name}', which the model does not have; its inputs: {', '.join(inputs)}")
        want = inputs[name]
        for shp in shapes:
            if len(shp) != len(want) or any(w and d != w for d, w in zip(shp, want)):
                shown = "x".join(str(w or "?") for w in want)
                raise OnnxoptError(f"{option} {name}:{'x'.join(map(str, shp))} does not fit input '{name}' ({shown})")
        lo, opt, hi = shapes
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise OnnxoptError(f"{option} {name}: need MIN <= OPT <= MAX in every dimension")


def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def precision_of(model: onnx.ModelProto) -> Precision:
    """Which reduced-precision types the graph uses: FP16/BF16 anywhere (tensors, casts, I/O), and the
    integer/FP8 types of its Q/DQ pairs. Reads no weight values."""
    types: dict[str, int] = {}
    used: set[int] = set()
    graphs = list(_graphs(model.graph))
    for g in graphs:
        for t in g.initializer:
            types[t.name] = t.data_type
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Constant" and a.name == "value":
                    types[n.output[0]] = a.t.data_type
                elif n.op_type == "Cast" and a.name == "to":
                    used.add(a.i)
    used |= set(types.values())
    quant: set[int] = set()
    for g in graphs:
        for n in g.node:
            if n.op_type == "QuantizeLinear":
                if len(n.input) > 2 and n.input[2]:
                    quant.add(types.get(n.input[2], TensorProto.UINT8))
                else:  # opset 21's output_dtype; uint8 when absent
                    od = next((a.i for a in n.attribute if a.name == "output_dtype"), 0)
                    quant.add(od or TensorProto.UINT8)
            elif n.op_type == "DequantizeLinear" and n.input[0] in types:
                quant.add(types[n.input[0]])
    return Precision(fp16=TensorProto.FLOAT16 in used, bf16=TensorProto.BFLOAT16 in used,
                     int8=bool(quant & _INT8), fp8=bool(quant & _FP8), int4=bool(quant & _INT4))


def has_sparse_weights(model: onnx.ModelProto) -> bool:
    """Whether `onnxopt inspect`'s 2:4 report finds a 2:4-sparse Conv/MatMul/Gemm weight (along input
    channels, looking through DequantizeLinear): what TensorRT's SPARSE_WEIGHTS tactics can use."""
    from ..rewrite import sparsity
    return any(r["is_2_4"] for r in sparsity.report(modelfile.import_graph(model), "2:4", flops=False))


# ---------------------------------------------------------------- build
def builder_settings(trt, config: BuildConfig):
    """Polygraphy's optimization profiles, memory-pool limits and timing-cache path for `config` (TensorRT and
    TensorRT-RTX builds alike)."""
    from polygraphy.backend.trt import Profile
    profiles = None
    if config.profiles:
        profile = Profile()
        for name, (lo, opt, hi) in config.profiles.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        profiles = [profile]
    pools = {trt.MemoryPoolType.WORKSPACE: int(config.workspace_mb) << 20} if config.workspace_mb else None
    cache = str(config.timing_cache) if config.timing_cache else None
    return profiles, pools, cache


def build(model: str | os.PathLike, output: str | os.PathLike, *, config: BuildConfig | None = None) -> BuildResult:
    """Build a TensorRT engine (plan) from an ONNX file with Polygraphy, and save it atomically."""
    config = config or BuildConfig()
    model, output = Path(model), Path(output)
    atomicfile.check_output_path(output, model)
    proto = modelfile.load(model)  # checks the file (and its external data) before TensorRT sees it
    check_profiles(proto, config.profiles)
    if config.opt_level is not None and not 0 <= config.opt_level <= 5:
        raise OnnxoptError(f"--opt-level {config.opt_level}: TensorRT's builder optimization level is 0..5")
    trt = import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, engine_from_network, network_from_onnx_path, save_engine
    from polygraphy.exception import PolygraphyException

    major = major_version(trt)
    strongly = config.strongly_typed if config.strongly_typed is not None else True
    if major >= 11 and not strongly:
        raise OnnxoptError(f"TensorRT {trt.__version__} builds strongly typed networks only; drop --weakly-typed")
    prec = precision_of(proto)
    # Strongly typed networks take their precision from the graph; precision flags are refused there.
    weak = not strongly
    fp16, bf16, int8, fp8 = weak and prec.fp16, weak and prec.bf16, weak and prec.int8, weak and prec.fp8
    flags = tuple(name for name, on in (("fp16", fp16), ("bf16", bf16), ("int8", int8), ("fp8", fp8)) if on)
    sparse = config.sparse_weights if config.sparse_weights is not None else has_sparse_weights(proto)
    del proto
    profiles, pools, cache = builder_settings(trt, config)
    log.info("building %s with TensorRT %s (%s typed%s%s)", model, trt.__version__, "strongly" if strongly else "weakly",
             ", " + "+".join(flags) if flags else "", ", sparse weights" if sparse else "")

    t0 = time.perf_counter()
    try:
        with atomicfile.atomic_path(output) as tmp:  # the mode a plain open() gives, like every output
            network = network_from_onnx_path(str(model), strongly_typed=strongly)
            builder_config = CreateConfig(fp16=fp16, bf16=bf16, int8=int8, fp8=fp8, sparse_weights=sparse, profiles=profiles,
                                          load_timing_cache=cache, builder_optimization_level=config.opt_level,
                                          memory_pool_limits=pools)
            engine = engine_from_network(network, config=builder_config, save_timing_cache=cache)
            save_engine(engine, path=str(tmp))
            del engine, network
    except PolygraphyException as e:
        raise OnnxoptError(f"TensorRT could not build {model.name}: {_first_line(e)}; run with -vv for TensorRT's log") from None
    seconds = time.perf_counter() - t0
    log.info("wrote %s in %.1f s", output, seconds)
    return BuildResult(output, seconds, trt.__version__, strongly, sparse, flags)


def _first_line(e: Exception) -> str:
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return lines[0][:400] if lines else type(e).__name__

