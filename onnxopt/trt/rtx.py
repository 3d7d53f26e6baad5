"""TensorRT-RTX engines, built ahead of time on the CPU through Polygraphy.

    network_from_onnx_path(path, strongly_typed=True)       # polygraphy.backend.trt
    CreateConfigRTX(compute_capabilities=[(8, 9), ...], profiling_verbosity=DETAILED, profiles=...)
    engine_bytes_from_network(network, config=)             # the serialized plan; never deserialized here

Always strongly typed (the graph's Q/DQ and FP16 tensors decide every precision; TensorRT-RTX has no
precision flags) and CPU-only: the targets are named compute capabilities, never the current GPU.
FP8 needs SM 8.9+: FP8 graphs drop SM 8.0/8.6 before the build; a build that still names targets it
"cannot compile for" is retried once without them. Dropped targets are reported.

The builder's VERBOSE log (Polygraphy's logger, routed to Python logging for the build) is kept: it is
what `report` parses.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomicfile, modelfile
from ..errors import OnnxoptError
from . import import_tensorrt_rtx
from .build import BuildConfig, builder_settings, check_profiles, precision_of

log = logging.getLogger(__name__)

# RTX-class GPUs: Ampere (8.0, 8.6), Ada (8.9), Blackwell (12.0).
DEFAULT_TARGETS: tuple[tuple[int, int], ...] = ((8, 0), (8, 6), (8, 9), (12, 0))
FP8_MIN_TARGET = (8, 9)
_CANNOT = re.compile(r"Cannot compile for target\(s\) ([sm0-9, ]+?), because (.*?)(?: In compileGraph|$)")


@dataclass
class RtxBuildResult:
    path: Path
    seconds: float
    tensorrt_rtx: str
    targets: list[tuple[int, int]]
    dropped: dict[str, str] = field(default_factory=dict)  # "8.0" -> why the builder cannot target it
    engine_bytes: int = 0
    log: list[str] = field(default_factory=list)            # the builder's log lines (severity letter first)


def parse_targets(items) -> list[tuple[int, int]]:
    """'8.9', '12.0' -> [(8, 9), (12, 0)]; empty -> the RTX defaults."""
    out = []
    for item in items or ():
        m = re.fullmatch(r"(\d+)\.(\d)", str(item).strip())
        if not m:
            raise OnnxoptError(f"bad compute capability '{item}'; write MAJOR.MINOR, e.g. 8.9 or 12.0")
        out.append((int(m.group(1)), int(m.group(2))))
    return out or list(DEFAULT_TARGETS)


def _name(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def build(model: str | os.PathLike, output: str | os.PathLike, *, config: BuildConfig | None = None,
          targets=None, log_path: str | os.PathLike | None = None) -> RtxBuildResult:
    """Build a TensorRT-RTX engine from an ONNX file and save the serialized plan atomically."""
    config = config or BuildConfig()
    model, output = Path(model), Path(output)
    atomicfile.check_output_path(output, model)
    proto = modelfile.load(model)  # checks the file (and its external data) before TensorRT-RTX sees it
    check_profiles(proto, config.profiles)
    if config.strongly_typed is False:
        raise OnnxoptError("TensorRT-RTX builds strongly typed networks only; drop --weakly-typed")
    if config.opt_level is not None and not 0 <= config.opt_level <= 5:
        raise OnnxoptError(f"--opt-level {config.opt_level}: the builder optimization level is 0..5")
    targets = parse_targets(targets) if not targets or isinstance(targets[0], str) else list(targets)
    dropped: dict[str, str] = {}
    if precision_of(proto).fp8:
        for cc in [t for t in targets if t < FP8_MIN_TARGET]:
            targets.remove(cc)
            dropped[_name(cc)] = "FP8 needs SM 8.9 or newer"
    del proto
    if not targets:
        raise OnnxoptError("no compute capability left to build for (FP8 needs 8.9 or 12.0); pass --compute-capability 8.9")
    trt = import_tensorrt_rtx()
    lines: list[str] = []
    t0 = time.perf_counter()
    plan = None
    from polygraphy.exception import PolygraphyException
    for attempt in range(2):
        try:
            with _capture(lines):
                plan = _build_plan(trt, model, config, targets)
            break
        except PolygraphyException as e:
            cannot = {cc: why for cc, why in _cannot_compile(lines).items() if cc in targets}
            if attempt or not cannot or len(cannot) == len(targets):
                err = next((ln[4:] for ln in lines if ln.startswith("[E]")), None) or _first_error(e)
                raise OnnxoptError(f"TensorRT-RTX could not build {model.name}: {err[:400]}; run with -vv for the builder's log") from None
            for cc, why in cannot.items():  # the builder named targets the graph cannot run on: drop them, once
                targets.remove(cc)
                dropped[_name(cc)] = why
            lines.clear()
    seconds = time.perf_counter() - t0
    if dropped:  # at INFO: the engine report's own line says it, once
        log.info("dropped GPU targets: %s", ", ".join(f"SM {k} ({v})" for k, v in dropped.items()))
    with atomicfile.atomic_path(output) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(plan))
    size = output.stat().st_size
    del plan
    if log_path:
        Path(log_path).write_text("\n".join(lines) + "\n")
    log.info("wrote %s (%d bytes) in %.1f s for SM %s", output, size, seconds, ", ".join(map(_name, targets)))
    return RtxBuildResult(output, seconds, trt.__version__, targets, dropped, size, lines)


def _build_plan(trt, model: Path, config: BuildConfig, targets):
    from polygraphy.backend.tensorrt_rtx import CreateConfigRTX
    from polygraphy.backend.trt import engine_bytes_from_network, network_from_onnx_path
    profiles, pools, cache = builder_settings(trt, config)
    log.info("building %s with TensorRT-RTX %s for SM %s (strongly typed, CPU only)", model, trt.__version__,
             ", ".join(map(_name, targets)))
    network = network_from_onnx_path(str(model), strongly_typed=True)
    cfg = CreateConfigRTX(compute_capabilities=list(targets), profiles=profiles, load_timing_cache=cache,
                          builder_optimization_level=config.opt_level, memory_pool_limits=pools,
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
    return engine_bytes_from_network(network, config=cfg, save_timing_cache=cache)


def _cannot_compile(lines: list[str]) -> dict[tuple[int, int], str]:
    """Targets an error line says the builder cannot compile for, with its reason."""
    for line in lines:
        m = _CANNOT.search(line)
        if m:
            ccs = re.findall(r"sm(\d+?)(\d)\b", m.group(1))
            return {(int(a), int(b)): m.group(2).strip().rstrip(".") for a, b in ccs}
    return {}


@contextlib.contextmanager
def _capture(lines: list[str]):
    """Route Polygraphy's logger (which carries TensorRT-RTX's log) to `lines` at VERBOSE for one build."""
    from polygraphy.logger import G_LOGGER

    class _Collect(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            lines.append(msg)
            log.debug("%s", msg)  # -vv shows the builder's log as it runs

    pl = logging.getLogger("Polygraphy")
    handler = _Collect(level=1)
    saved = (G_LOGGER.use_python_logging_system, G_LOGGER.module_severity, G_LOGGER.colors, pl.propagate, pl.level)
    G_LOGGER.use_python_logging_system = True
    G_LOGGER.module_severity = G_LOGGER.EXTRA_VERBOSE
    G_LOGGER.colors = False
    G_LOGGER.once_logged.clear()  # warnings are logged once per process; each build's report needs its own
    pl.addHandler(handler)
    pl.propagate, pl.level = False, 1
    try:
        yield
    finally:
        pl.removeHandler(handler)
        G_LOGGER.use_python_logging_system, G_LOGGER.module_severity, G_LOGGER.colors = saved[:3]
        pl.propagate, pl.level = saved[3], saved[4]


def _first_error(e: Exception) -> str:
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return lines[0][:400] if lines else type(e).__name__
