"""inspect and compare: what a graph holds and how close it stays to its reference."""
from __future__ import annotations

import click

from .engines import engine_build_config
from .common import (
    option_alias, check_input, check_report, provider_options, sampler_loop_options, summary_line, write_json, handle_errors, main,
    progress_enabled)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--layers", is_flag=True, help="List every Conv/ConvTranspose/MatMul/Gemm with its Q/DQ state and format.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the summary as JSON to this file.")
@click.option("--json", "old_json", type=click.Path(dir_okay=False), hidden=True, help="Old name of --report.")
@click.option("--check-sparsity", "show_sparsity", is_flag=True, help="List each 2:4-eligible layer: is it 2:4, sparse share of params and FLOPs.")
@click.option("--sparsity", "old_sparsity", is_flag=True, hidden=True, help="Old name of --check-sparsity.")
@click.option("--engine", "engine", is_flag=True, help="Also build a TensorRT-RTX engine on the CPU (rtx extra) and print its engine report.")
@click.option("--engine-shapes", multiple=True, help="With --engine: input shapes, name:1x128 or name:MIN/OPT/MAX (repeatable; dynamic dims default to 1).")
@handle_errors
def inspect(model, layers, report_path, old_json, show_sparsity, old_sparsity, engine, engine_shapes):
    """Op histogram, Q/DQ coverage (W8A8 and weight-only formats), a TensorRT placement lint of MODEL and,
    with --engine, the report of a TensorRT-RTX engine built from it."""
    from ..inspection import format_report, inspect_path
    report_path = option_alias(report_path, old_json, "--report", "--json")
    show_sparsity = show_sparsity or old_sparsity
    check_report(report_path, model)
    ins = inspect_path(model)
    click.echo(format_report(ins, show_layers=layers))
    summary = ins.summary()
    if engine or engine_shapes:
        from ..trt.report import engine_report_of
        rep = engine_report_of(model, engine_build_config(engine_shapes, None, None, None, None, None))
        from ..trt.report import format_report as format_engine
        click.echo(format_engine(rep))
        summary["engine"] = rep
    if show_sparsity:
        from .. import modelfile
        from ..rewrite import sparsity
        rows = sparsity.report(modelfile.import_graph(modelfile.load(model)))
        click.echo(sparsity.format_report(rows))
        summary["sparsity"] = {**sparsity.summary(rows), "per_layer": rows}
    if report_path:
        write_json(report_path, summary)
    formats = ", ".join(f"{f} {n}" for f, n in summary["formats"].items())
    summary_line(f"inspected {model}: {summary['quantized_layers']}/{summary['layers']} layers quantized"
             f"{f' ({formats})' if formats else ''}, lint {'clean' if not summary['lint'] else str(len(summary['lint'])) + ' issue(s)'}"
             + (f"; wrote {report_path}" if report_path else ""))


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), help="Evaluation data (.npz / .npy / directory); default: generated.")
@click.option("--random", "n_random", type=click.IntRange(min=1), default=4, show_default=True, help="Generated samples when --data is absent.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the generated samples (calibrate on another one).")
@click.option("--shapes", multiple=True, help="name:1x4x128x128 for dynamic inputs of generated data (repeatable).")
@click.option("--max-batch", type=click.IntRange(min=1), help="Split feeds along a dynamic batch axis into at most N (less memory; results differ only by float rounding).")
@click.option("--skip-nonfinite", is_flag=True, help="Leave out --data samples holding inf or NaN (counted in the summary) instead of failing.")
@provider_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the metrics as JSON to this file.")
@click.option("--json", "old_json", type=click.Path(dir_okay=False), hidden=True, help="Old name of --report.")
@click.option("--sampler", type=click.Choice(["euler", "ddim", "dpmpp", "consistency"]), help="Compare final samples of a denoising loop instead of one call: euler/ddim/dpmpp (diffusers, SDXL config; epsilon/v UNets with a timestep input) or consistency (EDM D(x, sigma) models).")
@click.option("--seeds", default="0-3", show_default=True, help="With --sampler: seeds of the initial noise, e.g. 0-7 or 0,3,5.")
@sampler_loop_options
@click.option("--data-range", type=float, help="With --sampler: PSNR/SSIM data range (default: each reference sample's peak-to-peak).")
@click.option("--save-grid", type=click.Path(dir_okay=False), help="With --sampler: write reference | candidate | |diff| of each seed as a PNG (with --pipeline: reference | candidate decoded images, exact 8-bit pixels).")
@click.option("--pipeline", type=click.Path(), help="A local diffusers pipeline folder (save_pretrained: model_index.json, unet/, vae/, text encoders, tokenizers, scheduler/): run it with each ONNX UNet swapped in and compare decoded images; --sampler then picks another scheduler (default: the pipeline's own), --size is the image HxW in pixels.")
@click.option("--prompts", type=click.Path(), help="With --pipeline: text file, one prompt per line (each prompt is generated with every seed).")
@handle_errors
def compare(reference, candidate, data, n_random, seed, shapes, max_batch, skip_nonfinite, provider, allow_cpu_fallback,
            report_path, old_json, sampler, steps, guidance, seeds, sample_size, prediction, sigma_max, sigma_min, data_range, save_grid,
            pipeline, prompts):
    """Per-output cosine, SNR and max abs error of CANDIDATE vs REFERENCE (ORT, ORT_DISABLE_ALL); with --sampler,
    the final samples of a denoising loop run with each model (same seeds, noise and conditioning): PSNR, SSIM,
    cosine and the drift step by step. With --sampler, --data is an .npz of conditioning inputs (leading axis:
    prompts; two rows [unconditional, conditional] each with guidance); without it, conditioning is synthesised
    from the seed. With --pipeline, the user's diffusers pipeline generates every prompt x seed with each UNet
    (ONNX Runtime) and the decoded 8-bit images are compared (PSNR, SSIM over 0..255; LPIPS when its weights are
    on this machine), latents too."""
    if pipeline or prompts:
        report_path = option_alias(report_path, old_json, "--report", "--json")
        return _compare_pipeline(reference, candidate, data, shapes, max_batch, skip_nonfinite, provider, allow_cpu_fallback,
                                 report_path, sampler, steps, guidance, seeds, sample_size, prediction, sigma_max, sigma_min,
                                 data_range, save_grid, pipeline, prompts)
    if sampler or any(v is not None for v in (steps, guidance, sample_size, data_range, save_grid)):
        report_path = option_alias(report_path, old_json, "--report", "--json")
        return _compare_sampled(reference, candidate, data, shapes, max_batch, provider, allow_cpu_fallback, report_path,
                                sampler, steps, guidance, seeds, sample_size, prediction, sigma_max, sigma_min,
                                data_range, save_grid)
    from ..calib import parse_shapes
    from ..compare import compare as run
    report_path = option_alias(report_path, old_json, "--report", "--json")
    check_report(report_path, reference, candidate)
    skipped = 0
    if skip_nonfinite and data is not None:
        from .. import modelfile
        from ..calib import CalibData, input_specs
        check_input(reference)
        data = CalibData.from_path(data, input_specs(modelfile.load(reference)), max_batch=max_batch, skip_nonfinite=True)
        skipped = data.skipped
    res = run(reference, candidate, data, n_random=n_random, seed=seed, shapes=parse_shapes(shapes), max_batch=max_batch,
              provider=provider, allow_cpu_fallback=allow_cpu_fallback, progress=progress_enabled())
    click.echo(f"{'output':<32}{'cosine':>12}{'SNR dB':>10}{'max abs':>12}{'cos/sample':>12}{'worst':>10}")
    for name, m in res.items():
        click.echo(f"{name:<32}{m['cosine']:>12.6f}{m['snr_db']:>10.2f}{m['max_abs']:>12.4g}"
                   f"{m['cosine_mean']:>12.6f}{m['cosine_worst']:>10.6f}")
    if report_path:
        write_json(report_path, res)
    worst = min(res, key=lambda o: (res[o]["cosine"] == res[o]["cosine"], res[o]["cosine"]))  # NaN first
    summary_line(f"compared {len(res)} output(s) over {res.samples} batch(es) on {res.provider}: worst cosine "
             f"{res[worst]['cosine']:.6f} ({worst}), SNR {res[worst]['snr_db']:.2f} dB"
             + (f"; left out {skipped} sample(s) holding inf or NaN" if skipped else "")
             + (f"; wrote {report_path}" if report_path else ""))


def _compare_sampled(reference, candidate, data, shapes, max_batch, provider, allow_cpu_fallback, report_path,
                     sampler, steps, guidance, seeds, sample_size, prediction, sigma_max, sigma_min, data_range, save_grid):
    from .. import sampler as S
    from ..errors import OnnxoptError
    if not sampler:
        raise OnnxoptError("--steps, --guidance, --size, --data-range and --save-grid apply with --sampler; add --sampler euler|ddim|dpmpp|consistency")
    if shapes or max_batch:
        raise OnnxoptError(f"{'--shapes' if shapes else '--max-batch'} does not apply with --sampler; use --size HxW")
    opts = S.SamplerOptions(sampler, steps, guidance, S.parse_seeds(seeds), S.parse_size(sample_size), prediction,
                            sigma_min, sigma_max, data_range=data_range)
    check_report(report_path, reference, candidate)
    _check_grid(save_grid)
    res = S.compare_sampled(reference, candidate, opts, data=data, provider=provider,
                            allow_cpu_fallback=allow_cpu_fallback, progress=progress_enabled())
    click.echo(S.format_table(res))
    from ..imagegrid import save_grid as write_grid
    wrote = _write_outputs(res, report_path, save_grid, write_grid)
    f = res.final
    summary_line(f"compared final samples of {len(opts.seeds)} seed(s), {opts.sampler} {opts.n_steps} step(s) on {res.provider}: "
             f"PSNR {f.psnr_mean:.2f} dB, SSIM {f.ssim_mean:.4f}, cosine {f.cosine_mean:.6f}" + (f"; wrote {wrote}" if wrote else ""))


def _write_outputs(res, report_path, save_grid, grid_writer) -> str:
    """The --report JSON and the --save-grid PNG of a sampled comparison; the paths written, for the summary."""
    if report_path:
        write_json(report_path, res.as_dict())
    if save_grid:
        grid_writer(save_grid, res.reference, res.candidate)
    return ", ".join(p for p in (report_path, save_grid) if p)


def _check_grid(save_grid) -> None:
    """--save-grid names a writable *.png (checked before any work)."""
    if not save_grid:
        return
    from ..errors import OnnxoptError
    from ..atomicfile import check_writable
    if not save_grid.endswith(".png"):
        raise OnnxoptError(f"--save-grid {save_grid}: the grid is a PNG; name it *.png")
    check_writable(save_grid, "--save-grid")


def _compare_pipeline(reference, candidate, data, shapes, max_batch, skip_nonfinite, provider, allow_cpu_fallback, report_path,
                      sampler, steps, guidance, seeds, sample_size, prediction, sigma_max, sigma_min, data_range, save_grid,
                      pipeline, prompts):
    from .. import diffusers_pipeline as P
    from .. import sampler as S
    from ..errors import OnnxoptError
    if not pipeline:
        raise OnnxoptError("--prompts applies with --pipeline DIR (a diffusers pipeline folder)")
    unused = [o for o, v in (("--data", data), ("--shapes", shapes), ("--max-batch", max_batch), ("--skip-nonfinite", skip_nonfinite),
                             ("--prediction", prediction != "epsilon"), ("--sigma-max", sigma_max != 80.0),
                             ("--sigma-min", sigma_min != 0.002), ("--data-range", data_range is not None)) if v]
    if unused:
        raise OnnxoptError(f"{unused[0]} does not apply with --pipeline (the pipeline gives conditioning, images are 8-bit)")
    opts = P.PipelineOptions(sampler, steps, guidance, S.parse_size(sample_size), S.parse_seeds(seeds))
    folder = P.check_folder(pipeline)
    lines = P.read_prompts(prompts)
    check_report(report_path, reference, candidate)
    _check_grid(save_grid)
    res = P.compare_pipeline(reference, candidate, folder, lines, opts, provider=provider,
                             allow_cpu_fallback=allow_cpu_fallback, progress=progress_enabled())
    click.echo(P.format_table(res))
    from ..imagegrid import save_image_grid
    wrote = _write_outputs(res, report_path, save_grid, save_image_grid)
    im = res.images
    summary_line(f"compared {len(res.reference)} decoded image(s) of {folder.pipeline_class} ({res.scheduler} {res.steps} step(s)) "
             f"on {res.provider}: PSNR {im.psnr_mean:.2f} dB, SSIM {im.ssim_mean:.4f}, "
             + (f"LPIPS {res.lpips[0]:.4f}" if res.lpips else "LPIPS not available offline")
             + f"; final latents PSNR {res.latents.psnr_mean:.2f} dB" + (f"; wrote {wrote}" if wrote else ""))
