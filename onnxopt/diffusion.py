"""Calibration data for diffusion UNets (SDXL): synthetic inputs across the denoising schedule, or real
inputs recorded from a diffusers pipeline.

A UNet sees very different activations at the start (pure noise, t≈1000) and at the end (almost clean
latents, t≈1) of sampling, so calibration samples are spread over the steps of a 20–30-step schedule.
Each sample is one UNet call with classifier-free guidance (batch 2: negative, positive). Files are
.npz with one array per model input and a leading sample axis, which `onnxopt quantize --calib` reads.

Neither torch nor diffusers is imported here at module import time: `synthesize_sdxl` is numpy alone,
`record_unet_inputs` imports torch when it runs.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import atomicfile
from .errors import OnnxoptError

log = logging.getLogger(__name__)

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")


# ---------------------------------------------------------------- SDXL's sampling schedule
@dataclass(frozen=True)
class EulerSchedule:
    """SDXL-base's scheduler (EulerDiscreteScheduler: scaled_linear betas 0.00085..0.012 over 1000 training
    steps, 'leading' timestep spacing, steps_offset 1), reduced to what the UNet input depends on."""
    steps: int = 30
    train_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1

    def timesteps(self) -> np.ndarray:
        ratio = self.train_steps // self.steps
        return (np.arange(self.steps) * ratio)[::-1].astype(np.float64) + self.steps_offset

    def sigmas(self) -> np.ndarray:
        """Noise level (σ of x_t = x_0 + σ·ε) at each of the schedule's timesteps."""
        betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.train_steps) ** 2
        alphas_cumprod = np.cumprod(1.0 - betas)
        train_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
        return np.interp(self.timesteps(), np.arange(self.train_steps), train_sigmas)


def spread(n: int, steps: int) -> np.ndarray:
    """`n` step indices spread evenly over a `steps`-step schedule, first and last included."""
    if n <= 0:
        raise OnnxoptError(f"need at least one calibration sample, got {n}")
    return np.round(np.linspace(0, steps - 1, n)).astype(int) if n > 1 else np.array([steps // 2])


# ---------------------------------------------------------------- synthetic SDXL inputs
@dataclass(frozen=True)
class SDXLShapes:
    """Shapes of SDXL-base's UNet inputs. text_dim = CLIP-L (768) + OpenCLIP-G (1280) hidden states."""
    height: int = 1024          # image pixels; latents are 8x smaller
    width: int = 1024
    latent_channels: int = 4
    seq_len: int = 77
    text_dim: int = 2048
    pooled_dim: int = 1280
    cfg_batch: int = 2          # classifier-free guidance: [negative, positive]


def synthesize_sdxl(n_samples: int = 8, *, steps: int = 30, shapes: SDXLShapes = SDXLShapes(), seed: int = 0) -> dict[str, np.ndarray]:
    """`n_samples` SDXL UNet calls spread over an Euler `steps`-step schedule, as the pipeline would make them.

    Without real encoders, the pieces follow the statistics that matter for calibration ranges:
    latents are smooth fields of unit scale (like VAE latents × 0.13025) noised to the step's σ and
    scaled by 1/sqrt(σ²+1) as `scale_model_input` does; text tokens are unit-scale with per-channel
    spread, a few outlier channels, a large prompt-independent BOS token and near-identical padding
    tokens after the prompt, like CLIP penultimate hidden states; the negative half of the CFG batch is
    zeros (SDXL-base's `force_zeros_for_empty_prompt`) for even samples and another prompt for odd ones;
    time_ids are (h, w, 0, 0, h, w).
    Returns arrays with a leading sample axis: sample [N,2,4,h/8,w/8], timestep [N,1],
    encoder_hidden_states [N,2,77,2048], text_embeds [N,2,1280], time_ids [N,2,6], all float32.
    """
    if shapes.height % 8 or shapes.width % 8:
        raise OnnxoptError(f"image size {shapes.height}x{shapes.width} is not a multiple of 8; latents are 8x smaller")
    if not 1 <= steps <= 1000:
        raise OnnxoptError(f"steps must be within 1..1000, got {steps}")
    sched = EulerSchedule(steps)
    ts, sigmas = sched.timesteps(), sched.sigmas()
    idx = spread(n_samples, steps)
    rng = np.random.default_rng(seed)
    text = _TextModel(shapes, np.random.default_rng(12345))  # encoder "weights": the same for every seed
    b, c, h, w = shapes.cfg_batch, shapes.latent_channels, shapes.height // 8, shapes.width // 8
    out = {k: [] for k in UNET_INPUTS}
    for i, step in enumerate(idx):
        sigma = float(sigmas[step])
        x0 = _smooth_latent(rng, c, h, w)
        x = (x0 + sigma * rng.standard_normal((c, h, w))) / np.sqrt(sigma ** 2 + 1.0)
        out["sample"].append(np.broadcast_to(x, (b, c, h, w)))  # CFG duplicates the latent
        out["timestep"].append(np.array([ts[step]]))
        pos_tokens, pos_pooled = text.prompt(rng)
        if i % 2 == 0:  # empty negative prompt: zeros
            neg_tokens, neg_pooled = np.zeros_like(pos_tokens), np.zeros_like(pos_pooled)
        else:
            neg_tokens, neg_pooled = text.prompt(rng)
        tokens = np.stack([neg_tokens, pos_tokens] + [pos_tokens] * (b - 2))[:b]
        pooled = np.stack([neg_pooled, pos_pooled] + [pos_pooled] * (b - 2))[:b]
        out["encoder_hidden_states"].append(tokens)
        out["text_embeds"].append(pooled)
        out["time_ids"].append(np.tile([shapes.height, shapes.width, 0, 0, shapes.height, shapes.width], (b, 1)))
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


def sdxl_conditioning(seed: int, shapes: SDXLShapes = SDXLShapes(), *, cfg: bool = True) -> dict[str, np.ndarray]:
    """One synthetic prompt's SDXL conditioning (encoder_hidden_states, text_embeds, time_ids), batch 2
    [empty negative prompt as zeros, prompt] with `cfg`, else batch 1; deterministic in `seed`."""
    text = _TextModel(shapes, np.random.default_rng(12345))  # encoder "weights": the same for every seed
    tokens, pooled = text.prompt(np.random.default_rng(seed))
    ids = np.array([shapes.height, shapes.width, 0, 0, shapes.height, shapes.width], np.float64)
    if cfg:
        tokens, pooled = np.stack([np.zeros_like(tokens), tokens]), np.stack([np.zeros_like(pooled), pooled])
    else:
        tokens, pooled = tokens[None], pooled[None]
    return {"encoder_hidden_states": tokens.astype(np.float32), "text_embeds": pooled.astype(np.float32),
            "time_ids": np.tile(ids, (len(tokens), 1)).astype(np.float32)}


def _smooth_latent(rng, c: int, h: int, w: int) -> np.ndarray:
    """Unit-scale field with image-like spatial correlation: coarse noise, bilinearly upsampled, plus detail."""
    gh, gw = max(2, h // 8 + 1), max(2, w // 8 + 1)
    coarse = rng.standard_normal((c, gh, gw))
    ys, xs = np.linspace(0, gh - 1, h), np.linspace(0, gw - 1, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, gh - 2), np.floor(xs).astype(int).clip(0, gw - 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    up = (coarse[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + coarse[:, y0 + 1][:, :, x0] * fy * (1 - fx)
          + coarse[:, y0][:, :, x0 + 1] * (1 - fy) * fx + coarse[:, y0 + 1][:, :, x0 + 1] * fy * fx)
    field = 0.9 * up + 0.35 * rng.standard_normal((c, h, w))
    field += rng.normal(0.0, 0.3, size=(c, 1, 1))  # per-channel offsets, as VAE latents have
    return field


class _TextModel:
    """Fixed per-channel statistics standing in for the two CLIP encoders."""

    def __init__(self, shapes: SDXLShapes, rng):
        d = shapes.text_dim
        self.shapes = shapes
        self.scale = rng.lognormal(0.0, 0.35, d) * 0.9
        self.scale[rng.choice(d, min(8, d), replace=False)] *= 8.0  # outlier channels
        self.offset = rng.normal(0.0, 0.2, d)
        self.bos = rng.standard_normal(d) * 2.5  # causal attention: BOS state is the same for all prompts
        self.bos[rng.choice(d, min(4, d), replace=False)] = rng.choice([-1, 1], min(4, d)) * 25.0
        self.pooled_scale = rng.lognormal(0.0, 0.3, shapes.pooled_dim)

    def prompt(self, rng) -> tuple[np.ndarray, np.ndarray]:
        s = self.shapes
        length = int(rng.integers(6, min(40, s.seq_len - 1) + 1))  # BOS + words + EOS
        tokens = self.offset + rng.standard_normal((s.seq_len, s.text_dim)) * self.scale
        tokens[0] = self.bos
        eos = tokens[length - 1]
        tokens[length:] = eos + 0.3 * rng.standard_normal((s.seq_len - length, s.text_dim)) * self.scale
        pooled = rng.standard_normal(s.pooled_dim) * self.pooled_scale
        return tokens, pooled


# ---------------------------------------------------------------- recording a real pipeline
def record_unet_inputs(pipe: Any, prompts: Sequence[str | dict], *, steps: int = 30, per_prompt: int = 4,
                       seed: int = 0, **pipe_kwargs) -> dict[str, np.ndarray]:
    """Run a diffusers SDXL pipeline over `prompts` and record the UNet's inputs at `per_prompt` steps
    of each run, spread over the schedule (a forward pre-hook on `pipe.unet`; removed afterwards).

    A prompt is a string or a dict of pipeline keyword arguments (e.g. prompt_embeds=...). Images are not
    decoded (output_type="latent"). Returns arrays with a leading sample axis, as `synthesize_sdxl`.
    """
    import torch

    if not prompts:
        raise OnnxoptError("no prompts to record UNet inputs from; give at least one")
    if getattr(pipe, "unet", None) is None:
        raise OnnxoptError("the pipeline has no .unet to record; pass a diffusers StableDiffusionXLPipeline")
    keep = set(spread(min(per_prompt, steps), steps).tolist())
    records: list[dict[str, np.ndarray]] = []
    call = [0]

    def hook(module, args, kwargs):
        i = call[0]
        call[0] += 1
        if i not in keep:
            return
        names = ("sample", "timestep", "encoder_hidden_states")
        vals = {n: (args[j] if j < len(args) else kwargs.get(n)) for j, n in enumerate(names)}
        added = kwargs.get("added_cond_kwargs") or {}
        vals["text_embeds"], vals["time_ids"] = added.get("text_embeds"), added.get("time_ids")
        rec = {}
        for n, v in vals.items():
            if v is None:
                raise OnnxoptError(f"the pipeline's UNet call has no '{n}'; record_unet_inputs serves SDXL pipelines")
            v = torch.as_tensor(v).detach().float().cpu().numpy()
            rec[n] = v.reshape(1) if n == "timestep" and v.size == 1 else v
        records.append(rec)

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, prompt in enumerate(prompts):
            call[0] = 0
            kwargs = dict(pipe_kwargs)
            kwargs.update(prompt if isinstance(prompt, dict) else {"prompt": prompt})
            kwargs.setdefault("generator", torch.Generator("cpu").manual_seed(seed + i))
            with torch.inference_mode():
                pipe(num_inference_steps=steps, output_type="latent", **kwargs)
    finally:
        handle.remove()
    if not records:
        raise OnnxoptError("the pipeline never called its UNet; check the prompts and steps")
    return {n: np.stack([r[n] for r in records]).astype(np.float32) for n in UNET_INPUTS}


def load_pipeline(path: str | os.PathLike, device: str = "cpu"):
    """A local diffusers SDXL pipeline folder, in FP32 (FP16 on CUDA)."""
    p = Path(path)
    if not (p / "model_index.json").is_file():  # before the slow, chatty diffusers import
        raise OnnxoptError(f"{path}: not a diffusers pipeline folder (model_index.json missing)")
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise OnnxoptError(f"--device {device}: not a torch device; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OnnxoptError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    try:
        with quiet_hf():
            from diffusers import StableDiffusionXLPipeline
            pipe = StableDiffusionXLPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise OnnxoptError(f"{path}: cannot load the pipeline ({str(e).splitlines()[0][:200]})") from None
    return pipe.to(device)


@contextlib.contextmanager
def quiet_hf():
    """transformers and diffusers warn about optional backends, deprecations and accelerate while a
    pipeline loads, with a progress bar even into a log file; keep all that for -v."""
    import warnings

    import diffusers
    import transformers
    if log.isEnabledFor(logging.INFO):
        yield
        return
    levels = transformers.logging.get_verbosity(), diffusers.utils.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(levels[0])
        diffusers.utils.logging.set_verbosity(levels[1])
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


# ---------------------------------------------------------------- files
def save_npz(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write the arrays to `path` (.npz, uncompressed) atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise OnnxoptError(f"{path}: calibration data is written as .npz; name the output *.npz")
    with atomicfile.atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    return path


def describe(arrays: dict[str, np.ndarray]) -> str:
    """One line per array: name, shape, range and std (for the CLI and logs)."""
    lines = []
    for k, v in arrays.items():
        lines.append(f"{k:24s} {str(tuple(v.shape)):24s} min {v.min():9.3f}  max {v.max():9.3f}  std {v.std():8.3f}")
    return "\n".join(lines)
