"""calib-data: calibration data for model families (SDXL UNet)."""
from __future__ import annotations

import click

from ..errors import OnnxoptError
from .common import (check_report, provider_options, sampler_loop_options, file_size, summary_line, write_json, handle_errors, main,
                     progress_enabled)


@main.group("calib-data")
def calib_data():
    """Write calibration data (.npz for `quantize --calib`).

    \b
    trajectory  recorded along a sampler's own trajectory: runs the given FP32 ONNX denoiser in the loop
                (steps, guidance, size and seeds you deploy); with --pipeline DIR --prompts FILE inside your
                real diffusers pipeline (its text encoders, scheduler, resolution), else with the synthetic
                SDXL schedule and conditioning from --data or synthesised; the summary says which
    sdxl        synthetic SDXL UNet inputs spread over an Euler schedule (no model run), or recorded
                from a diffusers pipeline with --pipeline
    text        token inputs of a text encoder (BERT-style) from a text file, one sample per line,
                tokenized by the model's own tokenizer, each at its own length (no padding)"""


@calib_data.command("sdxl")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="sdxl_calib.npz", show_default=True, help="Output .npz.")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="UNet calls (synthetic), or steps kept per prompt (--pipeline).")
@click.option("--steps", type=click.IntRange(1, 1000), default=30, show_default=True, help="Denoising steps of the schedule the samples are spread over.")
@click.option("--height", type=click.IntRange(min=8), default=1024, show_default=True, help="Image height in pixels, a multiple of 8 (latents are 8x smaller).")
@click.option("--width", type=click.IntRange(min=8), default=1024, show_default=True, help="Image width in pixels, a multiple of 8.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (use another one for held-out evaluation data).")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False), help="Local diffusers SDXL pipeline folder: record its real UNet inputs instead.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="With --pipeline: text file, one prompt per line.")
@click.option("--device", help="With --pipeline: torch device (default: cpu).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write shapes and ranges of the arrays as JSON to this file.")
@handle_errors
def calib_data_sdxl(output, samples, steps, height, width, seed, pipeline, prompts, device, report_path):
    """SDXL UNet inputs at noise levels across the schedule, CFG batch 2, 1024x1024 time ids: synthetic (no
    model runs; latents and text embeddings follow SDXL's statistics), or recorded from a real pipeline with
    --pipeline. For inputs along your own sampler's trajectory, use `calib-data trajectory`."""
    import os

    from .. import diffusion
    if not output.endswith(".npz"):
        raise OnnxoptError(f"-o {output}: calibration data is written as .npz; name the output *.npz")
    if report_path and os.path.abspath(report_path) == os.path.abspath(output):
        raise OnnxoptError(f"--report {report_path} is the -o output too; give the report another file name")
    check_report(report_path)
    from ..atomicfile import check_writable
    check_writable(output, "-o")
    if not pipeline and (prompts or device):
        raise OnnxoptError(f"{'--prompts' if prompts else '--device'} applies only with --pipeline DIR (recording a real pipeline)")
    if height % 8 or width % 8:
        raise OnnxoptError(f"--height {height} --width {width}: both must be multiples of 8 (latents are 8x smaller)")
    if pipeline:
        if not prompts:
            raise OnnxoptError("--pipeline needs --prompts FILE (one prompt per line)")
        with open(prompts, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        if not lines:
            raise OnnxoptError(f"--prompts {prompts}: the file has no prompts; write one prompt per line")
        pipe = diffusion.load_pipeline(pipeline, device or "cpu")
        arrays = diffusion.record_unet_inputs(pipe, lines, steps=steps, per_prompt=samples, seed=seed,
                                              height=height, width=width)
    else:
        arrays = diffusion.synthesize_sdxl(samples, steps=steps, seed=seed,
                                           shapes=diffusion.SDXLShapes(height=height, width=width))
    path = diffusion.save_npz(arrays, output)
    summary_line(diffusion.describe(arrays))
    if report_path:
        write_json(report_path, {"output": str(path), "samples": len(arrays["sample"]),
                                  "arrays": {k: {"shape": list(v.shape), "min": float(v.min()), "max": float(v.max()),
                                                 "std": float(v.std())} for k, v in arrays.items()}})
    summary_line(f"wrote {path} ({len(arrays['sample'])} samples of {len(arrays)} UNet inputs, "
             f"{'recorded from ' + str(pipeline) if pipeline else f'synthetic {height}x{width}'}, {file_size(path)})"
             + (f"; wrote {report_path}" if report_path else ""))


@calib_data.command("trajectory")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="trajectory_calib.npz", show_default=True, help="Output .npz.")
@click.option("--sampler", type=click.Choice(["euler", "ddim", "dpmpp", "consistency"]), help="The sampler you deploy (as in compare --sampler); required without --pipeline, where the default is the pipeline's own scheduler.")
@click.option("--seeds", default="0-7", show_default=True, help="Seeds of the recorded runs (keep them apart from compare's held-out seeds).")
@sampler_loop_options
@click.option("--data", type=click.Path(dir_okay=False), help="Conditioning .npz (as compare --sampler --data); default: synthesised from the seed.")
@click.option("--pipeline", type=click.Path(), help="A local diffusers pipeline folder: record MODEL's inputs while that pipeline generates with MODEL as its UNet (--size is then the image HxW in pixels).")
@click.option("--prompts", type=click.Path(), help="With --pipeline: text file, one prompt per line (each generated with every seed).")
@provider_options
@handle_errors
def calib_data_trajectory(model, output, sampler, steps, guidance, seeds, sample_size, prediction, sigma_max, sigma_min,
                          data, pipeline, prompts, provider, allow_cpu_fallback):
    """Record MODEL's inputs at every step of the sampler's trajectory (the FP32 ONNX model runs the loop): one
    sample per call, steps x seeds samples. What is recorded by default: euler/ddim/dpmpp: the whole
    schedule you deploy (--steps, default 50, SDXL's); consistency without --steps: every seed at 1, 2, 3 and 4
    steps (the first call, at sigma-max, shared: 7 calls a seed, 56 with the default 8 seeds), so a model
    quantized with it is calibrated at the noise levels of each 1-4 step sampler; --steps N records N steps only. For SDXL-style UNets the text conditioning is synthetic unless --data
    gives recorded embeddings; the latents, timesteps and guidance are the loop's own. With --pipeline, the
    real pipeline runs with MODEL as its UNet on --prompts: text conditioning, scheduler, steps, guidance and
    resolution are the pipeline's (or the options given)."""
    from .. import diffusion
    from .. import sampler as S
    from ..atomicfile import check_writable
    if not output.endswith(".npz"):
        raise OnnxoptError(f"-o {output}: calibration data is written as .npz; name the output *.npz")
    if pipeline or prompts:
        return _trajectory_pipeline(model, output, sampler, steps, guidance, seeds, sample_size, prediction, sigma_max,
                                    sigma_min, data, pipeline, prompts, provider, allow_cpu_fallback)
    if sampler is None:
        raise OnnxoptError("--sampler is required (euler, ddim, dpmpp or consistency), or give --pipeline DIR --prompts FILE")
    check_writable(output, "-o")
    opts = S.SamplerOptions(sampler, steps, guidance, S.parse_seeds(seeds), S.parse_size(sample_size), prediction,
                            sigma_min, sigma_max)
    arrays = S.record_trajectory(model, opts, data=data, provider=provider, allow_cpu_fallback=allow_cpu_fallback,
                                 progress=progress_enabled())
    path = diffusion.save_npz(arrays, output)
    summary_line(diffusion.describe(arrays))
    n = len(next(iter(arrays.values())))
    counts = S.step_counts(opts)
    summary_line(f"wrote {path} ({n} samples: {opts.sampler} {'/'.join(map(str, counts))} step(s), guidance {opts.cfg:g}, "
             f"{len(opts.seeds)} seed(s), recorded from {model} in onnxopt's loop with "
             f"{'conditioning from ' + data if data else 'synthetic conditioning'}, {file_size(path)})")


def _trajectory_pipeline(model, output, sampler, steps, guidance, seeds, sample_size, prediction, sigma_max, sigma_min,
                         data, pipeline, prompts, provider, allow_cpu_fallback):
    from .. import diffusers_pipeline as P
    from .. import diffusion
    from .. import sampler as S
    from ..atomicfile import check_writable
    if not pipeline:
        raise OnnxoptError("--prompts applies with --pipeline DIR (a diffusers pipeline folder)")
    unused = [o for o, v in (("--data", data), ("--prediction", prediction != "epsilon"), ("--sigma-max", sigma_max != 80.0),
                             ("--sigma-min", sigma_min != 0.002)) if v]
    if unused:
        raise OnnxoptError(f"{unused[0]} does not apply with --pipeline (the pipeline gives conditioning and schedule)")
    opts = P.PipelineOptions(sampler, steps, guidance, S.parse_size(sample_size), S.parse_seeds(seeds))
    folder = P.check_folder(pipeline)
    lines = P.read_prompts(prompts)
    check_writable(output, "-o")
    arrays = P.record_trajectory(model, folder, lines, opts, provider=provider, allow_cpu_fallback=allow_cpu_fallback,
                                 progress=progress_enabled())
    path = diffusion.save_npz(arrays, output)
    summary_line(diffusion.describe(arrays))
    n = len(next(iter(arrays.values())))
    summary_line(f"wrote {path} ({n} samples: UNet calls {P.describe_source(folder, lines, opts)}, {file_size(path)})")


@calib_data.command("text")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(), help="The model's local Hugging Face folder (tokenizer.json or vocab.txt).")
@click.option("--text", "text_path", required=True, type=click.Path(), help="UTF-8 text file, one sample (sentence or passage) per line.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="New (or empty) folder: one .npz per sample, for quantize --calib FOLDER.")
@click.option("--samples", type=click.IntRange(min=1), help="Use the first N lines only (default: every line).")
@click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per sample at most (longer lines are truncated).")
@handle_errors
def calib_data_text(model, tokenizer_dir, text_path, output, samples, max_length):
    """MODEL's token inputs (input_ids, attention_mask, token_type_ids, ...) for every line of --text, written
    unpadded: padded positions are rows no output reads, which every calibration statistic would count (AWQ's and
    the W4A4 helpers' fits, activation ranges). Order is kept: --auto holds out the last quarter to verify, so put
    lines like your deployment's data there too. For --auto with NVFP4 candidates use a few hundred lines
    (BENCHMARKS.md: MiniLM's W4A4 helpers fitted on 48 sentences lost 1.4-1.6x on unseen ones)."""
    import os

    import onnx

    from ..calib import input_specs
    from ..calib import text as T
    if not os.path.isfile(text_path):
        raise OnnxoptError(f"--text {text_path}: file not found; write one sample per line")
    lines = T.read_lines(text_path, samples)
    T.check_output(output)
    specs = input_specs(onnx.load(model, load_external_data=False))
    tok = T.load_tokenizer(tokenizer_dir)
    feeds = T.tokenize(tok, specs, lines, max_length)
    path = T.write_folder(feeds, output)
    lengths = [next(iter(f.values())).shape[-1] for f in feeds]
    how = "padded to the model's static length" if T.static_length(specs) else "unpadded"
    summary_line(f"wrote {path} ({len(feeds)} samples of {', '.join(s.name for s in specs)}; "
                 f"{min(lengths)}-{max(lengths)} tokens, {sum(lengths)} in all, {how})")
