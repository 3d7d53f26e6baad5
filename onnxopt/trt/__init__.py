"""Every TensorRT-dependent line of onnxopt: engine builds (`build`) and engine timing (`bench`).

TensorRT is imported lazily, inside functions, so that the rest of onnxopt (and this package's own
pure-ONNX helpers) work where TensorRT is not installed.
"""
from __future__ import annotations

from ..errors import OnnxoptError

MISSING = "TensorRT is not importable; install the trt extra: pip install 'onnxopt[trt]'"


def import_tensorrt():
    """The `tensorrt` module, or an OnnxoptError that names the `trt` extra."""
    try:
        import tensorrt
    except ImportError:
        raise OnnxoptError(MISSING) from None
    except OSError as e:  # the wheel is there but its CUDA libraries are not
        raise OnnxoptError(f"TensorRT is installed but cannot load ({str(e).splitlines()[0][:200]}); check the CUDA libraries, or reinstall: pip install 'onnxopt[trt]'") from None
    return tensorrt


def available() -> bool:
    """Whether tensorrt imports here."""
    try:
        import_tensorrt()
    except OnnxoptError:
        return False
    return True


def major_version(trt=None) -> int:
    trt = trt or import_tensorrt()
    return int(trt.__version__.split(".")[0])
