"""Command line: parses options and calls the Python API. User errors print one line and exit 2."""
from __future__ import annotations

import functools
import logging
import sys

import click

from .errors import OnnxoptError

log = logging.getLogger("onnxopt")


def handle_errors(fn):
    """Turn OnnxoptError (and a few library errors that mean bad input) into one line and exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxoptError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory; lower --memory-budget or use fewer calibration samples", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.version_option(package_name="onnxopt")
@click.pass_context
def main(ctx, verbose, quiet):
    """onnxopt: quantize, sparsify and convert ONNX graphs for TensorRT."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"progress": True}
    _set_verbosity(ctx, verbose, quiet)


def _set_verbosity(ctx, verbose: int, quiet: bool) -> None:
    if not (verbose or quiet):
        return
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.getLogger().setLevel(level)
    root = ctx.find_root()
    if quiet and root.obj is not None:
        root.obj["progress"] = False


def _verbosity_after_command(cmd: click.Command) -> None:
    """-v / -q are accepted after the subcommand too (`onnxopt quantize m.onnx -q`)."""
    cmd.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False, is_eager=True,
                                   help="More logging (-vv for debug).",
                                   callback=lambda ctx, _, v: _set_verbosity(ctx, v, False)))
    cmd.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, is_eager=True,
                                   help="Only errors; no progress bars.",
                                   callback=lambda ctx, _, v: _set_verbosity(ctx, 0, v)))


def progress_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("progress", True))


# Commands live below, one function each, grouped by capability.
# ---- quantize / convert / inspect / compare (core)
def _default_output(model: str, suffix: str) -> str:
    base = model[:-5] if model.endswith(".onnx") else model
    return f"{base}.{suffix}.onnx"


def _write_json(path, obj) -> None:
    import json

    from .io import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model (default: MODEL.<mode>.onnx).")
@click.option("--int8", "mode", flag_value="int8", help="INT8 W8A8.")
@click.option("--fp8", "mode", flag_value="fp8", help="FP8 E4M3 W8A8 (default).")
@click.option("--int4", "mode", flag_value="int4", help="INT4 blockwise weight-only.")
@click.option("--preset", type=click.Choice(["sdxl"]), help="Recipe for a model family (exclusions, calibration, MHA).")
@click.option("--calib", "calib_path", type=click.Path(), help=".npz (arrays keyed by input name, first axis = samples), .npy, or a directory of .npz.")
@click.option("--calib-random", type=int, help="Calibrate on N generated samples instead.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --calib-random.")
@click.option("--shapes", multiple=True, help="name:1x4x128x128 for dynamic inputs of generated data (repeatable).")
@click.option("--calib-method", type=click.Choice(["max", "percentile", "entropy", "mse"]), help="Clip-range method (default: max for FP8, mse for INT8).")
@click.option("--percentile", type=float, default=99.99, show_default=True)
@click.option("--calib-batches", type=int, help="Use at most N calibration batches.")
@click.option("--calib-max-batch", type=int, help="Split calibration feeds along a dynamic batch axis into at most N (bounds activation memory).")
@click.option("--calib-provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--memory-budget", type=int, default=4096, show_default=True, help="Calibration memory: MB of weights ONNX Runtime holds at once (bigger models run in stages) and of whole activations fetched per pass.")
@click.option("--exclude", multiple=True, help="Regex on node names to leave unquantized (repeatable).")
@click.option("--op-types", default="Conv,ConvTranspose,MatMul,Gemm", show_default=True, help="Comma-separated op types to quantize.")
@click.option("--no-mha", is_flag=True, help="Leave attention BMMs (Q·Kᵀ, softmax·V) unquantized.")
@click.option("--high-precision", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True, help="Precision of everything not quantized.")
@click.option("--io-dtype", type=click.Choice(["fp16", "bf16"]), help="Also convert graph inputs/outputs (default: keep them).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the run's JSON report here.")
@click.option("--smoothquant", is_flag=False, flag_value="auto", default=None, metavar="[ALPHA|auto]", callback=lambda c, p, v: _sq_alpha(v),
              help="INT8: SmoothQuant with migration strength ALPHA in [0, 1], or 'auto' (per-layer search; the flag alone).")
@click.option("--awq", type=click.Choice(["none", "lite", "clip", "full"]), help="INT4: AWQ scale search (lite), clip search (clip), both then error-feedback rounding (full, default), or round-to-nearest (none).")
@click.option("--block-size", type=int, help="INT4: block size along K: 128 (default), 64, 32, or 0 for per-channel.")
@click.option("--int8-layers", metavar="REGEX", help="INT4: layers whose names match keep per-channel INT8 weights.")
@click.option("--sparsity", metavar="N:M", help="Prune weights to N:M (2:4) before quantization, so scales see the pruned weights.")
@click.option("--sparsity-method", type=click.Choice(["magnitude", "sparsegpt"]), help="With --sparsity: magnitude (default) or sparsegpt (uses --calib).")
@click.pass_context
@handle_errors
def quantize(ctx, model, output, mode, preset, calib_path, calib_random, seed, shapes, calib_method, percentile,
             calib_batches, calib_max_batch, calib_provider, memory_budget, exclude, op_types, no_mha, high_precision, io_dtype,
             report_path, **extra):
    """Quantize MODEL for TensorRT: calibrate, insert Q/DQ, FP16 elsewhere."""
    import dataclasses

    from . import calib as calib_mod
    from .quant import QuantConfig
    from .quant import quantize as run
    mode = mode or "fp8"
    fields = dict(mode=mode, calib_method=calib_method, percentile=percentile, exclude=tuple(exclude),
                  op_types=tuple(o.strip() for o in op_types.split(",") if o.strip()), high_precision=high_precision,
                  io_dtype=io_dtype, quantize_mha=not no_mha, provider=calib_provider, memory_budget_mb=memory_budget,
                  calib_batches=calib_batches, calib_max_batch=calib_max_batch, progress=progress_enabled())
    fields.update(_extra_quant_fields(extra))
    if preset:
        from . import presets
        base = presets.config(preset, mode)
        explicit = {k: v for k, v in fields.items() if _given(ctx, k)}
        config = dataclasses.replace(base, **{k: v for k, v in explicit.items()}, progress=progress_enabled())
        if exclude:
            config = dataclasses.replace(config, exclude=tuple(base.exclude) + tuple(exclude))
    else:
        config = QuantConfig(**fields)
    output = output or _default_output(model, mode)
    result = run(model, output, config=config, data=calib_path, calib_random=calib_random, seed=seed,
                 shapes=calib_mod.parse_shapes(shapes))
    if report_path:
        _write_json(report_path, result.report)
    cov = result.report.get("coverage")
    click.echo(f"wrote {result.path}" + (f" ({cov['quantized']} layers quantized, {cov['skipped']} skipped)" if cov else ""))


_PARAM_FOR_FIELD = {"calib_method": "calib_method", "percentile": "percentile", "exclude": "exclude", "op_types": "op_types",
                    "high_precision": "high_precision", "io_dtype": "io_dtype", "quantize_mha": "no_mha",
                    "provider": "calib_provider", "memory_budget_mb": "memory_budget", "calib_batches": "calib_batches",
                    "calib_max_batch": "calib_max_batch"}


def _given(ctx, field_name: str) -> bool:
    """Whether the user set the option behind a QuantConfig field (so it overrides the preset)."""
    param = _PARAM_FOR_FIELD.get(field_name, field_name)
    src = ctx.get_parameter_source(param)
    return src is not None and src.name == "COMMANDLINE"


def _sq_alpha(value):
    """--smoothquant value: None, 'auto' or a float in [0, 1]."""
    if value is None or str(value).strip().lower() == "auto":
        return None if value is None else "auto"
    try:
        alpha = float(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is neither a number in [0, 1] nor 'auto'") from None
    if not 0.0 <= alpha <= 1.0:
        raise click.BadParameter(f"alpha {alpha} is outside [0, 1]")
    return alpha


def _extra_quant_fields(extra: dict) -> dict:
    """Options that other capabilities add to `quantize` (sparsity, SmoothQuant, AWQ) map 1:1 to QuantConfig fields."""
    return {k: v for k, v in extra.items() if v is not None}


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model (default: MODEL.fp16.onnx).")
@click.option("--fp16", "dtype", flag_value="fp16", default=True, help="FP16 (default).")
@click.option("--bf16", "dtype", flag_value="bf16", help="BF16.")
@click.option("--io-dtype", type=click.Choice(["fp16", "bf16"]), help="Also convert graph inputs/outputs.")
@click.option("--keep-fp32", "keep_fp32_ops", multiple=True, help="Op type to keep in FP32 (repeatable).")
@click.option("--calib", "calib_path", type=click.Path(), help="Calibration data (.npz/.npy/directory): measured ranges decide what stays FP32, and the result is checked for finite outputs.")
@click.option("--calib-random", type=int, help="Measure ranges on N generated samples instead (default: 2 when the input shapes are static).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --calib-random.")
@click.option("--shapes", multiple=True, help="name:1x4x128x128 for dynamic inputs of generated data (repeatable).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="ONNX Runtime provider for the range measurement and the finite check.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the run's JSON report here (FP32 nodes with their ranges and reasons).")
@handle_errors
def convert(model, output, dtype, io_dtype, keep_fp32_ops, calib_path, calib_random, seed, shapes, provider, report_path):
    """Convert MODEL to FP16 (the TensorRT baseline) or BF16."""
    from . import calib as calib_mod
    from .autocast import convert as run
    report: dict = {}
    path = run(model, output or _default_output(model, dtype), dtype, io_dtype=io_dtype, keep_fp32_ops=tuple(keep_fp32_ops),
               data=calib_path, calib_random=calib_random, shapes=calib_mod.parse_shapes(shapes), seed=seed,
               provider=provider, report=report)
    if report_path:
        _write_json(report_path, report)
    ac = report.get("autocast", {})
    kept = len(ac.get("kept_fp32", {}))
    checked = (f"{kept} nodes kept in fp32 by measured range" if ac.get("ranges_checked")
               else "ranges not checked (no --calib; dynamic inputs need --calib-random N --shapes)")
    click.echo(f"converted to {dtype}, {checked} ({100 * ac.get('fp32_share', 0):.1f}% of nodes fp32); wrote {path}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--layers", is_flag=True, help="List every Conv/ConvTranspose/MatMul/Gemm with its Q/DQ state.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the summary as JSON.")
@click.option("--sparsity", "show_sparsity", is_flag=True, help="List each 2:4-eligible layer: is it 2:4, sparse share of params and FLOPs.")
@handle_errors
def inspect(model, layers, json_path, show_sparsity):
    """Op histogram, Q/DQ coverage and a TensorRT placement lint of MODEL."""
    from .inspect import format_report, inspect_path
    ins = inspect_path(model)
    click.echo(format_report(ins, show_layers=layers))
    summary = ins.summary()
    if show_sparsity:
        from . import io, sparsity
        rows = sparsity.report(io.import_graph(io.load(model)))
        click.echo(sparsity.format_report(rows))
        summary["sparsity"] = {**sparsity.summary(rows), "per_layer": rows}
    if json_path:
        _write_json(json_path, summary)


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), help="Evaluation data (.npz / .npy / directory); default: generated.")
@click.option("--random", "n_random", type=int, default=4, show_default=True, help="Generated samples when --data is absent.")
@click.option("--shapes", multiple=True, help="name:1x4x128x128 for dynamic inputs of generated data.")
@click.option("--max-batch", type=click.IntRange(min=1), help="Split feeds along a dynamic batch axis into at most N (less memory; results differ only by float rounding).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics as JSON.")
@handle_errors
def compare(reference, candidate, data, n_random, shapes, max_batch, json_path):
    """Per-output cosine, SNR and max abs error of CANDIDATE vs REFERENCE (ORT, ORT_DISABLE_ALL)."""
    from .calib import parse_shapes
    from .compare import compare as run
    res = run(reference, candidate, data, n_random=n_random, shapes=parse_shapes(shapes), max_batch=max_batch)
    click.echo(f"{'output':<32}{'cosine':>12}{'SNR dB':>10}{'max abs':>12}")
    for name, m in res.items():
        click.echo(f"{name:<32}{m['cosine']:>12.6f}{m['snr_db']:>10.2f}{m['max_abs']:>12.4g}")
    if json_path:
        _write_json(json_path, res)


# ---- sparsify
@main.command("sparsify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output model path.")
@click.option("--pattern", default="2:4", show_default=True, help="N:M: at most N non-zeros in every M input channels.")
@click.option("--method", type=click.Choice(["magnitude", "sparsegpt"]), default="magnitude", show_default=True,
              help="magnitude: keep the largest |w|; sparsegpt: minimise layer-output error (needs --calib).")
@click.option("--calib", "calib_path", type=click.Path(), help="Calibration data: .npz, .npy or a directory of .npz.")
@click.option("--calib-limit", type=int, default=None, help="Use at most this many calibration samples.")
@click.option("--calib-random", type=int, default=None, help="Use N random samples instead of --calib (testing only).")
@click.option("--shapes", multiple=True, help="Input shapes for random data, name:1x3x224x224 (repeatable).")
@click.option("--exclude", multiple=True, help="Regex on node names to leave dense (repeatable).")
@click.option("--min-params", type=int, default=4096, show_default=True, help="Skip weights with fewer values.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="SparseGPT damping, a fraction of mean diag(H).")
@click.option("--block", type=int, default=128, show_default=True, help="SparseGPT lazy-update block (columns).")
@click.option("--one-shot", is_flag=True, help="SparseGPT: calibrate all layers on the dense graph (faster, less accurate).")
@click.option("--calib-provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--memory-budget", type=int, default=4096, show_default=True, help="MB for Hessians and activations.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@handle_errors
def sparsify_cmd(model, output, pattern, method, calib_path, calib_limit, calib_random, shapes, exclude, min_params,
                 damp, block, one_shot, calib_provider, memory_budget, report_path):
    """Prune Conv/ConvTranspose/MatMul/Gemm weights to 2:4 along input channels (TensorRT sparse tensor cores)."""
    import json

    from . import calib, sparsity
    if method == "sparsegpt" and not (calib_path or calib_random):
        raise OnnxoptError("--method sparsegpt needs calibration data; pass --calib (or --calib-random N for a smoke test)")
    rep = sparsity.sparsify_model(model, output, data=calib_path, calib_limit=calib_limit, calib_random=calib_random,
                                  shapes=calib.parse_shapes(shapes), pattern=pattern, method=method, exclude=exclude,
                                  min_params=min_params, damp=damp, block=block, sequential=not one_shot,
                                  provider=calib_provider, memory_budget_mb=memory_budget, progress=progress_enabled())
    if report_path:
        with open(report_path, "w") as f:
            json.dump(rep, f, indent=1)
    for r in rep["layers"]:
        if r["status"] == "skipped":
            click.echo(f"skipped {r['name']}: {r['reason']}", err=True)
    click.echo(f"{output}: {rep['pruned']} layers pruned to {rep['pattern']} ({rep['method']}), {rep['skipped']} skipped, "
               f"{rep['already']} already sparse; {100 * rep['sparse_param_share']:.1f}% of weight parameters sparse")


# ---- build / bench (trt)
_SHAPES_HELP = "Input shapes, name:MIN/OPT/MAX (e.g. sample:1x4x64x64/2x4x128x128/2x4x128x128) or name:1x4x128x128 (repeatable)."


def _build_config(shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed):
    from .trt.build import BuildConfig, parse_profiles
    return BuildConfig(profiles=parse_profiles(shapes) or None, timing_cache=timing_cache, opt_level=opt_level,
                       workspace_mb=workspace, sparse_weights=sparse_weights, strongly_typed=strongly_typed)


def _build_options(fn):
    for opt in reversed([
        click.option("--timing-cache", type=click.Path(dir_okay=False), help="Tactic timing cache: read if present, updated after the build."),
        click.option("--opt-level", type=click.IntRange(0, 5), help="Builder optimization level (TensorRT's default: 3)."),
        click.option("--workspace", type=click.IntRange(min=1), help="Workspace memory pool limit in MiB."),
        click.option("--sparse-weights/--no-sparse-weights", default=None, help="Sparse tensor-core tactics (default: on when the graph holds 2:4 weights)."),
        click.option("--strongly-typed/--weakly-typed", default=None, help="Default: strongly typed on TensorRT 11 (its only mode); weakly typed with the graph's precision flags on TensorRT 10."),
    ]):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Engine (plan) to write.")
@click.option("--shapes", multiple=True, help=_SHAPES_HELP)
@_build_options
@handle_errors
def build(model, output, shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed):
    """Build a TensorRT engine from MODEL with Polygraphy (needs the trt extra)."""
    from .trt.build import build as run
    res = run(model, output, config=_build_config(shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed))
    flags = "+".join(res.precision_flags) or "no precision flags"
    click.echo(f"wrote {res.path} in {res.seconds:.1f} s (TensorRT {res.tensorrt}, "
               f"{'strongly typed' if res.strongly_typed else 'weakly typed, ' + flags}"
               f"{', sparse weights' if res.sparse_weights else ''})")


@main.command()
@click.argument("baseline", type=click.Path(dir_okay=False))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["auto", "trt", "onnxrt"]), default="auto", show_default=True,
              help="trt: TensorRT engines; onnxrt: ONNX Runtime; auto: trt when tensorrt imports.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs per model.")
@click.option("--iters", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs per model.")
@click.option("--data", type=click.Path(), help="Inputs (.npz keyed by input name, first axis = samples); default: random.")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True, help="Input samples compared for fidelity.")
@click.option("--shapes", multiple=True, help=_SHAPES_HELP + " Random inputs use OPT.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--label", "labels", multiple=True, help="Row label per model, baseline first (default: file names).")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Keep engines and the FP16 baseline here (default: a temporary folder).")
@click.option("--no-fp16-baseline", is_flag=True, help="trt: build an FP32 baseline as it is, not its FP16 conversion.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="onnxrt: intra-op threads (0: ORT's default).")
@click.option("--ort-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all", show_default=True,
              help="onnxrt: optimization level of the timed session (fidelity always uses 'disable').")
@_build_options
@handle_errors
def bench(baseline, candidates, backend, warmup, iters, data, samples, shapes, seed, report_path, labels, work_dir,
          no_fp16_baseline, threads, ort_level, timing_cache, opt_level, workspace, sparse_weights, strongly_typed):
    """Time BASELINE and each CANDIDATE; print speedup, size and output fidelity against the baseline."""
    from .bench import BenchConfig, format_table
    from .bench import bench as run
    build_config = _build_config(shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed)
    config = BenchConfig(backend=backend, warmup=warmup, iters=iters, samples=samples, profiles=build_config.profiles,
                         seed=seed, threads=threads, ort_level=ort_level, fp16_baseline=not no_fp16_baseline,
                         work_dir=work_dir, build=build_config)
    result = run(baseline, candidates, config=config, data=data, labels=labels or None, report=report_path)
    click.echo(format_table(result))
    if report_path:
        click.echo(f"wrote {report_path}", err=True)

# ---- calib-data (diffusion)
@main.group("calib-data")
def calib_data():
    """Write calibration data (.npz for `quantize --calib`) for a model family."""


@calib_data.command("sdxl")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .npz.")
@click.option("--samples", type=int, default=8, show_default=True, help="UNet calls (synthetic), or steps kept per prompt (--pipeline).")
@click.option("--steps", type=int, default=30, show_default=True, help="Denoising steps of the schedule the samples are spread over.")
@click.option("--height", type=int, default=1024, show_default=True, help="Image height in pixels (latents are 8x smaller).")
@click.option("--width", type=int, default=1024, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (use another one for held-out evaluation data).")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False), help="Local diffusers SDXL pipeline folder: record its real UNet inputs instead.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="With --pipeline: text file, one prompt per line.")
@click.option("--device", default="cpu", show_default=True, help="With --pipeline: torch device.")
@handle_errors
def calib_data_sdxl(output, samples, steps, height, width, seed, pipeline, prompts, device):
    """SDXL UNet inputs at noise levels across the schedule, CFG batch 2, 1024x1024 time ids."""
    from . import diffusion
    if pipeline:
        if not prompts:
            raise OnnxoptError("--pipeline needs --prompts FILE (one prompt per line)")
        lines = [ln.strip() for ln in open(prompts, encoding="utf-8") if ln.strip()]
        pipe = diffusion.load_pipeline(pipeline, device)
        arrays = diffusion.record_unet_inputs(pipe, lines, steps=steps, per_prompt=samples, seed=seed,
                                              height=height, width=width)
    else:
        arrays = diffusion.synthesize_sdxl(samples, steps=steps, seed=seed,
                                           shapes=diffusion.SDXLShapes(height=height, width=width))
    path = diffusion.save_npz(arrays, output)
    click.echo(diffusion.describe(arrays))
    click.echo(f"wrote {path} ({len(arrays['sample'])} samples)")


for _cmd in list(main.commands.values()):
    _verbosity_after_command(_cmd)


if __name__ == "__main__":
    main()
