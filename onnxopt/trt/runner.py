"""The TensorRT backend of `onnxopt bench`: an engine per model (built with `build`, or loaded from a
.plan), run with Polygraphy's TrtRunner.

Timing keeps the inputs on the GPU (Polygraphy DeviceArrays) and leaves the outputs there
(`copy_outputs_to_host=False`), so one iteration is TrtRunner's enqueue + stream synchronize: the
engine's latency, without host<->device copies. Fidelity outputs are copied to the host as usual.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..calib import InputSpec
from . import import_tensorrt
from .build import BuildConfig, build

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


class TrtBackend:
    name = "trt"

    def __init__(self, build_config: BuildConfig | None = None):
        self.trt = import_tensorrt()
        self.build_config = build_config or BuildConfig()
        self.builds: dict[str, dict] = {}

    def artifact(self, model: Path, label: str, work_dir: Path) -> Path:
        """The engine for `model`: the file itself if it is one, else a build under `work_dir`."""
        if model.suffix in ENGINE_SUFFIXES:
            return model
        out = work_dir / f"{_safe(label)}.plan"
        res = build(model, out, config=self.build_config)
        self.builds[label] = {"seconds": round(res.seconds, 2), "strongly_typed": res.strongly_typed,
                              "sparse_weights": res.sparse_weights, "precision_flags": list(res.precision_flags)}
        return out

    def timing_runner(self, engine: Path):
        from polygraphy.backend.trt import EngineFromPath, TrtRunner
        return TrtRunner(EngineFromPath(str(engine)))

    fidelity_runner = timing_runner

    def input_specs(self, engine: Path) -> list[InputSpec]:
        """Inputs of the engine (dynamic dimensions as None)."""
        runner = self.fidelity_runner(engine)
        with runner:
            meta = runner.get_input_metadata(use_numpy_dtypes=False)
        return [InputSpec(name, tuple(d if isinstance(d, int) and d >= 0 else None for d in (shape or ())), np.dtype(dtype.numpy()))
                for name, (dtype, shape) in meta.items()]

    def time(self, runner, feed: dict, warmup: int, iters: int) -> list[float]:
        """Seconds per iteration of `runner` (not yet active) on `feed`, with device-resident I/O."""
        from polygraphy import cuda
        from polygraphy.datatype import DataType

        with runner:
            meta = runner.get_input_metadata(use_numpy_dtypes=False)
            buffers = {}
            try:
                for name, (dtype, _) in meta.items():
                    host = np.ascontiguousarray(np.asarray(feed[name]).astype(dtype.numpy(), copy=False))
                    buffers[name] = cuda.DeviceArray(shape=host.shape, dtype=DataType.from_dtype(host.dtype))
                    buffers[name].copy_from(host)
                dev = {name: b.view() for name, b in buffers.items()}
                for _ in range(warmup):
                    runner.infer(dev, check_inputs=False, copy_outputs_to_host=False)
                times = []
                for _ in range(iters):
                    runner.infer(dev, check_inputs=False, copy_outputs_to_host=False)
                    times.append(runner.last_inference_time())
            finally:
                for b in buffers.values():
                    b.free()
        return times

    def device(self) -> dict:
        return {"gpu": gpu_name(), "tensorrt": self.trt.__version__}


def gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            names = [s.strip() for s in out.stdout.splitlines() if s.strip()]
            if names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown GPU"


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
