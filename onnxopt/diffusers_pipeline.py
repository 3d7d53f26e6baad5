"""A user's diffusers pipeline folder with an ONNX UNet swapped in: the real text encoders, scheduler and VAE run in
torch, the UNet in ONNX Runtime (CPU or CUDA). Two uses:

- `compare_pipeline`: the reference and the candidate ONNX UNet each generate every (prompt, seed) image with the
  same generator seed, prompts, scheduler, steps, guidance and size; the latents are compared step by step (drift)
  and at the end, the decoded 8-bit images (what the pipeline's PIL output holds) by PSNR and SSIM over 0..255,
  and by LPIPS when its weights are on this machine (never downloaded);
- `record_trajectory`: the UNet's inputs at every call while the pipeline generates, as calibration data.

The folder is a `save_pretrained` directory of a UNet pipeline (model_index.json, unet/, vae/, text encoders,
tokenizers, scheduler/) whose class reports each step (`callback_on_step_end`: StableDiffusion, SDXL, ...).
The UNet's torch weights are never loaded: `OnnxUNet` stands in for it with the folder's unet/config.json.
The ONNX UNet's inputs are named after the UNet call's arguments (sample, timestep, encoder_hidden_states, and
for SDXL text_embeds, time_ids), as diffusers/optimum exports and models/sdxl_unet.py name them.
diffusers and torch are imported only when a pipeline is loaded.
"""
from __future__ import annotations

import inspect
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from . import metrics as M
from . import ort as ortx
from . import sampler as S
from .calib import InputSpec, input_specs
from .errors import OnnxoptError
from .progress import track
from .settings import MEMORY_BUDGET_MB

log = logging.getLogger(__name__)

SAMPLERS = ("euler", "ddim", "dpmpp")
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond")
TEXT_TIME = ("text_embeds", "time_ids")   # SDXL's added conditioning (unet config addition_embed_type "text_time")
MAX_PROMPTS = 1000
MAX_IMAGES = 4096
IMAGE_RANGE = 255.0                       # image metrics are over the 8-bit pixels
LPIPS_NET = "alexnet-owt-7be5be79.pth"    # torchvision's AlexNet weights, which lpips' default network needs


# ---------------------------------------------------------------- checks before any work
@dataclass(frozen=True)
class PipelineFolder:
    """A diffusers pipeline folder as read from its JSON files (no weights loaded)."""
    path: Path
    pipeline_class: str
    unet: dict          # unet/config.json
    vae_scale: int      # pixels per latent (2 ** (VAE blocks - 1))

    @property
    def text_time(self) -> bool:
        """Whether the UNet takes SDXL's text_embeds and time_ids."""
        return self.unet.get("addition_embed_type") == "text_time"

    @property
    def default_size(self) -> tuple[int, int]:
        """The pipeline's default image size in pixels (UNet sample_size × VAE scale)."""
        s = self.unet.get("sample_size") or 64
        h, w = (s, s) if isinstance(s, int) else s
        return h * self.vae_scale, w * self.vae_scale


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OnnxoptError(f"{path}: cannot read the {what} ({type(e).__name__}); the pipeline folder may be damaged") from None


def check_folder(path) -> PipelineFolder:
    """A pipeline folder with model_index.json, unet/ (a UNet2DConditionModel config) and vae/, or one error line."""
    p = Path(path)
    if not p.is_dir():
        raise OnnxoptError(f"--pipeline {path}: no such folder; give a diffusers pipeline folder (save_pretrained)")
    if not (p / "model_index.json").is_file():
        raise OnnxoptError(f"--pipeline {path}: not a diffusers pipeline folder (model_index.json missing)")
    index = _json(p / "model_index.json", "model_index.json")
    for part in ("unet", "vae"):
        if not (p / part / "config.json").is_file():
            raise OnnxoptError(f"--pipeline {path}: the folder has no {part}/ (config.json); compare and trajectory "
                               "calibration need a UNet pipeline with its VAE (e.g. Stable Diffusion, SDXL)")
    unet_cls = (index.get("unet") or [None, None])[1]
    if unet_cls != "UNet2DConditionModel":
        raise OnnxoptError(f"--pipeline {path}: its unet is a {unet_cls}; only UNet2DConditionModel pipelines are supported")
    vae = _json(p / "vae" / "config.json", "VAE config")
    return PipelineFolder(p, str(index.get("_class_name")), _json(p / "unet" / "config.json", "UNet config"),
                          2 ** (len(vae.get("block_out_channels", [0])) - 1))


def read_prompts(path) -> tuple[str, ...]:
    """Non-empty lines of a prompt file, or one error line."""
    if path is None:
        raise OnnxoptError("--pipeline needs --prompts FILE (one prompt per line)")
    p = Path(path)
    if not p.is_file():
        raise OnnxoptError(f"--prompts {path}: no such file; give a text file with one prompt per line")
    with open(p, encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for _, ln in zip(range(MAX_PROMPTS + 1), f) if ln.strip()]
    if not lines:
        raise OnnxoptError(f"--prompts {path}: the file has no prompts; write one prompt per line")
    if len(lines) > MAX_PROMPTS:
        raise OnnxoptError(f"--prompts {path}: more than {MAX_PROMPTS} prompts; give fewer")
    return tuple(lines)


@dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline generates: scheduler (None: the folder's own), steps and guidance (None: the pipeline's
    defaults), image size in pixels (None: the pipeline's default), seeds; checked on construction."""
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    size: tuple[int, int] | None = None
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise OnnxoptError(f"--sampler {self.sampler} does not apply with --pipeline; use {', '.join(SAMPLERS)} "
                               "or leave --sampler out for the pipeline's own scheduler")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise OnnxoptError(f"--steps {self.steps}: must be within 1..1000")
        if self.guidance is not None and not self.guidance >= 1.0:
            raise OnnxoptError(f"--guidance {self.guidance}: must be ≥ 1 (1 = no classifier-free guidance)")
        if not self.seeds:
            raise OnnxoptError("--seeds: give at least one seed")

    def call_kwargs(self) -> dict:
        """Keyword arguments of the pipeline call for the options that are set."""
        kw = {"num_inference_steps": self.steps, "guidance_scale": self.guidance}
        if self.size is not None:
            kw["height"], kw["width"] = self.size
        return {k: v for k, v in kw.items() if v is not None}


@dataclass(frozen=True)
class UNetIO:
    """The ONNX UNet's inputs (by the UNet call's argument names) and the output used."""
    inputs: tuple[InputSpec, ...]
    output: str

    def roles(self, latent: tuple[int, int, int]) -> S.Roles:
        """The sampler's view of the same model (for its Denoiser)."""
        by = {s.name: s for s in self.inputs}
        return S.Roles(by["sample"], by["timestep"], tuple(s for s in self.inputs if s.name not in ("sample", "timestep")),
                       self.output, latent)


def check_unet(model: onnx.ModelProto, folder: PipelineFolder, opts: PipelineOptions, what: str = "the ONNX UNet") -> UNetIO:
    """The ONNX UNet takes what the pipeline's UNet call gives, or one error line saying what differs."""
    specs = tuple(input_specs(model))
    names = {s.name for s in specs}
    need = ({"sample", "timestep", "encoder_hidden_states"} | (set(TEXT_TIME) if folder.text_time else set())
            | ({"timestep_cond"} if folder.unet.get("time_cond_proj_dim") else set()))  # LCM's guidance embedding
    have = ", ".join(s.name for s in specs)
    unknown = sorted(names - set(UNET_INPUTS))
    if unknown or need - names:
        why = f"inputs {', '.join(unknown)} are not arguments of the UNet call" if unknown else f"it lacks {', '.join(sorted(need - names))}"
        raise OnnxoptError(f"{what} does not fit the pipeline's UNet call ({why}); it takes {have}, the {folder.pipeline_class} "
                           f"UNet gets {', '.join(n for n in UNET_INPUTS if n in need)}; export the pipeline's own UNet")
    if not folder.text_time and names & set(TEXT_TIME):
        raise OnnxoptError(f"{what} takes {', '.join(sorted(names & set(TEXT_TIME)))} (SDXL conditioning) but the pipeline's "
                           "UNet has no addition_embed_type text_time; export the pipeline's own UNet")
    if "timestep_cond" in names - need:
        raise OnnxoptError(f"{what} takes timestep_cond but the pipeline's UNet has no time_cond_proj_dim; export the pipeline's own UNet")
    by = {s.name: s for s in specs}
    h, w = opts.size or folder.default_size
    checks = [("sample", 1, folder.unet.get("in_channels")), ("encoder_hidden_states", 2, folder.unet.get("cross_attention_dim")),
              ("sample", 2, h // folder.vae_scale), ("sample", 3, w // folder.vae_scale)]
    for name, axis, want in checks:
        got = by[name].shape[axis] if len(by[name].shape) > axis else None
        if isinstance(got, int) and got > 0 and isinstance(want, int) and got != want:
            raise OnnxoptError(f"{what}: input {name} has {got} at axis {axis}, the pipeline's UNet call gives {want}"
                               f"{' (image ' + str(h) + 'x' + str(w) + ')' if axis >= 2 else ''}; export the pipeline's own UNet"
                               + (" or give --size" if axis >= 2 else ""))
    if not model.graph.output:
        raise OnnxoptError(f"{what} has no outputs")
    return UNetIO(specs, model.graph.output[0].name)


def check_pipeline_class(folder: PipelineFolder):
    """The pipeline class (imported from diffusers), which must report its steps: callback_on_step_end."""
    import diffusers

    from .diffusion import quiet_hf
    with quiet_hf():  # importing a pipeline class imports transformers' image processors, which warn
        cls = getattr(diffusers, folder.pipeline_class, None)
    if cls is None:
        raise OnnxoptError(f"--pipeline {folder.path}: diffusers {diffusers.__version__} has no pipeline class {folder.pipeline_class}")
    params = inspect.signature(cls.__call__).parameters
    if "callback_on_step_end" not in params or "output_type" not in params:
        raise OnnxoptError(f"--pipeline {folder.path}: {folder.pipeline_class} does not report its steps (no callback_on_step_end); "
                           "use a Stable Diffusion / SDXL-style pipeline")
    return cls


def settings(folder: PipelineFolder, opts: PipelineOptions) -> tuple[int | None, float | None]:
    """The steps and guidance a run uses: the options given, else the pipeline class's call defaults."""
    params = inspect.signature(check_pipeline_class(folder).__call__).parameters
    default = lambda name: params[name].default if name in params else None  # noqa: E731
    return (opts.steps if opts.steps is not None else default("num_inference_steps"),
            opts.guidance if opts.guidance is not None else default("guidance_scale"))


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else "the pipeline's"


# ---------------------------------------------------------------- the pipeline with an ONNX UNet
def _unet_class():
    from diffusers import UNet2DConditionModel
    from diffusers.configuration_utils import FrozenDict
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
    import torch

    class OnnxUNet(UNet2DConditionModel):
        """The pipeline's UNet, computed by an ONNX model in ONNX Runtime (`use` picks which); holds no torch weights.
        A UNet2DConditionModel by type, so that diffusers accepts it as the pipeline's unet component."""

        def __init__(self, config: dict, device: str = "cpu"):  # noqa: D107  (no super().__init__: no layers built)
            torch.nn.Module.__init__(self)
            self._internal_dict = FrozenDict(config)
            self._where = torch.device(device)
            self.denoiser: S.Denoiser | None = None
            self.record = None
            if config.get("addition_embed_type") == "text_time":  # SDXL's pipeline checks its input width
                width = config.get("projection_class_embeddings_input_dim")
                self.add_embedding = torch.nn.Module()
                self.add_embedding.linear_1 = torch.nn.Linear(width, 1, device="meta")

        @property
        def device(self):
            """Where the pipeline puts the UNet's inputs (no parameters to ask)."""
            return self._where

        @property
        def dtype(self):
            """FP32: the ONNX UNet's inputs and outputs (an FP16 graph's inputs are cast by the Denoiser)."""
            return torch.float32

        def use(self, denoiser: S.Denoiser | None, record=None) -> None:
            """Compute with `denoiser` from now on (None: none; a call fails); `record(feed)` sees every call."""
            self.denoiser, self.record = denoiser, record

        def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None,
                    return_dict: bool = True, **unused):
            """The UNet call: its arguments fed to the ONNX model by input name, its output as the noise prediction."""
            if self.denoiser is None:
                raise RuntimeError("OnnxUNet called before use(denoiser)")
            added = added_cond_kwargs or {}
            given = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                     "timestep_cond": timestep_cond, "text_embeds": added.get("text_embeds"), "time_ids": added.get("time_ids")}
            feed = {}
            for spec in (*self.denoiser.roles.conditioning, self.denoiser.roles.sample, self.denoiser.roles.level):
                if given.get(spec.name) is None:
                    raise RuntimeError(f"the pipeline's UNet call gave no {spec.name}")
                feed[spec.name] = _feed(spec, given[spec.name], len(sample))
            out = self.denoiser(feed, self.record)
            out = torch.from_numpy(out).to(sample.device, sample.dtype)
            return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    return OnnxUNet


def _feed(spec: InputSpec, value, batch: int) -> np.ndarray:
    """A torch argument as the ONNX input wants it (the timestep scalar broadcast to the input's shape)."""
    a = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
    if spec.name == "timestep":
        a = a.reshape(-1)
        if len(spec.shape) == 0:
            a = a[0]
        elif a.size == 1:
            n = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else batch
            a = np.broadcast_to(a, (n,) + (1,) * (len(spec.shape) - 1))
    dt = np.float32 if np.issubdtype(spec.dtype, np.floating) else spec.dtype  # the Denoiser casts to FP16 inputs
    return np.ascontiguousarray(a, dtype=dt)


def load(folder: PipelineFolder, provider: str = "cpu", opts: PipelineOptions | None = None):
    """The pipeline (FP32, torch on CPU, or CUDA when the UNet runs there and torch sees a GPU) with an OnnxUNet."""
    import torch
    from .diffusion import quiet_hf
    cls = check_pipeline_class(folder)
    device = "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"
    unet = _unet_class()(folder.unet, device)
    try:
        with quiet_hf():
            pipe = cls.from_pretrained(str(folder.path), unet=unet, torch_dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise OnnxoptError(f"--pipeline {folder.path}: cannot load the pipeline ({str(e).splitlines()[0][:200]})") from None
    if device != "cpu":
        for name in ("text_encoder", "text_encoder_2", "vae"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
    if opts is not None and opts.sampler is not None:
        pipe.scheduler = scheduler_for(opts.sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler_for(sampler: str, config):
    """diffusers' Euler, DDIM or DPM-Solver++ (2M) with the pipeline's own scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


@dataclass
class Generated:
    """One model's run over every (prompt, seed): latents after each step, the 8-bit images [N, H, W, 3] as float32
    levels 0..255 (NaN where the decoded image was not finite, so that no metric scores it)."""
    latents: S.Trajectory
    images: np.ndarray


def jobs(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """Every prompt with every seed, prompt-major; bounded by MAX_IMAGES."""
    if len(prompts) * len(seeds) > MAX_IMAGES:
        raise OnnxoptError(f"{len(prompts)} prompts × {len(seeds)} seeds is more than {MAX_IMAGES} images; give fewer")
    return [(p, s) for p in prompts for s in seeds]


def generate(pipe, den: S.Denoiser, todo: Sequence[tuple[str, int]], opts: PipelineOptions, *, record=None,
             progress: bool = False) -> Generated:
    """Run the pipeline once per (prompt, seed) with `den` as its UNet (the same torch generator seed per image)."""
    import torch
    steps_per_image: list[list[np.ndarray]] = []
    levels: list[float] = []
    images = []
    pipe.unet.use(den, record)
    try:
        for prompt, seed in track(list(todo), desc=f"generating: {den.label}", enabled=progress, unit="image"):
            seen: list[np.ndarray] = []

            def on_step(p, i, t, kw, seen=seen):
                seen.append(kw["latents"].detach().float().cpu().numpy())
                if len(steps_per_image) == 0:
                    levels.append(float(t))
                return kw

            with torch.inference_mode():
                out = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                           callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"], **opts.call_kwargs())
            steps_per_image.append(seen)
            images.append((np.asarray(out.images[0], np.float32) * 255).round().clip(0, 255))  # as numpy_to_pil; NaN stays
    finally:
        pipe.unet.use(None)
    traj = S.Trajectory([np.concatenate([s[i] for s in steps_per_image]) for i in range(len(steps_per_image[0]))], levels)
    return Generated(traj, np.stack(images))


def _denoiser(model, io: UNetIO, folder: PipelineFolder, opts: PipelineOptions, provider: str, label: str) -> S.Denoiser:
    h, w = opts.size or folder.default_size
    latent = (int(folder.unet.get("in_channels", 4)), h // folder.vae_scale, w // folder.vae_scale)
    return S.Denoiser(model, io.roles(latent), provider, label)


# ---------------------------------------------------------------- LPIPS, when it is on this machine
def lpips_metric():
    """(a function of two 8-bit image batches [N, H, W, 3] -> per-image LPIPS, None), or (None, why not) when the lpips package or
    the AlexNet weights it needs are not on this machine. Nothing is downloaded."""
    try:
        import lpips
    except ImportError:
        return None, "the lpips package is not installed"
    import torch
    net = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_NET
    if not net.is_file():
        return None, f"torchvision's AlexNet weights ({LPIPS_NET}) are not in {net.parent}"
    model = lpips.LPIPS(net="alex", verbose=False).eval()

    def score(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
        t = lambda a: torch.from_numpy(np.moveaxis(a.astype(np.float32) / 127.5 - 1, -1, 1))  # noqa: E731
        with torch.inference_mode():
            return model(t(ref), t(cand)).reshape(-1).numpy().astype(np.float64)
    return score, None


# ---------------------------------------------------------------- the comparison
@dataclass
class PipelineComparison:
    """Decoded images and latents of the candidate UNet's pipeline run against the reference's."""
    folder: PipelineFolder
    options: PipelineOptions
    prompts: tuple[str, ...]
    scheduler: str
    steps: int
    images: M.Fidelity          # over 8-bit pixels, range 255
    latents: M.Fidelity         # final latents, each reference sample's peak-to-peak
    drift: list[S.StepDrift]
    lpips: tuple[float, float] | None   # mean, worst
    lpips_note: str | None              # why LPIPS is missing
    provider: str
    reference: np.ndarray = field(repr=False, default=None)   # 8-bit levels [N, H, W, 3] (float32, NaN: not finite)
    candidate: np.ndarray = field(repr=False, default=None)

    def as_dict(self) -> dict:
        """JSON report (the images left out)."""
        o = self.options
        h, w = self.reference.shape[1:3]
        return {"pipeline": str(self.folder.path), "pipeline_class": self.folder.pipeline_class, "scheduler": self.scheduler,
                "steps": self.steps, "guidance": settings(self.folder, o)[1],
                "size": f"{h}x{w}", "prompts": list(self.prompts), "seeds": list(o.seeds), "provider": self.provider,
                "images": {**self.images.as_dict(), "data_range": IMAGE_RANGE},
                "lpips": {"mean": self.lpips[0], "worst": self.lpips[1]} if self.lpips else f"not available offline ({self.lpips_note})",
                "latents": self.latents.as_dict(), "drift": [vars(d) for d in self.drift]}


def load_and_check(reference, candidate, folder: PipelineFolder, opts: PipelineOptions, work: Path):
    """Both ONNX UNets read (external weights lazily, large embedded ones moved out to `work`) and checked against
    the pipeline's UNet call and each other."""
    ref = S.load_model(reference, work / "ref")
    io = check_unet(ref, folder, opts, f"the reference {reference}")
    cand = S.load_model(candidate, work / "cand") if candidate is not None else None
    if cand is not None:
        io_c = check_unet(cand, folder, opts, f"the candidate {candidate}")
        if {s.name for s in io_c.inputs} != {s.name for s in io.inputs} or io_c.output != io.output:
            raise OnnxoptError("the candidate's inputs or output differ from the reference's; compare models of the same network")
    return ref, cand, io


def compare_pipeline(reference, candidate, folder: PipelineFolder, prompts: Sequence[str], opts: PipelineOptions, *,
                     provider: str = "cpu", allow_cpu_fallback: bool = False, progress: bool = False) -> PipelineComparison:
    """Generate every (prompt, seed) image with each ONNX UNet in the pipeline; compare latents, drift and images."""
    import gc
    import tempfile
    ran_on = "cuda" if "CUDAExecutionProvider" in ortx.check_provider(provider, allow_cpu_fallback) else "cpu"
    todo = jobs(prompts, opts.seeds)
    with tempfile.TemporaryDirectory(prefix="onnxopt-pipeline-") as work:
        ref_m, cand_m, io = load_and_check(reference, candidate, folder, opts, Path(work))
        score, note = lpips_metric()
        pipe = load(folder, ran_on, opts)
        runs = []
        # The candidate's session built while the reference generates, where both fit (compare.py).
        together = ortx.fit_together([ref_m, cand_m], ran_on, MEMORY_BUDGET_MB)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_denoiser, cand_m, io, folder, opts, ran_on, "the candidate") if together else None
            den = _denoiser(ref_m, io, folder, opts, ran_on, "the reference")
            runs.append(generate(pipe, den, todo, opts, progress=progress))
            del den
            gc.collect()
            den = pending.result() if pending is not None else _denoiser(cand_m, io, folder, opts, ran_on, "the candidate")
        runs.append(generate(pipe, den, todo, opts, progress=progress))
        del den
        gc.collect()
    ref, cand = runs
    latent = S.compare_trajectories(ref.latents, cand.latents, S.SamplerOptions(seeds=opts.seeds))
    nchw = lambda a: np.moveaxis(a, -1, 1)  # noqa: E731
    lp = None
    if score is not None:  # NaN for a candidate whose images are not finite (as every other metric)
        v = score(ref.images, cand.images) if np.isfinite(cand.images).all() else np.array([np.nan])
        lp = (float(np.mean(v)), float(np.max(v)))
    return PipelineComparison(folder, opts, tuple(prompts), type(pipe.scheduler).__name__, len(ref.latents.steps),
                              M.fidelity(nchw(ref.images), nchw(cand.images), IMAGE_RANGE), latent.final, latent.drift,
                              lp, note, ran_on, ref.images, cand.images)


def format_table(res: PipelineComparison) -> str:
    """Latent drift per step, the final latents, the decoded images and LPIPS (or why it is missing)."""
    lines = [f"{'step':>5}{'timestep':>10}{'cosine':>12}{'PSNR dB':>10}{'max abs':>11}   (latents)"]
    for d in res.drift:
        lines.append(f"{d.step:>5}{d.level:>10.4g}{d.cosine:>12.6f}{d.psnr_db:>10.2f}{d.max_abs:>11.4g}")
    f, im = res.latents, res.images
    n, h, w = res.reference.shape[:3]
    lines.append(f"final latents: PSNR {f.psnr_mean:.2f} dB (worst {f.psnr_worst:.2f}), cosine {f.cosine_mean:.6f}")
    lines.append(f"decoded images ({n} = {len(res.prompts)} prompt(s) x {len(res.options.seeds)} seed(s), {h}x{w}, 8-bit, "
                 f"{res.scheduler} {res.steps} step(s), guidance {_num(settings(res.folder, res.options)[1])}): PSNR {im.psnr_mean:.2f} dB (worst {im.psnr_worst:.2f}), "
                 f"SSIM {im.ssim_mean:.4f} (worst {im.ssim_worst:.4f})")
    lines.append(f"LPIPS: {res.lpips[0]:.4f} (worst {res.lpips[1]:.4f})" if res.lpips
                 else f"LPIPS: not available offline ({res.lpips_note})")
    return "\n".join(lines)


# ---------------------------------------------------------------- trajectory calibration
def record_trajectory(model, folder: PipelineFolder, prompts: Sequence[str], opts: PipelineOptions, *, provider: str = "cpu",
                      allow_cpu_fallback: bool = False, progress: bool = False) -> dict[str, np.ndarray]:
    """The ONNX UNet's inputs at every call while the real pipeline generates each (prompt, seed) with it: arrays with a
    leading sample axis (images × steps), each sample one call's batch (2 rows [uncond, cond] with guidance)."""
    import tempfile
    ran_on = "cuda" if "CUDAExecutionProvider" in ortx.check_provider(provider, allow_cpu_fallback) else "cpu"
    todo = jobs(prompts, opts.seeds)
    calls: list[dict[str, np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-pipeline-") as work:
        m, _, io = load_and_check(model, None, folder, opts, Path(work))
        pipe = load(folder, ran_on, opts)
        den = _denoiser(m, io, folder, opts, ran_on, "the model")
        generate(pipe, den, todo, opts, record=lambda feed: calls.append({k: np.array(v) for k, v in feed.items()}),
                 progress=progress)
    return {k: np.stack([c[k] for c in calls]) for k in calls[0]}


def describe_source(folder: PipelineFolder, prompts: Sequence[str], opts: PipelineOptions, scheduler: str | None = None) -> str:
    """Where trajectory calibration came from, for the summary line."""
    h, w = opts.size or folder.default_size
    steps, guidance = settings(folder, opts)
    return (f"recorded from the pipeline {folder.path} ({folder.pipeline_class}: its text encoders, "
            f"{opts.sampler or 'its own'} scheduler, {steps} steps, guidance {_num(guidance)}, {h}x{w}, "
            f"{len(prompts)} prompt(s) x {len(opts.seeds)} seed(s))")
