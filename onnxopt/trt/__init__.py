"""Every TensorRT-dependent line of onnxopt: engine builds (`build` for full TensorRT, `rtx` for
TensorRT-RTX), the engine report (`report`) and engine timing (`bench`).

TensorRT is imported lazily, inside functions, so that the rest of onnxopt (and this package's own
pure-ONNX helpers) work where TensorRT is not installed.
"""
from __future__ import annotations

import os
import sys

from ..errors import OnnxoptError

def install_hint(extra: str) -> str:
    """The pip line that adds `extra` to this installation: editable from a source checkout, else the wheel's."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "onnxopt").is_dir():
        return f"pip install -e '{root}[{extra}]'"
    return f"pip install 'onnxopt[{extra}]'"


MISSING = f"TensorRT is not importable; install the trt extra: {install_hint('trt')}"
MISSING_RTX = f"TensorRT-RTX is not importable; install the rtx extra: {install_hint('rtx')}"


def import_tensorrt():
    """The full TensorRT `tensorrt` module, or an OnnxoptError that names the `trt` extra."""
    try:
        import tensorrt
    except ImportError:
        raise OnnxoptError(MISSING) from None
    except OSError as e:  # the wheel is there but its CUDA libraries are not
        raise OnnxoptError(f"TensorRT is installed but cannot load ({str(e).splitlines()[0][:200]}); check the CUDA libraries, or reinstall: {install_hint('trt')}") from None
    if is_rtx(tensorrt):
        raise OnnxoptError(f"the 'tensorrt' module here is TensorRT-RTX {tensorrt.__version__}; build with --backend rtx")
    return tensorrt


def available() -> bool:
    """Whether full TensorRT imports here."""
    try:
        import_tensorrt()
    except OnnxoptError:
        return False
    return True


def is_rtx(trt) -> bool:
    """TensorRT-RTX (versions 1.x, module named tensorrt_rtx*) rather than full TensorRT (8, 10, 11)."""
    return "rtx" in trt.__name__.lower() or int(trt.__version__.split(".")[0]) < 8


def major_version(trt=None) -> int:
    """Full TensorRT's major version (10, 11); TensorRT-RTX has its own numbering and is refused."""
    trt = trt or import_tensorrt()
    if is_rtx(trt):
        raise OnnxoptError(f"TensorRT-RTX {trt.__version__} is not full TensorRT; build with --backend rtx")
    return int(trt.__version__.split(".")[0])


# ---------------------------------------------------------------- TensorRT-RTX bridge
# The PyPI wheels (tensorrt-rtx-cu13-bindings / -libs) install the module as `tensorrt_rtx_bindings`,
# while Polygraphy (POLYGRAPHY_USE_TENSORRT_RTX=1) imports `tensorrt_rtx`. This is the one place that
# bridges the two: a sys.modules alias, registered only when no real `tensorrt_rtx` module exists.
# Polygraphy reads the switch when its TensorRT backend is first imported, so full TensorRT and
# TensorRT-RTX cannot both be used through Polygraphy in one process.
def import_tensorrt_rtx():
    """The TensorRT-RTX module, aliased as `tensorrt_rtx`, with Polygraphy switched to it."""
    try:
        import tensorrt_rtx as trt
    except ImportError:
        try:
            import tensorrt_rtx_bindings as trt
        except ImportError:
            raise OnnxoptError(MISSING_RTX) from None
        except OSError as e:
            raise OnnxoptError(f"TensorRT-RTX is installed but cannot load ({str(e).splitlines()[0][:200]}); reinstall: {install_hint('rtx')}") from None
        sys.modules["tensorrt_rtx"] = trt
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
    if "polygraphy.config" in sys.modules:
        from polygraphy import config
        if not config.USE_TENSORRT_RTX:
            if "polygraphy.backend.trt.loader" in sys.modules:
                raise OnnxoptError("Polygraphy's TensorRT backend was already loaded for full TensorRT in this process; run the TensorRT-RTX build in a new process")
            config.USE_TENSORRT_RTX = True
    return trt


def rtx_available() -> bool:
    """Whether TensorRT-RTX imports here (without switching Polygraphy to it)."""
    import importlib.util
    try:
        return any(importlib.util.find_spec(m) is not None for m in ("tensorrt_rtx", "tensorrt_rtx_bindings"))
    except (ImportError, ValueError):
        return False
