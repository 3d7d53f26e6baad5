"""The denoising loop: a reference and a candidate ONNX denoiser sampled with the same seeds, noise and
conditioning, compared on the final samples (PSNR, SSIM, cosine) and step by step (drift).

Two kinds of model:
- epsilon / v-prediction UNets (inputs sample, timestep, conditioning; SDXL's sample, timestep,
  encoder_hidden_states, text_embeds, time_ids) under diffusers' Euler, DDIM or DPM-Solver++ (2M) with
  SDXL-base's scheduler config, classifier-free guidance doubling the batch ([unconditional, conditional]);
  the final sample is the last latent (no VAE decode here);
- EDM / consistency denoisers D(x, sigma, conditioning) -> x0: x = sigma_max·z, x0 = D(x, sigma_max), then
  for each further sigma of a Karras (rho 7) schedule x = x0 + sqrt(sigma² - sigma_min²)·z', x0 = D(x, sigma).

Each model runs its whole trajectory alone (the reference's per-step samples are kept in memory, a few MB; the
candidate's session is built while the reference samples where both models fit, else one session at a time),
then the two trajectories are compared. Conditioning comes from a data file (.npz,
arrays keyed by input name, leading axis = prompts, each row the call's batch: 2 rows [uncond, cond] with
guidance) or is synthesised deterministically from the seed: SDXL text inputs from onnxopt.diffusion's
synthetic text model (empty negative prompt = zeros), a [batch] float input (a class or difficulty label)
uniform in [0, 1], anything else standard normal.
"""
from __future__ import annotations

import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from . import modelfile
from . import metrics as M
from . import ort as ortx
from .calib import InputSpec, input_specs
from .compare import evaluation_session
from .errors import OnnxoptError
from .progress import track
from .settings import MEMORY_BUDGET_MB

log = logging.getLogger(__name__)

SAMPLERS = ("euler", "ddim", "dpmpp", "consistency")
PREDICTIONS = ("epsilon", "v_prediction")
SAMPLE_NAMES = ("sample", "noisy", "x", "latent", "latents", "x_t", "noisy_sample")
SIGMA_NAMES = ("sigma", "sigmas", "noise_level")
TIMESTEP_NAMES = ("timestep", "timesteps", "t")
# diffusers' StableDiffusionXLPipeline.__call__ defaults (num_inference_steps=50, guidance_scale=5.0) and
# SDXL-base's scheduler/scheduler_config.json (EulerDiscreteScheduler).
SDXL_STEPS, SDXL_GUIDANCE = 50, 5.0
SDXL_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading"}
MAX_SEEDS = 4096
# calib-data trajectory with --sampler consistency and no --steps: every seed recorded at each of these step
# counts (the 1-4 step samplers a consistency model is deployed with), so the calibration covers each one's sigmas;
# a 1-step-only calibration sees sigma_max alone and 3-step sampling of the model quantized with it collapses
# (BENCHMARKS.md "as a stranger would run it": FP8 19.3 dB at 3 steps).
CALIB_CONSISTENCY_STEPS = (1, 2, 3, 4)


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0-7', '3', '0,2,5' or '0-3,10-11' -> seeds; an error line for anything else."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            a, sep, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if sep else int(a)
            if lo < 0 or hi < lo:
                raise ValueError
            seeds.extend(range(lo, hi + 1))
            if len(seeds) > MAX_SEEDS:
                raise OnnxoptError(f"--seeds {text}: more than {MAX_SEEDS} seeds; give a smaller range")
    except ValueError:
        raise OnnxoptError(f"--seeds {text}: not a seed range; write 0-7, 3 or 0,2,5 (non-negative, low-high)") from None
    if len(set(seeds)) != len(seeds):
        raise OnnxoptError(f"--seeds {text}: a seed is repeated; give each seed once")
    return tuple(seeds)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'128x128' -> (128, 128): the sample's spatial size (latents for latent-diffusion UNets)."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise OnnxoptError(f"--size {text}: write HxW, e.g. 128x128 (the sample's height and width)") from None
    if h < 1 or w < 1:
        raise OnnxoptError(f"--size {text}: both sides must be positive")
    return h, w


@dataclass(frozen=True)
class SamplerOptions:
    """How to sample: scheduler, steps, guidance, seeds and noise range; checked on construction."""
    sampler: str = "euler"
    steps: int | None = None          # default: SDXL's 50 (euler/ddim/dpmpp), 1 (consistency)
    guidance: float | None = None     # default: SDXL's 5.0 (euler/ddim/dpmpp); consistency models take none
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    size: tuple[int, int] | None = None
    prediction: str = "epsilon"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    batch: int = 4                     # seeds per model call
    data_range: float | None = None    # PSNR/SSIM range; None: each reference sample's peak-to-peak

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise OnnxoptError(f"--sampler {self.sampler}: unknown; use one of {', '.join(SAMPLERS)}")
        if self.prediction not in PREDICTIONS:
            raise OnnxoptError(f"--prediction {self.prediction}: use one of {', '.join(PREDICTIONS)}")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise OnnxoptError(f"--steps {self.steps}: must be within 1..1000")
        if self.sampler == "consistency":
            if self.guidance not in (None, 1.0):
                raise OnnxoptError(f"--guidance {self.guidance}: consistency models are sampled without CFG; drop --guidance")
            if self.steps is not None and self.steps > 8:
                raise OnnxoptError(f"--steps {self.steps}: consistency sampling takes 1..8 steps")
            if not 0 < self.sigma_min < self.sigma_max:
                raise OnnxoptError(f"--sigma-min {self.sigma_min} --sigma-max {self.sigma_max}: need 0 < min < max")
        elif self.guidance is not None and not self.guidance >= 1.0:
            raise OnnxoptError(f"--guidance {self.guidance}: must be ≥ 1 (1 = no classifier-free guidance)")
        if not self.seeds:
            raise OnnxoptError("--seeds: give at least one seed")
        if self.batch < 1:
            raise OnnxoptError(f"batch {self.batch}: must be at least 1")

    @property
    def n_steps(self) -> int:
        """Steps with the default filled in."""
        return self.steps if self.steps is not None else (1 if self.sampler == "consistency" else SDXL_STEPS)

    @property
    def cfg(self) -> float:
        """Guidance scale with the default filled in (1: no CFG)."""
        return 1.0 if self.sampler == "consistency" else (self.guidance if self.guidance is not None else SDXL_GUIDANCE)


@dataclass(frozen=True)
class Roles:
    """Which model input is the noisy sample, which the noise level, which conditioning; the output used."""
    sample: InputSpec
    level: InputSpec
    conditioning: tuple[InputSpec, ...]
    output: str
    shape: tuple[int, int, int]   # C, H, W of one sample


def roles(model: onnx.ModelProto, opts: SamplerOptions) -> Roles:
    """Match the model's inputs to the chosen sampler, or say in one line why they do not fit."""
    specs = input_specs(model)
    names = ", ".join(s.name for s in specs)
    floats = [s for s in specs if np.issubdtype(s.dtype, np.floating)]
    four = [s for s in floats if len(s.shape) == 4]
    sample = next((s for s in four if s.name in SAMPLE_NAMES), four[0] if len(four) == 1 else None)
    if sample is None:
        raise OnnxoptError(f"the model's inputs ({names}) have no noisy sample [batch, C, H, W]; --sampler needs a denoiser (a UNet/DiT noise or x0 predictor)")
    wanted = SIGMA_NAMES if opts.sampler == "consistency" else TIMESTEP_NAMES
    level = next((s for s in specs if s.name in wanted), None)
    if level is None:
        other = "euler|ddim|dpmpp (a timestep input)" if opts.sampler == "consistency" else "consistency (a sigma input)"
        has = next((s.name for s in specs if s.name in SIGMA_NAMES + TIMESTEP_NAMES), None)
        hint = f"; its '{has}' input fits --sampler {other}" if has else ""
        raise OnnxoptError(f"--sampler {opts.sampler} needs a {'/'.join(wanted)} input; the model takes {names}{hint}")
    c, h, w = sample.shape[1:]
    if not isinstance(c, int) or c < 1:
        raise OnnxoptError(f"input {sample.name} has a dynamic channel count; export the model with a fixed one")
    if opts.size is not None:
        for got, fixed in zip(opts.size, (h, w)):
            if isinstance(fixed, int) and fixed > 0 and got != fixed:
                raise OnnxoptError(f"--size {opts.size[0]}x{opts.size[1]}: {sample.name} is fixed at {h}x{w}")
        h, w = opts.size
    elif not (isinstance(h, int) and h > 0 and isinstance(w, int) and w > 0):
        raise OnnxoptError(f"input {sample.name} has a dynamic size ({h}x{w}); give --size HxW (latents: pixels / 8)")
    cond = tuple(s for s in specs if s.name not in (sample.name, level.name))
    if opts.cfg > 1 and not cond:
        raise OnnxoptError(f"--guidance {opts.cfg}: the model takes no conditioning input ({names}); use --guidance 1")
    return Roles(sample, level, cond, model.graph.output[0].name, (c, h, w))


def io_model(inputs: Sequence[tuple[str, np.dtype, Sequence]], outputs: Sequence[str]) -> onnx.ModelProto:
    """A node-less model with these inputs (name, dtype, shape) and outputs: enough for `roles` before any work."""
    from onnx import helper
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(d)), list(sh) if sh is not None else None)
           for n, d, sh in inputs]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    return helper.make_model(helper.make_graph([], "io", vis, outs))


# ---------------------------------------------------------------- conditioning
def conditioning(r: Roles, seed: int, index: int, cfg: bool, data: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """One seed's conditioning feeds, batch 2 [uncond, cond] with CFG, else batch 1 (the conditional row)."""
    out = {}
    sdxl = {"encoder_hidden_states", "text_embeds", "time_ids"}
    synth_sdxl = None
    for s in r.conditioning:
        if data is not None and s.name in data:
            rows = np.asarray(data[s.name])[index % len(data[s.name])]
            rows = rows[None] if rows.ndim == len(s.shape) - 1 else rows
            if cfg and len(rows) < 2:
                raise OnnxoptError(f"--data: '{s.name}' has one row per prompt; guidance needs two (unconditional, conditional)")
            out[s.name] = rows[-2:] if cfg else rows[-1:]
        elif s.name in sdxl:
            if synth_sdxl is None:
                synth_sdxl = _sdxl(r, seed, cfg)
            out[s.name] = synth_sdxl.get(s.name)
        else:
            out[s.name] = _generic(s, seed, 2 if cfg else 1)
    return out


def _sdxl(r: Roles, seed: int, cfg: bool) -> dict[str, np.ndarray]:
    from .diffusion import SDXLShapes, sdxl_conditioning
    by = {s.name: s for s in r.conditioning}
    ehs, pooled = by.get("encoder_hidden_states"), by.get("text_embeds")
    dim = lambda spec, i, default: spec.shape[i] if spec is not None and isinstance(spec.shape[i], int) and spec.shape[i] > 0 else default  # noqa: E731
    shapes = SDXLShapes(height=r.shape[1] * 8, width=r.shape[2] * 8, seq_len=dim(ehs, 1, 77), text_dim=dim(ehs, 2, 2048),
                        pooled_dim=dim(pooled, 1, 1280))
    return sdxl_conditioning(seed, shapes, cfg=cfg)


def _generic(s: InputSpec, seed: int, batch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7919])
    shape = (batch,) + tuple(d if isinstance(d, int) and d > 0 else 1 for d in s.shape[1:])
    if not np.issubdtype(s.dtype, np.floating):
        return np.zeros(shape, s.dtype)
    if len(s.shape) == 1:  # a label per sample (class, difficulty): one value in [0, 1], same for both CFG rows
        return np.full(shape, rng.random(), s.dtype)
    return np.broadcast_to(rng.standard_normal((1,) + shape[1:]), shape).astype(s.dtype)


# ---------------------------------------------------------------- the loops
def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """The `steps` noise levels a multi-step consistency sampler visits: Karras rho-spacing over steps+1
    points from sigma_max to sigma_min, the last (sigma_min itself) dropped."""
    ramp = np.linspace(0, 1, steps + 1)[:steps]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + ramp * (b - a)) ** rho


def scheduler(opts: SamplerOptions):
    """A diffusers scheduler with SDXL-base's config for opts.sampler (euler, ddim, dpmpp)."""
    try:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    except ImportError:
        raise OnnxoptError(f"--sampler {opts.sampler} uses diffusers' schedulers; pip install 'onnxopt[export]'") from None
    cfg = dict(SDXL_SCHEDULER, prediction_type=opts.prediction)
    if opts.sampler == "euler":
        return EulerDiscreteScheduler(**cfg)
    if opts.sampler == "ddim":
        return DDIMScheduler(**cfg, clip_sample=False, set_alpha_to_one=False)
    return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)


@dataclass
class Trajectory:
    """Per-step samples (eps samplers: the latent after each step; consistency: each step's x0) and levels."""
    steps: list[np.ndarray] = field(default_factory=list)
    levels: list[float] = field(default_factory=list)

    @property
    def final(self) -> np.ndarray:
        """The last step's samples."""
        return self.steps[-1]


Recorder = Callable[[dict], None]


class Denoiser:
    """One ONNX model in one ORT session (ORT_DISABLE_ALL; FP16 graphs the provider cannot run are emulated)."""

    def __init__(self, model: onnx.ModelProto | None, r: Roles, provider: str, label: str, *, session=None,
                 extra: dict[str, np.ndarray] | None = None):
        """`session`: an existing session of `model` (a gated graph, say) whose `extra` inputs stay fixed."""
        self.model, self.roles, self.label, self.extra = model, r, label, extra or {}
        self.sess = session if session is not None else evaluation_session(model, provider)[0]
        self.types = {i.name: i.type for i in self.sess.get_inputs()}

    def __call__(self, feed: dict[str, np.ndarray], record: Recorder | None = None) -> np.ndarray:
        if record is not None:
            record(feed)
        fed = {k: v.astype(np.float16 if self.types.get(k) == "tensor(float16)" else v.dtype, copy=False)
               if np.issubdtype(v.dtype, np.floating) else v for k, v in feed.items()}
        out = ortx.run_fetched(self.sess, [self.roles.output], {**fed, **self.extra}, model=self.model, label=self.label)[0]
        return np.asarray(out, np.float32)


def _level_feed(spec: InputSpec, value: float, batch: int) -> np.ndarray:
    dt = spec.dtype if np.issubdtype(spec.dtype, np.floating) else np.int64
    if len(spec.shape) == 0:
        return np.asarray(value, dt)
    n = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else batch
    return np.full((n,) + (1,) * (len(spec.shape) - 1), value, dt)


def _noise(seed: int, shape, stream: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, stream]).standard_normal((1,) + tuple(shape)).astype(np.float32)


def sample(den: Denoiser, opts: SamplerOptions, seeds: Sequence[int], start: int, data, record: Recorder | None = None) -> Trajectory:
    """Sample `seeds` (their conditioning rows start at index `start` of `data`) with `den`, as one batch."""
    r = den.roles
    cfg = opts.cfg > 1
    conds = [conditioning(r, s, start + i, cfg, data) for i, s in enumerate(seeds)]
    cond = {k: np.concatenate([c[k][:1] for c in conds] + ([c[k][1:] for c in conds] if cfg else [])) for k in conds[0]}
    if opts.sampler == "consistency":
        return _consistency(den, opts, seeds, cond, record)
    return _scheduled(den, opts, seeds, cond, cfg, record)


def _consistency(den, opts, seeds, cond, record, first: np.ndarray | None = None) -> Trajectory:
    """`first`: the first step's x0 of these seeds, computed before (every step count starts with the same call)."""
    r, traj = den.roles, Trajectory()
    sigmas = karras_sigmas(opts.n_steps, opts.sigma_min, opts.sigma_max)
    x0 = None
    for i, sigma in enumerate(sigmas):
        if i == 0 and first is not None:
            x0 = first
        else:
            z = np.concatenate([_noise(s, r.shape, i) for s in seeds])
            x = z * np.float32(sigma) if x0 is None else x0 + np.float32(np.sqrt(sigma ** 2 - opts.sigma_min ** 2)) * z
            x0 = den({r.sample.name: x.astype(np.float32), r.level.name: _level_feed(r.level, float(sigma), len(seeds)), **cond},
                     record)
        traj.steps.append(x0)
        traj.levels.append(float(sigma))
    return traj


def step_counts(opts: SamplerOptions) -> tuple[int, ...]:
    """The step counts `record_trajectory` records: --steps if given; consistency without it: 1-4 (each seed at
    each count, the shared first call once); the other samplers: their one default schedule (SDXL's 50 steps)."""
    if opts.steps is None and opts.sampler == "consistency":
        return CALIB_CONSISTENCY_STEPS
    return (opts.n_steps,)


def _spread(den: Denoiser, opts: SamplerOptions, counts: Sequence[int], data, record: Recorder, progress: bool) -> None:
    """Each seed (one at a time) sampled at every step count of `counts`, the first call made and recorded once."""
    r = den.roles
    for i, s in enumerate(track(list(opts.seeds), desc="recording: the model", enabled=progress, unit="seed")):
        cond = conditioning(r, s, i, False, data)
        first = None
        for n in sorted(counts):
            one = SamplerOptions(**{**vars(opts), "steps": n, "seeds": (s,), "batch": 1})
            first = _consistency(den, one, (s,), cond, record, first).steps[0]


def _scheduled(den, opts, seeds, cond, cfg, record) -> Trajectory:
    import torch
    r, traj = den.roles, Trajectory()
    sched = scheduler(opts)
    sched.set_timesteps(opts.n_steps)
    x = torch.from_numpy(np.concatenate([_noise(s, r.shape) for s in seeds])) * sched.init_noise_sigma
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t).numpy().astype(np.float32)
        xin = np.concatenate([xin, xin]) if cfg else xin
        out = den({r.sample.name: xin, r.level.name: _level_feed(r.level, float(t), len(xin)), **cond}, record)
        if cfg:
            uncond, text = np.split(out, 2)
            out = uncond + np.float32(opts.cfg) * (text - uncond)
        x = sched.step(torch.from_numpy(out), t, x).prev_sample
        traj.steps.append(x.numpy().astype(np.float32))
        traj.levels.append(float(t))
    return traj


def load_model(path, work: Path | None = None) -> onnx.ModelProto:
    """A model file (lazily: weights stay external) or an in-memory model."""
    if isinstance(path, onnx.ModelProto):
        return path
    if not Path(path).is_file():
        raise OnnxoptError(f"{path}: no such model file; check the path")
    m = modelfile.load(path)
    return modelfile.externalize_if_large(m, work) if work is not None else m


def run_all(model: onnx.ModelProto, r: Roles, opts: SamplerOptions, data, provider: str, label: str,
            record: Recorder | None = None, progress: bool = False) -> Trajectory:
    """Every seed of `opts` through the loop with `model` (one session), seeds batched by opts.batch."""
    den = Denoiser(model, r, provider, label)
    traj = run_with(den, opts, data, record, progress)
    del den
    gc.collect()
    return traj


def run_with(den: Denoiser, opts: SamplerOptions, data=None, record: Recorder | None = None,
             progress: bool = False) -> Trajectory:
    """Every seed of `opts` through the loop with `den`, seeds batched by opts.batch."""
    chunks = [list(opts.seeds[i:i + opts.batch]) for i in range(0, len(opts.seeds), opts.batch)]
    parts = []
    start = 0
    for chunk in track(chunks, desc=f"sampling: {den.label}", enabled=progress, unit="batch"):
        parts.append(sample(den, opts, chunk, start, data, record))
        start += len(chunk)
    return Trajectory([np.concatenate([p.steps[i] for p in parts]) for i in range(len(parts[0].steps))], parts[0].levels)


def record_trajectory(model, opts: SamplerOptions, *, data=None, provider: str = "cpu",
                      allow_cpu_fallback: bool = False, progress: bool = False) -> dict[str, np.ndarray]:
    """Calibration data along the sampler's own trajectory: every input of every call the model gets while
    `opts` samples each seed (one seed per call: batch 1, or 2 with CFG), at each of `step_counts(opts)`.
    Arrays with a leading sample axis (calls × seeds samples), as `quantize --calib` reads them."""
    ortx.check_provider(provider, allow_cpu_fallback)
    m = load_model(model)
    r = roles(m, opts)
    cond = load_conditioning(data, r, opts)
    calls: list[dict[str, np.ndarray]] = []
    keep = lambda feed: calls.append({k: np.array(v) for k, v in feed.items()})  # noqa: E731
    counts = step_counts(opts)
    if len(counts) == 1:
        run_all(m, r, SamplerOptions(**{**vars(opts), "batch": 1}), cond, provider, "the model", record=keep, progress=progress)
    else:
        den = Denoiser(m, r, provider, "the model")
        _spread(den, opts, counts, cond, keep, progress)
        del den
        gc.collect()
    return {k: np.stack([c[k] for c in calls]) for k in calls[0]}


# ---------------------------------------------------------------- the comparison
@dataclass(frozen=True)
class StepDrift:
    """Candidate vs reference after one step."""
    step: int
    level: float       # timestep (eps samplers) or sigma (consistency)
    cosine: float      # mean per sample
    psnr_db: float     # mean per sample
    max_abs: float


@dataclass
class SampleComparison:
    """Final-sample fidelity and per-step drift of a candidate denoiser against its reference."""
    options: SamplerOptions
    final: M.Fidelity
    drift: list[StepDrift]
    provider: str
    reference: np.ndarray = field(repr=False, default=None)
    candidate: np.ndarray = field(repr=False, default=None)

    def as_dict(self) -> dict:
        """JSON report (the sample arrays left out)."""
        o = self.options
        return {"sampler": o.sampler, "steps": o.n_steps, "guidance": o.cfg, "seeds": list(o.seeds),
                "prediction": o.prediction if o.sampler != "consistency" else None,
                "data_range": o.data_range if o.data_range is not None else "reference peak-to-peak per sample",
                "provider": self.provider, "final": self.final.as_dict(),
                "drift": [vars(d) for d in self.drift]}


def compare_sampled(reference, candidate, opts: SamplerOptions, *, data: str | dict | None = None,
                    provider: str = "cpu", allow_cpu_fallback: bool = False, progress: bool = False,
                    reference_run: Trajectory | None = None) -> SampleComparison:
    """Sample the reference, then the candidate, with the same seeds/noise/conditioning, and compare.
    `reference_run` reuses a reference trajectory sampled before with the same options."""
    import tempfile
    ran_on = "cuda" if "CUDAExecutionProvider" in ortx.check_provider(provider, allow_cpu_fallback) else "cpu"
    with tempfile.TemporaryDirectory(prefix="onnxopt-sample-") as work:
        ref_m = load_model(reference, Path(work) / "ref")
        r = roles(ref_m, opts)
        cand_m = load_model(candidate, Path(work) / "cand")
        check_candidate(cand_m, r)
        cond = load_conditioning(data, r, opts)
        # Both sessions alive at once where both models fit (compare.py): the candidate's is built in a worker
        # thread while the reference samples; else one model at a time.
        together = reference_run is None and ortx.fit_together([ref_m, cand_m], provider, MEMORY_BUDGET_MB)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(Denoiser, cand_m, r, provider, "the candidate") if together else None
            ref = reference_run or run_all(ref_m, r, opts, cond, provider, "the reference", progress=progress)
            del ref_m
            den = pending.result() if pending is not None else Denoiser(cand_m, r, provider, "the candidate")
        cand = run_with(den, opts, cond, progress=progress)
        del den
    return compare_trajectories(ref, cand, opts, ran_on)


def compare_trajectories(ref: Trajectory, cand: Trajectory, opts: SamplerOptions, provider: str = "cpu") -> SampleComparison:
    """Fidelity of the final samples and drift at each step."""
    drift = []
    for i, (a, b) in enumerate(zip(ref.steps, cand.steps)):
        drift.append(StepDrift(i + 1, ref.levels[i], float(np.mean(M.cosine_per_sample(a, b))),
                               float(np.mean(M.psnr_per_sample(a, b, opts.data_range))), M.max_abs(a, b)))
    return SampleComparison(opts, M.fidelity(ref.final, cand.final, opts.data_range), drift, provider,
                            ref.final, cand.final)


def check_candidate(cand: onnx.ModelProto, r: Roles) -> None:
    """The candidate takes the reference's sampler inputs and gives its output."""
    have = {s.name for s in input_specs(cand)}
    need = {r.sample.name, r.level.name} | {s.name for s in r.conditioning}
    if have != need:
        raise OnnxoptError(f"the candidate's inputs {sorted(have)} differ from the reference's {sorted(need)}; compare models of the same network")
    if r.output not in {o.name for o in cand.graph.output}:
        raise OnnxoptError(f"the candidate has no output '{r.output}'; compare models of the same network")


def load_conditioning(data, r: Roles, opts: SamplerOptions) -> dict[str, np.ndarray] | None:
    """Conditioning rows from an .npz (or a dict), checked against the model's conditioning inputs."""
    if data is None:
        return None
    if not isinstance(data, dict):
        p = Path(data)
        if p.suffix != ".npz" or not p.is_file():
            raise OnnxoptError(f"--data {data}: with --sampler, give an .npz of conditioning arrays keyed by input name")
        with np.load(p) as z:
            data = {k: z[k] for k in z.files}
    known = {s.name: s for s in r.conditioning}
    use = {k: v for k, v in data.items() if k in known}
    if not use:
        raise OnnxoptError(f"--data holds none of the conditioning inputs ({', '.join(known) or 'the model has none'})")
    for k, v in use.items():
        if v.ndim not in (len(known[k].shape), len(known[k].shape) + 1) or len(v) == 0:
            raise OnnxoptError(f"--data '{k}' has shape {v.shape}; want [prompts, batch, ...] matching input {k} {known[k].shape}")
    return use


def format_table(res: SampleComparison) -> str:
    """Drift per step, then the final-sample line."""
    o = res.options
    lvl = "sigma" if o.sampler == "consistency" else "timestep"
    lines = [f"{'step':>5}{lvl:>10}{'cosine':>12}{'PSNR dB':>10}{'max abs':>11}"]
    for d in res.drift:
        lines.append(f"{d.step:>5}{d.level:>10.4g}{d.cosine:>12.6f}{d.psnr_db:>10.2f}{d.max_abs:>11.4g}")
    f = res.final
    lines.append(f"final samples ({f.samples} seeds, {o.sampler} {o.n_steps} step(s), guidance {o.cfg:g}): "
                 f"PSNR {f.psnr_mean:.2f} dB (worst {f.psnr_worst:.2f}), SSIM {f.ssim_mean:.4f} (worst {f.ssim_worst:.4f}), "
                 f"cosine {f.cosine_mean:.6f} (worst {f.cosine_worst:.6f})")
    return "\n".join(lines)
