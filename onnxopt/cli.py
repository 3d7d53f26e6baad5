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


class _OneLineErrors(click.Group):
    """Bad option values (click's usage errors) print one `error:` line too, exit 2, like every user error."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            names, c = [], e.ctx
            while c is not None and c.parent is not None:
                names.insert(0, c.info_name)
                c = c.parent
            where = f" (see onnxopt {' '.join(names)} --help)" if names else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(2)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
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


def _merge_alias(new, old, default=None):
    """Value of an option that also has a hidden old spelling (kept for one release)."""
    return new if new is not None else old if old is not None else default


def _check_input(model: str) -> None:
    from pathlib import Path
    if not Path(model).is_file():
        raise OnnxoptError(f"{model}: no such model file; check the path")


def _summary(text: str, path=None, ctx_report: dict | None = None) -> None:
    """The one line every command ends with (stdout, unless -q); `path`: the file it wrote."""
    if not progress_enabled():
        return
    if path is None:
        click.echo(text)
        return
    from pathlib import Path
    size = (ctx_report or {}).get("output_bytes")
    if size is None and Path(path).exists():
        size = Path(path).stat().st_size
    shown = "" if size is None else f" ({size / 1e6:.1f} MB)" if size >= 1e5 else f" ({size / 1e3:.1f} kB)"
    click.echo(f"{text}; wrote {path}{shown}")


def _shared_run_options(fn, exclude: bool = True):
    """Calibration-data and ONNX Runtime options shared by quantize, sparsify and convert (one vocabulary)."""
    for opt in reversed([
        click.option("--calib", "calib_path", type=click.Path(), help=".npz (arrays keyed by input name, first axis = samples), .npy, or a directory of .npz."),
        click.option("--calib-random", type=int, help="Calibrate on N generated samples instead of --calib (smoke tests)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for --calib-random."),
        click.option("--shapes", multiple=True, help="name:1x4x128x128 for dynamic inputs of generated data (repeatable)."),
        click.option("--calib-batches", type=int, help="Use at most N calibration batches."),
        click.option("--max-batch", type=int, help="Split calibration feeds along a dynamic batch axis into at most N (bounds activation memory)."),
        click.option("--provider", type=click.Choice(["cpu", "cuda"]), help="ONNX Runtime execution provider for calibration (default: cpu)."),
        click.option("--allow-cpu-fallback", is_flag=True, help="Run on the CPU when --provider cuda is not available instead of failing."),
        click.option("--memory-budget", type=int, default=4096, show_default=True, help="Calibration memory in MB: weights ONNX Runtime holds at once (bigger models run in stages), whole activations fetched per pass, Hessians."),
        click.option("--exclude", multiple=True, help="Regex on node names to leave alone (repeatable).") if exclude else None,
        click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the run's JSON report here."),
    ]):
        fn = opt(fn) if opt else fn
    return fn


def _runner(recipe, *, calib_path, calib_random, seed, shapes, calib_batches, max_batch, provider, allow_cpu_fallback,
            memory_budget):
    """The Runner of a command, every setting checked here, before any model is read."""
    from .calib import parse_shapes
    from .pipeline import Runner
    return Runner(recipe, data=calib_path, calib_random=calib_random, seed=seed, shapes=parse_shapes(shapes),
                  calib_batches=calib_batches, max_batch=max_batch, provider=provider or "cpu",
                  allow_cpu_fallback=allow_cpu_fallback, memory_budget_mb=memory_budget, progress=progress_enabled())


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model (default: MODEL.<mode>.onnx).")
@click.option("--int8", "mode", flag_value="int8", help="INT8 W8A8.")
@click.option("--fp8", "mode", flag_value="fp8", help="FP8 E4M3 W8A8 (default).")
@click.option("--int4", "mode", flag_value="int4", help="INT4 blockwise weight-only.")
@click.option("--preset", type=click.Choice(["sdxl"]), help="Recipe for a model family (exclusions, calibration, MHA).")
@_shared_run_options
@click.option("--calib-method", type=click.Choice(["max", "percentile", "entropy", "mse"]), help="INT8/FP8 clip-range method (default: max for FP8, mse for INT8).")
@click.option("--percentile", type=float, help="With --calib-method percentile: the percentile of |x| kept, in (0, 100] (default 99.99).")
@click.option("--op-types", default="Conv,ConvTranspose,MatMul,Gemm", show_default=True, help="Comma-separated op types to quantize.")
@click.option("--no-mha", is_flag=True, help="INT8/FP8: leave attention BMMs (Q·Kᵀ, softmax·V) unquantized.")
@click.option("--high-precision", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True, help="Precision of everything not quantized.")
@click.option("--io-dtype", type=click.Choice(["fp16", "bf16"]), help="Also convert graph inputs/outputs (default: keep them).")
@click.option("--smoothquant", is_flag=False, flag_value="auto", default=None, metavar="[ALPHA|auto]", callback=lambda c, p, v: _sq_alpha(v),
              help="INT8: SmoothQuant with migration strength ALPHA in [0, 1], or 'auto' (per-layer search; the flag alone).")
@click.option("--awq", type=click.Choice(["none", "lite", "clip", "full"]), help="INT4: AWQ scale search (lite), clip search (clip), both then error-feedback rounding (full, default), or round-to-nearest (none).")
@click.option("--block-size", type=int, help="INT4: block size along K: 128 (default), 64, 32, or 0 for per-channel.")
@click.option("--int8-layers", metavar="REGEX", help="INT4: layers whose names match keep per-channel INT8 weights.")
@click.option("--sparsity", metavar="N:M", help="Prune weights to N:M (2:4) before quantization, so scales see the pruned weights.")
@click.option("--sparsity-method", type=click.Choice(["magnitude", "sparsegpt"]), help="With --sparsity: magnitude (default) or sparsegpt (uses the calibration data).")
@click.option("--auto", is_flag=True, help="Choose a format per layer (FP16, FP8, INT8, INT4 weight-only) to meet a target: give one of --target-cosine, --target-top1, --bits.")
@click.option("--formats", help="With --auto: comma-separated candidate formats besides FP16, from fp8,int8,int4 (default fp8,int8).")
@click.option("--target-cosine", type=float, help="With --auto: mean cosine of the output vs FP32 to keep on held-out calibration batches, e.g. 0.999.")
@click.option("--target-top1", type=float, help="With --auto (classifiers): argmax agreement with FP32 to keep on the calibration samples, e.g. 0.97.")
@click.option("--bits", type=float, help="With --auto: weight bits averaged over the parameters of the weighted layers, e.g. 6 (activation bits over MACs are reported).")
@click.option("--sensitivity", type=click.Path(dir_okay=False), help="With --auto: JSON of per-layer sensitivities; reused if it matches the model and options, written as they are measured (restartable).")
@click.option("--calib-provider", "old_provider", type=click.Choice(["cpu", "cuda"]), hidden=True, help="Old spelling of --provider.")
@click.option("--calib-max-batch", "old_max_batch", type=int, hidden=True, help="Old spelling of --max-batch.")
@click.pass_context
@handle_errors
def quantize(ctx, model, output, mode, preset, calib_path, calib_random, seed, shapes, calib_batches, max_batch, provider,
             allow_cpu_fallback, memory_budget, exclude, report_path, old_provider, old_max_batch, **options):
    """Quantize MODEL for TensorRT: calibrate, insert Q/DQ, FP16 elsewhere."""
    from . import recipes
    _check_auto_options(mode, preset, options)
    mode = "auto" if options["auto"] else (mode or "fp8")
    provider, max_batch = _merge_alias(provider, old_provider), _merge_alias(max_batch, old_max_batch)
    _check_mode_options(mode, options)
    config = _quant_config(ctx, "fp8" if mode == "auto" else mode, preset, exclude=tuple(exclude), provider=provider, memory_budget_mb=memory_budget,
                           calib_batches=calib_batches, calib_max_batch=max_batch, **options)
    if options.get("percentile") is not None and mode != "int4" and config.method != "percentile":
        raise OnnxoptError(f"--percentile applies to --calib-method percentile, not {config.method}")
    recipe = recipes.recipe(config)
    runner = _runner(recipe, calib_path=calib_path, calib_random=calib_random, seed=seed, shapes=shapes,
                     calib_batches=config.calib_batches, max_batch=recipe.max_batch, provider=config.provider,
                     allow_cpu_fallback=allow_cpu_fallback, memory_budget=config.memory_budget_mb)
    _check_input(model)
    result = runner.run(model, output or _default_output(model, mode))
    result.report = {"mode": mode, **result.report}
    if report_path:
        _write_json(report_path, result.report)
    _summary(_describe_quantize(result.report, mode), result.path, result.report)


_INT4_ONLY = {"awq": "--awq", "block_size": "--block-size", "int8_layers": "--int8-layers"}
_AUTO_ONLY = {"formats": "--formats", "target_cosine": "--target-cosine", "target_top1": "--target-top1",
              "bits": "--bits", "sensitivity": "--sensitivity"}
_NOT_AUTO = {"awq": "--awq", "int8_layers": "--int8-layers", "smoothquant": "--smoothquant",
             "calib_method": "--calib-method", "percentile": "--percentile", "sparsity": "--sparsity"}


def _check_auto_options(mode, preset, o: dict) -> None:
    """--auto chooses the formats itself; its options mean nothing without it."""
    if not o["auto"]:
        given = [flag for k, flag in _AUTO_ONLY.items() if o.get(k) is not None]
        if given:
            raise OnnxoptError(f"{', '.join(given)} {_apply(given)} to --auto only; add --auto (per-layer format search)")
        o.pop("formats")
        return
    if mode or preset:
        raise OnnxoptError(f"--auto chooses the format of each layer; drop --{mode or 'preset'} and list the candidates "
                           "with --formats (e.g. --formats fp8,int8,int4)")
    given = [flag for k, flag in _NOT_AUTO.items() if o.get(k) is not None]
    if given:
        raise OnnxoptError(f"{', '.join(given)} {_apply(given)} to a single mode, not --auto; drop {_it(given)}")
    o["formats"] = tuple(f.strip() for f in (o.get("formats") or "fp8,int8").split(",") if f.strip())
_W8A8_ONLY = {"calib_method": "--calib-method", "no_mha": "--no-mha"}


def _check_mode_options(mode: str, o: dict) -> None:
    """Options that do not fit the mode are errors, not silently ignored."""
    if mode == "auto":
        return
    if mode != "int4":
        given = [flag for k, flag in _INT4_ONLY.items() if o.get(k) is not None]
        if given:
            raise OnnxoptError(f"{', '.join(given)} {_apply(given)} to --int4 only (weight-only INT4); drop {_it(given)} or use --int4")
    else:
        given = [flag for k, flag in _W8A8_ONLY.items() if o.get(k)] + (["--percentile"] if o.get("percentile") is not None else [])
        if o.get("smoothquant") is not None:
            given.append("--smoothquant")
        if given:
            raise OnnxoptError(f"{', '.join(given)} {_apply(given)} to --int8/--fp8 only; --int4 is weight-only (no activation ranges)")
    if mode == "fp8" and o.get("smoothquant") is not None:
        raise OnnxoptError("--smoothquant applies to --int8 only; drop it or quantize with --int8")
    if o.get("sparsity_method") and not o.get("sparsity"):
        raise OnnxoptError("--sparsity-method needs --sparsity N:M (e.g. --sparsity 2:4)")
    if o.get("io_dtype") and o.get("high_precision") == "fp32":
        raise OnnxoptError("--io-dtype converts graph inputs/outputs to low precision, which --high-precision fp32 does not use")


def _apply(given: list) -> str:
    return "applies" if len(given) == 1 else "apply"


def _it(given: list) -> str:
    return "it" if len(given) == 1 else "them"


def _quant_config(ctx, mode, preset, **fields):
    """QuantConfig of the command line: a preset's recipe with the options the user gave on top."""
    import dataclasses

    from .recipes import QuantConfig
    no_mha = fields.pop("no_mha")
    op_types = fields.pop("op_types")
    fields.update(quantize_mha=not no_mha, op_types=tuple(o.strip() for o in op_types.split(",") if o.strip()),
                  progress=progress_enabled())
    if fields.get("sparsity") and not fields.get("sparsity_method"):
        fields["sparsity_method"] = "magnitude"
    if not preset:
        return QuantConfig(mode=mode, **{k: v for k, v in fields.items() if v is not None})
    from . import presets
    base = presets.config(preset, mode)
    explicit = {k: v for k, v in fields.items() if _given(ctx, k) and v is not None}
    config = dataclasses.replace(base, **explicit, progress=progress_enabled())
    if fields.get("exclude"):
        config = dataclasses.replace(config, exclude=tuple(base.exclude) + tuple(fields["exclude"]))
    return config


def _describe_quantize(report: dict, mode: str) -> str:
    cov = report.get("coverage", {})
    q, s = cov.get("quantized", 0), cov.get("skipped", 0)
    if mode == "auto":
        a = report.get("autoquant", {})
        mix = ", ".join(f"{cov[f]} {f}" for f in ("fp8", "int8", "int4") if cov.get(f))
        v = a.get("verified", {})
        met = {True: "target met", False: "TARGET MISSED", None: "no accuracy target"}[a.get("met")]
        return (f"auto-quantized {q}/{q + s} layers ({mix or 'none'}; {s} FP16): weight bits {a.get('weight_bits', 0):.2f}, "
                f"activation bits {a.get('activation_bits', 0):.2f}, {100 * a.get('macs_8bit', 0):.0f}% of MACs 8-bit; "
                f"held-out cosine {v.get('cosine', 0):.5f}, top-1 {v.get('top1', 0):.3f} ({met})")
    if mode == "int4":
        sec = report.get("int4", {})
        extra = [f"block {sec.get('block_size')}" if sec.get("block_size") else "per-channel",
                 f"AWQ {sec.get('awq')}" if sec.get("awq", "none") != "none" else "round-to-nearest"]
        if cov.get("int8"):
            extra.append(f"{cov['int8']} kept INT8")
        text = f"quantized {q}/{q + s} layers to int4 weight-only ({', '.join(extra)}), {s} skipped"
    else:
        bmm = cov.get("attention_bmms", 0)
        text = f"quantized {q}/{q + s} layers to {mode}" + (f" ({bmm} attention BMMs)" if bmm else "") + f", {s} skipped"
        if report.get("smoothquant"):
            text += f"; SmoothQuant on {len(report['smoothquant'].get('groups', []))} activations"
    sp = report.get("sparsity")
    if sp:
        text += f"; pruned {sp['pruned']} layers to {sp['pattern']} ({sp['method']})"
    return text


_PARAM_FOR_FIELD = {"quantize_mha": "no_mha", "provider": "provider", "memory_budget_mb": "memory_budget",
                    "calib_max_batch": "max_batch"}


def _given(ctx, field_name: str) -> bool:
    """Whether the user set the option behind a QuantConfig field (so it overrides the preset)."""
    param = _PARAM_FOR_FIELD.get(field_name, field_name)
    src = ctx.get_parameter_source(param)
    old = {"provider": "old_provider", "max_batch": "old_max_batch"}.get(param)
    src_old = ctx.get_parameter_source(old) if old else None
    return any(s is not None and s.name == "COMMANDLINE" for s in (src, src_old))


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


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model (default: MODEL.fp16.onnx).")
@click.option("--fp16", "dtype", flag_value="fp16", default=True, help="FP16 (default).")
@click.option("--bf16", "dtype", flag_value="bf16", help="BF16.")
@click.option("--io-dtype", type=click.Choice(["fp16", "bf16"]), help="Also convert graph inputs/outputs.")
@click.option("--keep-fp32", "keep_fp32_ops", multiple=True, help="Op type to keep in FP32 (repeatable).")
@click.option("--no-ranges", is_flag=True, help="Do not measure value ranges (FP32 only where the op type needs it; not recommended).")
@click.option("--no-check", is_flag=True, help="Skip the finite-output check of the written graph against the FP32 model.")
@functools.partial(_shared_run_options, exclude=False)
@handle_errors
def convert(model, output, dtype, io_dtype, keep_fp32_ops, no_ranges, no_check, calib_path, calib_random, seed, shapes,
            calib_batches, max_batch, provider, allow_cpu_fallback, memory_budget, report_path):
    """Convert MODEL to FP16 (the TensorRT baseline) or BF16. Measured value ranges (--calib, or a few
    generated samples where the input shapes are static) decide what stays FP32, and the written graph is
    checked for finite outputs against the FP32 model."""
    from .calib import parse_shapes
    from .passes import Autocast
    from .pipeline import Runner
    runner = Runner([Autocast(dtype, io_dtype=io_dtype, keep_fp32_ops=tuple(keep_fp32_ops), measure_ranges=not no_ranges)],
                    data=calib_path, calib_random=calib_random, seed=seed, shapes=parse_shapes(shapes),
                    calib_batches=calib_batches, max_batch=max_batch, provider=provider or "cpu",
                    allow_cpu_fallback=allow_cpu_fallback, memory_budget_mb=memory_budget, progress=progress_enabled(),
                    check_finite=not no_check)
    _check_input(model)
    result = runner.run(model, output or _default_output(model, dtype))
    if report_path:
        _write_json(report_path, result.report)
    ac = result.report["autocast"]
    checked = (f"{len(ac.get('kept_fp32', {}))} kept in fp32 by measured range" if ac.get("ranges_checked")
               else "ranges not checked (pass --calib, or --calib-random N --shapes for dynamic inputs)")
    _summary(f"converted to {dtype}: {ac.get('fp32_nodes', 0)} nodes fp32 ({100 * ac.get('fp32_share', 0):.1f}%), {checked}, "
             f"{ac.get('casts', 0)} casts", result.path, result.report)


# ---- inspect / compare / bench / calib-data: shared bits (engineer C)
class _OneLineErrors(click.Command):
    """Bad option values (click's usage errors) print one `error:` line, not the usage block."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            click.echo(f"error: {e.format_message()}", err=True)
            ctx.exit(2)


def _alias(new, old, new_name: str, old_name: str):
    """Merge a hidden old spelling into its new option."""
    if old is not None and old is not False:
        if new not in (None, False) and new != old:
            raise OnnxoptError(f"{old_name} is the old name of {new_name}; give only {new_name}")
        return old
    return new


def _check_report(report, *inputs) -> None:
    from pathlib import Path

    from .io import check_writable
    if report and any(Path(report).resolve() == Path(i).resolve() for i in inputs):
        raise OnnxoptError(f"--report {report} is an input model; choose another file so that the input stays untouched")
    if report:
        check_writable(report, "--report")


def _size(path) -> str:
    import os
    return f"{os.path.getsize(path) / 2**20:.1f} MB"


_PROVIDER_OPTIONS = [
    click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                 help="ONNX Runtime execution provider (cuda needs onnxruntime-gpu and a CUDA 13 stack)."),
    click.option("--allow-cpu-fallback", is_flag=True, help="Run on the CPU, with one warning, when the provider is not available (default: an error)."),
]


def _provider_options(fn):
    for opt in reversed(_PROVIDER_OPTIONS):
        fn = opt(fn)
    return fn


@main.command(cls=_OneLineErrors)
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
    from .inspect import format_report, inspect_path
    report_path = _alias(report_path, old_json, "--report", "--json")
    show_sparsity = show_sparsity or old_sparsity
    _check_report(report_path, model)
    ins = inspect_path(model)
    click.echo(format_report(ins, show_layers=layers))
    summary = ins.summary()
    if engine or engine_shapes:
        from .trt.report import engine_report_of
        rep = engine_report_of(model, _build_config(engine_shapes, None, None, None, None, None))
        from .trt.report import format_report as format_engine
        click.echo(format_engine(rep))
        summary["engine"] = rep
    if show_sparsity:
        from . import io, sparsity
        rows = sparsity.report(io.import_graph(io.load(model)))
        click.echo(sparsity.format_report(rows))
        summary["sparsity"] = {**sparsity.summary(rows), "per_layer": rows}
    if report_path:
        _write_json(report_path, summary)
    formats = ", ".join(f"{f} {n}" for f, n in summary["formats"].items())
    _summary(f"inspected {model}: {summary['quantized_layers']}/{summary['layers']} layers quantized"
             f"{f' ({formats})' if formats else ''}, lint {'clean' if not summary['lint'] else str(len(summary['lint'])) + ' issue(s)'}"
             + (f"; wrote {report_path}" if report_path else ""))


@main.command(cls=_OneLineErrors)
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), help="Evaluation data (.npz / .npy / directory); default: generated.")
@click.option("--random", "n_random", type=click.IntRange(min=1), default=4, show_default=True, help="Generated samples when --data is absent.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the generated samples (calibrate on another one).")
@click.option("--shapes", multiple=True, help="name:1x4x128x128 for dynamic inputs of generated data (repeatable).")
@click.option("--max-batch", type=click.IntRange(min=1), help="Split feeds along a dynamic batch axis into at most N (less memory; results differ only by float rounding).")
@_provider_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the metrics as JSON to this file.")
@click.option("--json", "old_json", type=click.Path(dir_okay=False), hidden=True, help="Old name of --report.")
@handle_errors
def compare(reference, candidate, data, n_random, seed, shapes, max_batch, provider, allow_cpu_fallback, report_path, old_json):
    """Per-output cosine, SNR and max abs error of CANDIDATE vs REFERENCE (ORT, ORT_DISABLE_ALL)."""
    from .calib import parse_shapes
    from .compare import compare as run
    report_path = _alias(report_path, old_json, "--report", "--json")
    _check_report(report_path, reference, candidate)
    res = run(reference, candidate, data, n_random=n_random, seed=seed, shapes=parse_shapes(shapes), max_batch=max_batch,
              provider=provider, allow_cpu_fallback=allow_cpu_fallback, progress=progress_enabled())
    click.echo(f"{'output':<32}{'cosine':>12}{'SNR dB':>10}{'max abs':>12}")
    for name, m in res.items():
        click.echo(f"{name:<32}{m['cosine']:>12.6f}{m['snr_db']:>10.2f}{m['max_abs']:>12.4g}")
    if report_path:
        _write_json(report_path, res)
    worst = min(res, key=lambda o: (res[o]["cosine"] == res[o]["cosine"], res[o]["cosine"]))  # NaN first
    _summary(f"compared {len(res)} output(s) over {res.samples} batch(es) on {res.provider}: worst cosine "
             f"{res[worst]['cosine']:.6f} ({worst}), SNR {res[worst]['snr_db']:.2f} dB"
             + (f"; wrote {report_path}" if report_path else ""))


# ---- sparsify
@main.command("sparsify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model (default: MODEL.sparse.onnx).")
@click.option("--sparsity", "pattern", metavar="N:M", help="N:M: at most N non-zeros in every M input channels (default 2:4).")
@click.option("--sparsity-method", "method", type=click.Choice(["magnitude", "sparsegpt"]),
              help="magnitude (default): keep the largest |w|; sparsegpt: minimise layer-output error (needs --calib).")
@_shared_run_options
@click.option("--min-params", type=int, default=4096, show_default=True, help="Skip weights with fewer values.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="SparseGPT damping, a fraction of mean diag(H).")
@click.option("--block", type=int, default=128, show_default=True, help="SparseGPT lazy-update block (columns).")
@click.option("--one-shot", is_flag=True, help="SparseGPT: calibrate all layers on the dense graph (faster, less accurate).")
@click.option("--pattern", "old_pattern", hidden=True, help="Old spelling of --sparsity.")
@click.option("--method", "old_method", type=click.Choice(["magnitude", "sparsegpt"]), hidden=True, help="Old spelling of --sparsity-method.")
@click.option("--calib-limit", "old_calib_limit", type=int, hidden=True, help="Old spelling of --calib-batches.")
@click.option("--calib-provider", "old_provider", type=click.Choice(["cpu", "cuda"]), hidden=True, help="Old spelling of --provider.")
@handle_errors
def sparsify_cmd(model, output, pattern, method, calib_path, calib_random, seed, shapes, calib_batches, max_batch, provider,
                 allow_cpu_fallback, memory_budget, exclude, report_path, min_params, damp, block, one_shot, old_pattern,
                 old_method, old_calib_limit, old_provider):
    """Prune Conv/ConvTranspose/MatMul/Gemm weights to 2:4 along input channels (TensorRT sparse tensor cores)."""
    from .passes import Sparsify
    sp = Sparsify(_merge_alias(pattern, old_pattern, "2:4"), method=_merge_alias(method, old_method, "magnitude"),
                  exclude=tuple(exclude), min_params=min_params, damp=damp, block=block, sequential=not one_shot)
    runner = _runner([sp], calib_path=calib_path, calib_random=calib_random, seed=seed, shapes=shapes,
                     calib_batches=_merge_alias(calib_batches, old_calib_limit), max_batch=max_batch,
                     provider=_merge_alias(provider, old_provider), allow_cpu_fallback=allow_cpu_fallback,
                     memory_budget=memory_budget)
    _check_input(model)
    result = runner.run(model, output or _default_output(model, "sparse"))
    rep = result.report["sparsity"]
    if report_path:
        _write_json(report_path, rep)
    for r in rep["layers"] if progress_enabled() else ():  # -q: errors only
        if r["status"] == "skipped":
            click.echo(f"skipped {r['name']}: {r['reason']}", err=True)
    _summary(f"pruned {rep['pruned']} layers to {rep['pattern']} ({rep['method']}), {rep['skipped']} skipped, "
             f"{rep['already']} already {rep['pattern']}; {100 * rep['sparse_param_share']:.1f}% of weight parameters sparse",
             result.path, result.report)


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
        click.option("--strongly-typed/--weakly-typed", default=None, help="Default: strongly typed (the graph's types decide); --weakly-typed only on TensorRT 10, with the graph's precision flags."),
    ]):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Engine (plan) to write (default: MODEL.plan).")
@click.option("--backend", type=click.Choice(["trt", "rtx"]), default="trt", show_default=True,
              help="trt: full TensorRT 10/11 (trt extra); rtx: TensorRT-RTX, built on the CPU for RTX GPUs (rtx extra).")
@click.option("--shapes", multiple=True, help=_SHAPES_HELP)
@click.option("--compute-capability", "targets", multiple=True, metavar="MAJOR.MINOR",
              help="rtx: target GPU (repeatable; default 8.0 8.6 8.9 12.0; FP8 graphs drop 8.0/8.6).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="rtx: write the engine report (JSON) here.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), help="rtx: write the builder's verbose log here.")
@_build_options
@handle_errors
def build(model, output, backend, shapes, targets, report_path, log_path, timing_cache, opt_level, workspace, sparse_weights, strongly_typed):
    """Build a TensorRT (trt) or TensorRT-RTX (rtx) engine from MODEL with Polygraphy."""
    config = _build_config(shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed)
    output = output or (model[:-5] if model.endswith(".onnx") else model) + ".plan"
    if backend == "rtx":
        from .trt import report, rtx
        rtx.parse_targets(targets)  # a bad value is an error before any work
        res = rtx.build(model, output, config=config, targets=list(targets) or None, log_path=log_path)
        rep = report.report_for(model, res)
        level = logging.getLogger().getEffectiveLevel()
        if level < logging.ERROR:  # the table on stderr; stdout keeps the one summary line
            click.echo(report.format_report(rep, all_layers=level <= logging.INFO), err=True)
        if report_path:
            _write_json(report_path, rep)
        if level < logging.ERROR:
            click.echo(f"built TensorRT-RTX {res.tensorrt_rtx} engine for SM {', '.join(rep['targets'])} in {res.seconds:.1f} s: "
                       f"{report.summary_line(rep)}; wrote {res.path} ({res.engine_bytes / 1e6:.1f} MB)")
        return
    if targets or report_path or log_path:
        raise OnnxoptError("--compute-capability, --report and --log need --backend rtx")
    from .trt.build import build as run
    res = run(model, output, config=config)
    flags = "+".join(res.precision_flags) or "no precision flags"
    click.echo(f"wrote {res.path} in {res.seconds:.1f} s (TensorRT {res.tensorrt}, "
               f"{'strongly typed' if res.strongly_typed else 'weakly typed, ' + flags}"
               f"{', sparse weights' if res.sparse_weights else ''})")


@main.command(cls=_OneLineErrors)
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
@_provider_options
@_build_options
@click.pass_context
@handle_errors
def bench(ctx, baseline, candidates, backend, warmup, iters, data, samples, shapes, seed, report_path, labels, work_dir,
          no_fp16_baseline, threads, ort_level, provider, allow_cpu_fallback, timing_cache, opt_level, workspace,
          sparse_weights, strongly_typed):
    """Time BASELINE and each CANDIDATE; print speedup, size and output fidelity against the baseline."""
    from .bench import BenchConfig, format_table
    from .bench import bench as run
    _check_bench_options(ctx, backend)
    _check_report(report_path, baseline, *candidates)
    build_config = _build_config(shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed)
    config = BenchConfig(backend=backend, warmup=warmup, iters=iters, samples=samples, profiles=build_config.profiles,
                         seed=seed, threads=threads, ort_level=ort_level, provider=provider,
                         allow_cpu_fallback=allow_cpu_fallback, fp16_baseline=not no_fp16_baseline,
                         work_dir=work_dir, build=build_config)
    result = run(baseline, candidates, config=config, data=data, labels=labels or None, report=report_path)
    click.echo(format_table(result))
    _summary(_bench_summary(result) + (f"; wrote {report_path}" if report_path else ""))


_BACKEND_ONLY = {"onnxrt": ("threads", "ort_level", "provider", "allow_cpu_fallback"),
                 "trt": ("no_fp16_baseline", "timing_cache", "opt_level", "workspace", "sparse_weights", "strongly_typed")}


def _check_bench_options(ctx, backend: str) -> None:
    """An option of the other backend is an error (it would be ignored)."""
    for owner, params in _BACKEND_ONLY.items():
        if backend in ("auto", owner):
            continue
        given = [p for p in params if (src := ctx.get_parameter_source(p)) is not None and src.name == "COMMANDLINE"]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise OnnxoptError(f"{flag} applies to the {owner} backend only; drop it or use --backend {owner}")


def _bench_summary(result: dict) -> str:
    m = result["machine"]
    where = f"{result['backend']} ({m['provider']})" if result["backend"] == "onnxrt" else result["backend"]
    cands = result["candidates"]
    best = max(cands, key=lambda r: r["speedup"] if r["speedup"] == r["speedup"] else float("-inf"))
    cos = [r["fidelity"]["cosine"] for r in cands if r.get("fidelity")]
    worst = f", worst cosine {min(cos):.6f}" if cos and all(c == c for c in cos) else ""
    return (f"benchmarked {1 + len(cands)} models on {where}: best speedup {best['speedup']:.2f}x ({best['label']}) "
            f"over {result['baseline']['label']}{worst}")


# ---- calib-data (diffusion)
class _OneLineGroupErrors(click.Group):
    """A group whose usage errors (unknown subcommand, bad option) are one `error:` line."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the bare group: its help, as click prints it
                raise
            click.echo(f"error: {e.format_message()}", err=True)
            ctx.exit(2)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            click.echo(f"error: {e.format_message()}", err=True)
            ctx.exit(2)


@main.group("calib-data", cls=_OneLineGroupErrors)
def calib_data():
    """Write calibration data (.npz for `quantize --calib`) for a model family."""


@calib_data.command("sdxl", cls=_OneLineErrors)
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

    from . import diffusion
    if not output.endswith(".npz"):
        raise OnnxoptError(f"-o {output}: calibration data is written as .npz; name the output *.npz")
    if report_path and os.path.abspath(report_path) == os.path.abspath(output):
        raise OnnxoptError(f"--report {report_path} is the -o output too; give the report another file name")
    _check_report(report_path)
    from .io import check_writable
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


_verbosity_after_command(calib_data_sdxl)


for _cmd in list(main.commands.values()):
    _verbosity_after_command(_cmd)


if __name__ == "__main__":
    main()
