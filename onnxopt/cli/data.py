"""calib-data: calibration data for model families (SDXL UNet)."""
from __future__ import annotations

import click

from ..errors import OnnxoptError
from .common import (_check_report, _size, _summary, _write_json, handle_errors, main)


@main.group("calib-data")
def calib_data():
    """Write calibration data (.npz for `quantize --calib`) for a model family."""


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
    """SDXL UNet inputs at noise levels across the schedule, CFG batch 2, 1024x1024 time ids."""
    import os

    from .. import diffusion
    if not output.endswith(".npz"):
        raise OnnxoptError(f"-o {output}: calibration data is written as .npz; name the output *.npz")
    if report_path and os.path.abspath(report_path) == os.path.abspath(output):
        raise OnnxoptError(f"--report {report_path} is the -o output too; give the report another file name")
    _check_report(report_path)
    from ..io import check_writable
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
    _summary(diffusion.describe(arrays))
    if report_path:
        _write_json(report_path, {"output": str(path), "samples": len(arrays["sample"]),
                                  "arrays": {k: {"shape": list(v.shape), "min": float(v.min()), "max": float(v.max()),
                                                 "std": float(v.std())} for k, v in arrays.items()}})
    _summary(f"wrote {path} ({len(arrays['sample'])} samples of {len(arrays)} UNet inputs, "
             f"{'recorded from ' + str(pipeline) if pipeline else f'synthetic {height}x{width}'}, {_size(path)})"
             + (f"; wrote {report_path}" if report_path else ""))
