"""Diffusion denoisers recognised from the graph, and the quality defaults `quantize` gives them.

A denoiser (a diffusion UNet or DiT) is judged on the sampler's final samples, where per-call errors compound over
the steps; round-to-nearest W8A8 FP8 that is fine for a transformer or a CNN keeps 21 / 23 dB there at 1 / 3 steps
against the recipe's 39 / 41 (the terrain UNet, BENCHMARKS.md "Denoiser-aware FP8 defaults"). So when the graph is a
denoiser, the formats that ask for it (`Format.denoiser_recipe`) default to the recipe measured to keep final
samples: error-feedback weight rounding and the low-rank branch (`--lowrank auto`). Options given explicitly win (`--weight-rounding nearest`, `--lowrank none`);
presets keep their own recipes; every other graph is untouched.

Recognised from the graph's inputs and output alone (no weights read): a 4-D float input (the noisy sample; by
name as the sampler knows it, or the only one), a per-batch noise-level input named as a timestep or sigma (rank 0
or 1), and a first output of the sample's rank and channel count.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import onnx

from . import formats as registry
from .sampler import SAMPLE_NAMES, SIGMA_NAMES, TIMESTEP_NAMES

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)

# Above this many bytes of weights the recipe is not a default (the summary says how to ask for it): its error-feedback
# Hessians and low-rank SVDs scale with the weights, measured in seconds on the terrain UNet (45 MB) and the tiny
# SDXL UNet, not at full-size SDXL (9.6 GiB, whose --fp8 has a 25 s target; tools/time_denoiser_defaults.py times it).
MAX_RECIPE_BYTES = 2 << 30
# The recipe's QuantConfig fields and values, and the option that turns each off. Measured on the terrain UNet with
# calib-data trajectory's default calibration (BENCHMARKS.md "Denoiser-aware FP8 defaults", 8 held-out seeds, 1 / 3
# steps): nearest 21.2 / 23.2 dB; feedback + low-rank 38.8 / 40.7; without feedback 29.2 / 30.4; without the branch
# 23.9 / 24.5. SmoothQuant 1.0 on top of the two lost 4 dB (34.8 / 36.5), so it is not part of the recipe.
RECIPE = (("weight_rounding", "feedback", "error-feedback weight rounding", "--weight-rounding nearest"),
          ("lowrank", "auto", "low-rank branch (auto ranks)", "--lowrank none"))


@dataclass(frozen=True)
class Recognised:
    """The graph's denoiser roles: which input is the noisy sample, which the noise level, the output."""
    sample: str
    level: str
    output: str

    def describe(self) -> str:
        """'noisy, sigma -> denoised'."""
        return f"{self.sample}, {self.level} -> {self.output}"


def _shape(vi: onnx.ValueInfoProto) -> tuple | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)


def detect(model: onnx.ModelProto) -> Recognised | None:
    """The denoiser roles of `model`'s inputs and first output, or None when the graph is not a denoiser."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    four = [vi for vi in inputs if vi.type.tensor_type.elem_type in FLOATS and len(_shape(vi) or ()) == 4]
    sample = next((vi for vi in four if vi.name in SAMPLE_NAMES), four[0] if len(four) == 1 else None)
    level = next((vi for vi in inputs if vi.name in SIGMA_NAMES + TIMESTEP_NAMES and _shape(vi) is not None
                  and len(_shape(vi)) <= 1), None)
    if sample is None or level is None or not model.graph.output:
        return None
    out = model.graph.output[0]
    got, want = _shape(out), _shape(sample)
    if got is None or len(got) != 4 or out.type.tensor_type.elem_type not in FLOATS:
        return None
    # The channel count and any static spatial size must match the sample's (a denoiser predicts x0/noise/v).
    if any(isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b for a, b in zip(got[1:], want[1:])):
        return None
    return Recognised(sample.name, level.name, out.name)


@dataclass(frozen=True)
class Defaults:
    """What `apply` decided: the denoiser seen, the recipe fields it switched on, and why not (if not)."""
    recognised: Recognised | None
    switched_on: tuple = ()     # (field, value, what, how to turn it off)
    not_applied: str = ""

    def as_dict(self) -> dict:
        """The report's `denoiser` section."""
        if self.recognised is None:
            return {"recognised": False}
        r = self.recognised
        return {"recognised": True, "sample": r.sample, "level": r.level, "output": r.output,
                "defaults_on": {f: v for f, v, _, _ in self.switched_on},
                "turn_off": {f: off for f, _, _, off in self.switched_on},
                **({"not_applied": self.not_applied} if self.not_applied else {})}

    def summary(self) -> str:
        """One clause for the command's summary line ('' when the graph is not a denoiser)."""
        if self.recognised is None:
            return ""
        head = f"recognised a diffusion denoiser ({self.recognised.describe()})"
        if not self.switched_on:
            return f"{head}; denoiser defaults not applied: {self.not_applied}"
        return f"{head}: denoiser defaults on: " + ", ".join(f"{what} (off: {off})" for _, _, what, off in self.switched_on)


def apply(config, model: onnx.ModelProto, *, given: frozenset | set = frozenset(), has_data: bool = True,
          preset: str | None = None, max_bytes: int = MAX_RECIPE_BYTES):
    """`config` (an api.QuantConfig) with the denoiser recipe in every recipe field not in `given` (the fields the
    user set, "off" included), when `model` is a denoiser and the format asks for it. Returns (config, Defaults)."""
    found = detect(model)
    if found is None:
        return config, Defaults(None)
    fmt = registry.get(config.mode)
    why = ("--auto chooses per layer" if config.auto else
           f"--{config.mode} has no denoiser recipe (measured for FP8 only)" if not fmt.denoiser_recipe else
           f"--preset {preset} keeps its own recipe" if preset else
           "no calibration data (--calib-random or none); give --calib, e.g. from calib-data trajectory" if not has_data else
           "--sparsity is given" if config.sparsity else
           _too_big(model, max_bytes))
    if why:
        return config, Defaults(found, (), why)
    on = tuple(item for item in RECIPE if item[0] not in given and getattr(config, item[0]) is None)
    if not on:
        return config, Defaults(found, (), "every recipe option was given explicitly")
    return replace(config, **{f: v for f, v, _, _ in on}), Defaults(found, on)


def _too_big(model: onnx.ModelProto, max_bytes: int) -> str:
    """Why the recipe is not a default for a model this size ('' when it is)."""
    from .modelfile import model_bytes
    size = model_bytes(model)
    if size <= max_bytes:
        return ""
    flags = " ".join(f"{off.split()[0]} {v}" for _, v, _, off in RECIPE)
    return (f"{size / 2**30:.1f} GiB of weights, above the {max_bytes / 2**30:.1f} GiB its cost was measured for "
            f"(minutes at full-size SDXL); add {flags} to apply it")
