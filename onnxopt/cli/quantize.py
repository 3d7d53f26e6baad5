"""quantize and convert: options parsed into a checked recipe of passes, then one Runner."""
from __future__ import annotations

import functools

import click

from .. import formats
from ..errors import OnnxoptError
from .common import (
    option_alias, check_input, check_report, default_output, command_runner, one_of, run_options, summary_line, write_json,
    handle_errors, main, progress_enabled)


DEFAULT_MODE = formats.FP8.name


def _flags(names: tuple, default: str):
    """One --<name> flag per registered format (a new format gets its flag here); `_given_flag` reads them."""
    def deco(fn):
        for name in reversed(names):
            fn = click.option(f"--{name}", name.replace("-", "_"), is_flag=True,
                              help=f"{formats.get(name).description}" + (" (default)." if name == default else "."))(fn)
        return fn
    return deco


def _given_flag(options: dict, names: tuple, what: str) -> str | None:
    """The one format flag given among `names` (popped from `options`), None if none; two are an error."""
    flag = one_of({f"--{n}": options.pop(n.replace("-", "_")) for n in names}, what)
    return flag[2:] if flag else None


def _weight_only(mode: str) -> bool:
    return mode in formats.names() and formats.get(mode).weight_only


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model (default: MODEL.<mode>.onnx).")
@_flags(formats.modes(), DEFAULT_MODE)
@click.option("--weight-only", is_flag=True, default=None, help=f"With {'/'.join('--' + m for m in formats.with_weight_only_variant())}: 4-bit weights, FP16 activations "
              "(W4A16; TensorRT-RTX dequantizes them into FP16 GEMMs).")
@click.option("--preset", type=click.Choice(["sdxl"]), help="Recipe for a model family (exclusions, calibration, MHA).")
@run_options
@click.option("--calib-method", type=click.Choice(["max", "percentile", "entropy", "mse"]), help="INT8/FP8 clip-range method (default: max for FP8, mse for INT8).")
@click.option("--percentile", type=float, help="With --calib-method percentile: the percentile of |x| kept, in (0, 100] (default 99.99).")
@click.option("--op-types", default="Conv,ConvTranspose,MatMul,Gemm", show_default=True, help="Comma-separated op types to quantize.")
@click.option("--weight-rounding", type=click.Choice(["nearest", "feedback"]), help="INT8/FP8 per-channel weights: round to nearest, or with error feedback from the calibration data (GPTQ: the layer output error, not the weight error, is minimized; same graph and scales). Default: nearest (--fp8 on a diffusion denoiser with --calib: feedback).")
@click.option("--no-mha", is_flag=True, help="INT8/FP8: leave attention BMMs (Q·Kᵀ, softmax·V) unquantized.")
@click.option("--high-precision", type=click.Choice(formats.high_precision()), default=formats.FP16.name, show_default=True, help="Precision of everything not quantized.")
@click.option("--io-dtype", type=click.Choice(formats.low_precision()), help="Also convert graph inputs/outputs (default: keep them).")
@click.option("--smoothquant", is_flag=False, flag_value="auto", default=None, metavar="[ALPHA|auto]", callback=lambda c, p, v: _sq_alpha(v),
              help="SmoothQuant with migration strength ALPHA in [0, 1], or 'auto' (INT8: per-layer search, each activation's channels centred first where that helps; the flag alone), or 'none' (off). Default: off; --int8: auto on MatMul layers (not on a diffusion denoiser, not with --preset).")
@click.option("--lowrank", metavar="R|auto|none", help="Low-rank branch (SVDQuant): each quantized GEMM/Conv keeps a rank-R part of its (smoothed) weight in 16 bits beside the quantized residual; 'auto' chooses R per layer within --lowrank-budget; 'none' (or 0) turns it off (default: off; --fp8 on a diffusion denoiser with --calib: auto). With --auto: every FP8/INT8/NVFP4/MXFP8 candidate also comes with the branch ('F+lr'), its bytes and MACs in the cost.")
@click.option("--lowrank-budget", type=float, help="With --lowrank auto: extra 16-bit branch bytes as a fraction of the quantized layers' weight bytes (default 0.1).")
@click.option("--awq", type=click.Choice(["none", "lite", "clip", "full"]), help=f"{'/'.join('--' + m for m in formats.modes() if formats.get(m).awq)}: AWQ scale search (lite), clip search (clip), both then "
              "error-feedback rounding (full, default with data), or round-to-nearest (none).")
@click.option("--block-size", type=int, help="INT4: block size along K: 128 (default), 64, 32, or 0 for per-channel.")
@click.option("--int8-layers", metavar="REGEX", help="INT4: layers whose names match keep per-channel INT8 weights.")
@click.option("--sparsity", metavar="N:M", help="Prune weights to N:M (2:4) before quantization, so scales see the pruned weights.")
@click.option("--sparsity-method", type=click.Choice(["magnitude", "sparsegpt"]), help="With --sparsity: magnitude (default) or sparsegpt (uses the calibration data).")
@click.option("--auto", is_flag=True, help="Choose a format per layer (FP16, FP8, INT8, INT4 weight-only) to meet a target: give one of --target-cosine, --target-top1, --bits.")
@click.option("--formats", help=f"With --auto: comma-separated candidate formats besides FP16, from {','.join(formats.auto_candidates())} "
              f"(int8-sq: SmoothQuant then INT8, offered with int8 when fp8 is not; default {','.join(formats.auto_defaults())}).")
@click.option("--target-cosine", type=float, help="With --auto: mean cosine of the output vs FP32 to keep on held-out calibration batches, e.g. 0.999.")
@click.option("--target-top1", type=float, help="With --auto (classifiers): argmax agreement with FP32 to keep on the calibration samples, e.g. 0.97.")
@click.option("--bits", type=float, help="With --auto: weight bits averaged over the parameters of the weighted layers, e.g. 6 (activation bits over MACs are reported).")
@click.option("--target-psnr", type=float, help="With --auto and --sampler: mean PSNR (dB) of the sampler's final samples vs FP32 on held-out seeds (--verify-seeds), e.g. 30; sensitivities stay per layer, the mix is verified and repaired on the samples.")
@click.option("--psnr-of", type=click.Choice(["mean", "worst"]), help="With --target-psnr: judge the mean PSNR of the held-out seeds (default) or the worst seed's.")
@click.option("--sampler", type=click.Choice(["euler", "ddim", "dpmpp", "consistency"]), help="With --target-psnr: the denoising loop, as in compare --sampler.")
@click.option("--steps", type=click.IntRange(1, 1000), help="With --sampler: denoising steps (default 50; consistency 1).")
@click.option("--guidance", type=float, help="With --sampler euler/ddim/dpmpp: CFG scale (default 5.0; 1 = none).")
@click.option("--verify-seeds", help="With --sampler: held-out seeds the mix is verified on (default 1000-1003; keep them apart from the calibration seeds).")
@click.option("--size", "sample_size", help="With --sampler: HxW of the sample when the model's is dynamic.")
@click.option("--sensitivity", type=click.Path(dir_okay=False), help="With --auto: JSON of per-layer sensitivities; reused if it matches the model and options, written as they are measured (restartable).")
@click.option("--cost-model", type=click.Choice(["bits", "rtx"]), help="With --auto: what a format saves: bits (weight bits over params, activation bits over MACs; default), or rtx: also build the mix with TensorRT-RTX on the CPU and count a layer whose quantized kernel does not fuse as saving nothing (rtx extra).")
@click.option("--engine-shapes", multiple=True, help="With --cost-model rtx: the deployment shapes the engine check builds for, name:1x31 or name:MIN/OPT/MAX as in `build --shapes` (repeatable; default: one calibration sample's shapes).")
@click.option("--auto-stages", type=int, help="With --auto: evaluate the candidates in N stages of the model, one stage's gated graph in memory at a time (big models); 0 (default) = as many as --memory-budget needs, and one per 32 candidates beyond 1000 candidates (at most 32); 1 = one graph.")
@click.option("--calib-provider", "old_provider", type=click.Choice(["cpu", "cuda"]), hidden=True, help="Old spelling of --provider.")
@click.option("--calib-max-batch", "old_max_batch", type=int, hidden=True, help="Old spelling of --max-batch.")
@click.pass_context
@handle_errors
def quantize(ctx, model, output, preset, calib_path, calib_random, seed, shapes, skip_nonfinite, calib_batches,
             max_batch, provider, allow_cpu_fallback, memory_budget, exclude, report_path, old_provider, old_max_batch, **options):
    """Quantize MODEL for TensorRT: calibrate, insert Q/DQ, FP16 elsewhere."""
    from .. import api, pipeline, smoothing_defaults
    mode = _given_flag(options, formats.modes(), "quantization modes")
    if str(options.get("lowrank")).strip().lower() in LOWRANK_OFF:
        options["lowrank"] = None  # explicit off (a denoiser's default branch too)
    options["engine_shapes"] = tuple(options["engine_shapes"]) or None
    _check_auto_options(mode, preset, options)
    _sampler_options(options)
    mode = "auto" if options["auto"] else (mode or DEFAULT_MODE)
    provider = option_alias(provider, old_provider, "--provider", "--calib-provider")
    max_batch = option_alias(max_batch, old_max_batch, "--max-batch", "--calib-max-batch")
    _check_mode_options(mode, options)
    _check_block_size(mode, options)
    config = _quant_config(ctx, DEFAULT_MODE if mode == "auto" else mode, preset, exclude=tuple(exclude), provider=provider, memory_budget_mb=memory_budget,
                           calib_batches=calib_batches, calib_max_batch=max_batch, **options)
    if options.get("percentile") is not None and not _weight_only(mode) and config.method != "percentile":
        raise OnnxoptError(f"--percentile applies to --calib-method percentile, not {config.method}")
    recipe = api.recipe(config)
    pipeline.check_recipe(recipe.passes)  # option conflicts between passes first, then a wrong path, then the data
    check_input(model)
    header = None if config.auto else _header(model)
    config, defaults = _denoiser_defaults(ctx, header, config, preset, has_data=calib_path is not None)
    config, smooth_note = smoothing_defaults.apply(config, header, given=_given(ctx, "smoothquant"), preset=preset,
                                                   has_data=calib_path is not None or calib_random is not None)
    del header  # a model with embedded weights is all header: not held through the run (+89 MB peak on MiniLM)
    if defaults.switched_on or smooth_note:
        recipe = api.recipe(config)
        pipeline.check_recipe(recipe.passes)
    runner = command_runner(recipe, calib_path=calib_path, calib_random=calib_random, seed=seed, shapes=shapes,
                     calib_batches=config.calib_batches, max_batch=recipe.max_batch, provider=config.provider,
                     allow_cpu_fallback=allow_cpu_fallback, memory_budget=config.memory_budget_mb,
                     skip_nonfinite=skip_nonfinite)
    output = output or default_output(model, mode)
    check_report(report_path, model, output=output)
    check_report(options.get("sensitivity"), model, output=output, option="--sensitivity")
    check_input(model)
    result = runner.run(model, output)
    result.report = {"mode": mode, **result.report}
    if defaults.recognised is not None:
        result.report["denoiser"] = defaults.as_dict()
    if smooth_note:
        result.report["smoothquant_default"] = smooth_note
    if report_path:
        write_json(report_path, result.report)
    note = "; ".join(n for n in (defaults.summary(), smooth_note) if n)
    summary_line(_describe_quantize(result.report, mode) + _sensitivity_note(result.report, options.get("sensitivity"))
                 + (f"; {note}" if note else ""), result.path, result.report)


def _header(model):
    """The graph without external weights (0.1 s for full-size SDXL), or None when it does not load."""
    import onnx
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is the run's error to report, in its own words
        return None


def _denoiser_defaults(ctx, header, config, preset, *, has_data: bool):
    """onnxopt.denoiser's defaults for a denoiser graph (its inputs read, no weights); options the user gave win."""
    from .. import denoiser
    if config.auto or header is None:
        return config, denoiser.Defaults(None)
    given = frozenset(f for f, *_ in denoiser.RECIPE if _given(ctx, f))
    return denoiser.apply(config, header, given=given, has_data=has_data, preset=preset)


LOWRANK_OFF = ("none", "off", "0")
BLOCK_SIZES = (128, 64, 32, 0)  # TensorRT's blocked INT4 weight-only GEMM; 0 = per output channel


def _check_block_size(mode: str, o: dict) -> None:
    """--block-size: a block TensorRT runs, and only where an INT4 format is in play."""
    b = o.get("block_size")
    if b is None:
        return
    if mode == "auto" and not any(f in formats.names() and formats.get(f).weights == "per-block" for f in o["formats"]):
        raise OnnxoptError(f"--block-size sets INT4 blocks, and --formats {','.join(o['formats'])} has no int4; "
                           "add int4 to --formats or drop --block-size")
    if b not in BLOCK_SIZES:
        raise OnnxoptError(f"--block-size {b} is not an INT4 block size TensorRT runs; use one of "
                           f"{', '.join(map(str, BLOCK_SIZES))} (0: per channel)")


def _sensitivity_note(report: dict, path) -> str:
    """--sensitivity: how many of the measurements came from the file, so a stale reuse is visible."""
    a = report.get("autoquant") or {}
    if not path or not a:
        return ""
    total = sum(1 for layer in a.get("layers", {}).values() for f in layer.get("sensitivity", {}) if f != "none")
    now = int(a.get("measured_now", 0))
    reused = max(0, total - now)
    return (f"; sensitivities: {reused} reused from {path}, {now} measured" if reused
            else f"; sensitivities measured ({now}) and saved to {path}")


def _takes(f, key: str) -> bool:
    """Whether weight-only format `f` takes the INT4-family option `key` (AWQ: formats with it; blocks: blocked)."""
    return f.weight_only and (f.awq if key == "awq" else f.weights == "per-block")


_INT4_ONLY = {"awq": "--awq", "block_size": "--block-size", "int8_layers": "--int8-layers"}
_AUTO_ONLY = {"formats": "--formats", "target_cosine": "--target-cosine", "target_top1": "--target-top1",
              "bits": "--bits", "sensitivity": "--sensitivity", "cost_model": "--cost-model",
              "engine_shapes": "--engine-shapes", "auto_stages": "--auto-stages", "target_psnr": "--target-psnr", "psnr_of": "--psnr-of",
              "sampler": "--sampler", "steps": "--steps", "guidance": "--guidance", "verify_seeds": "--verify-seeds",
              "sample_size": "--size"}
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
    if o.get("lowrank_budget") is not None and o.get("lowrank") is None:
        raise OnnxoptError("--lowrank-budget needs --lowrank auto")
    o["formats"] = tuple(f.strip() for f in (o.get("formats") or ",".join(formats.auto_defaults())).split(",") if f.strip())


def _sampler_options(o: dict) -> None:
    """--sampler/--steps/--guidance/--verify-seeds/--size become one SamplerOptions (or None)."""
    from .. import sampler as S
    loop = {k: o.pop(k) for k in ("steps", "guidance", "verify_seeds", "sample_size")}
    if o.get("sampler") is None:
        given = [f"--{k.replace('_', '-')}" if k != "sample_size" else "--size" for k, v in loop.items() if v is not None]
        if given:
            raise OnnxoptError(f"{', '.join(given)} {_apply(given)} with --sampler (and --target-psnr) only")
        return
    o["sampler"] = S.SamplerOptions(o["sampler"], loop["steps"], loop["guidance"], S.parse_seeds(loop["verify_seeds"] or "1000-1003"),
                                    S.parse_size(loop["sample_size"]))


_W8A8_ONLY = {"calib_method": "--calib-method", "no_mha": "--no-mha", "weight_rounding": "--weight-rounding"}


def _check_mode_options(mode: str, o: dict) -> None:
    """Options that do not fit the mode are errors, not silently ignored."""
    if o.get("weight_rounding"):
        def rounds(m):  # error feedback rounds per-channel weights of the calibrated (QDQ-pass) formats
            return formats.get(m).weights == "per-channel" and formats.get(m).activations == "static"
        if mode == "auto" or not rounds(mode):
            ok = "/".join(f"--{m}" for m in formats.modes() if rounds(m))
            raise OnnxoptError(f"--weight-rounding applies to {ok} only (per-channel weights, calibrated activations); "
                               f"drop it with --{mode}")
    if mode == "auto":
        return
    w8 = "/".join(f"--{m}" for m in formats.modes() if not formats.get(m).weight_only)
    if not _weight_only(mode):
        keys = [k for k in _INT4_ONLY if o.get(k) is not None and not (k == "awq" and formats.get(mode).awq)]
        given = [_INT4_ONLY[k] for k in keys]
        # the weight-only formats that take one of the given options (W8A16 has neither AWQ nor blocks)
        wo = "/".join(f"--{m}" for m in formats.modes() if any(_takes(formats.get(m), k) for k in keys))
        if given:
            raise OnnxoptError(f"{', '.join(given)} {_apply(given)} to {wo} only (weight-only); drop {_it(given)} or use {wo}")
    else:
        given = [flag for k, flag in _W8A8_ONLY.items() if o.get(k)] + (["--percentile"] if o.get("percentile") is not None else [])
        if o.get("smoothquant") is not None:
            given.append("--smoothquant")
        if given:
            raise OnnxoptError(f"{', '.join(given)} {_apply(given)} to {w8} only; --{mode} is weight-only (no activation ranges)")
        f = formats.get(mode)  # INT4's options mean nothing to a weight-only format without AWQ or blocks
        if o.get("awq") is not None and not f.awq:
            ok = "/".join(f"--{m}" for m in formats.modes() if formats.get(m).awq)
            raise OnnxoptError(f"--awq applies to {ok} only; drop it with --{mode}")
        if o.get("block_size") is not None and f.weights != "per-block":
            ok = "/".join(f"--{m}" for m in formats.modes() if formats.get(m).weight_only and formats.get(m).weights == "per-block")
            raise OnnxoptError(f"--block-size applies to {ok} only; --{mode} has {f.weights} weights, drop it")
    sq = [m for m in formats.modes() if formats.get(m).smoothquant]
    if mode not in sq and o.get("smoothquant") is not None:
        raise OnnxoptError(f"--smoothquant applies to {'/'.join('--' + m for m in sq)} only; drop it or quantize with --{sq[0]}")
    if o.get("weight_only") and not formats.get(mode).weight_only_variant:
        with_wo = "/".join(f"--{m}" for m in formats.with_weight_only_variant())
        raise OnnxoptError(f"--weight-only applies to {with_wo} only ({'/'.join('--' + m for m in formats.weight_only() if m in formats.modes())} is always weight-only)")
    if o.get("lowrank_budget") is not None and o.get("lowrank") is None:
        raise OnnxoptError("--lowrank-budget needs --lowrank auto")
    if o.get("sparsity_method") and not o.get("sparsity"):
        raise OnnxoptError("--sparsity-method needs --sparsity N:M (e.g. --sparsity 2:4)")
    if o.get("io_dtype") and o.get("high_precision") not in formats.low_precision():
        raise OnnxoptError("--io-dtype converts graph inputs/outputs to low precision, which --high-precision fp32 does not use")


def _apply(given: list) -> str:
    return "applies" if len(given) == 1 else "apply"


def _it(given: list) -> str:
    return "it" if len(given) == 1 else "them"


def _quant_config(ctx, mode, preset, **fields):
    """QuantConfig of the command line: a preset's recipe with the options the user gave on top."""
    import dataclasses

    from ..api import QuantConfig
    no_mha = fields.pop("no_mha")
    op_types = fields.pop("op_types")
    fields.update(quantize_mha=not no_mha, op_types=tuple(o.strip() for o in op_types.split(",") if o.strip()),
                  progress=progress_enabled())
    if fields.get("sparsity") and not fields.get("sparsity_method"):
        fields["sparsity_method"] = "magnitude"
    if not preset:
        return QuantConfig(mode=mode, **{k: v for k, v in fields.items() if v is not None})
    from .. import presets
    base = presets.config(preset, mode)
    explicit = {k: v for k, v in fields.items() if _given(ctx, k) and v is not None}
    config = dataclasses.replace(base, **explicit, progress=progress_enabled())
    if fields.get("exclude"):
        config = dataclasses.replace(config, exclude=tuple(base.exclude) + tuple(fields["exclude"]))
    return config


def _engine_rounds(a: dict) -> str:
    """--cost-model rtx: the last TensorRT-RTX build of the search."""
    rounds = a.get("cost_model", {}).get("rounds") or []
    if not rounds:
        return ""
    r = rounds[-1]
    return (f"; TensorRT-RTX: {r['quantized_in_quantized_kernels']}/{r['quantized_layers']} quantized layers in quantized "
            f"kernels after {len(rounds)} build(s)")


def _describe_quantize(report: dict, mode: str) -> str:
    cov = report.get("coverage", {})
    q, s = cov.get("quantized", 0), cov.get("skipped", 0)
    if mode == "auto":
        a = report.get("autoquant", {})
        mix = ", ".join(f"{cov[f]} {f}" for f in formats.auto_candidates() if cov.get(f))
        v = a.get("verified_written") or a.get("verified", {})  # what ships, where it was verified
        met = {True: "target met", False: "TARGET MISSED", None: "no accuracy target"}[a.get("met")]
        return (f"auto-quantized {q}/{q + s} layers ({mix or 'none'}; {s} FP16): weight bits {a.get('weight_bits', 0):.2f}, "
                f"activation bits {a.get('activation_bits', 0):.2f}, {100 * a.get('macs_8bit', 0):.0f}% of MACs 8-bit; "
                + (f"low-rank branch on {a['branch_layers']} of them (+{a['branch_bytes']} bytes, "
                   f"{a['branch_macs'] / max(sum(l['macs'] for l in a['layers'].values()), 1):.1%} more MACs, report: "
                   "lowrank); " if a.get("lowrank") else "")
                + (f"written graph's final samples on held-out seeds: PSNR {v.get('psnr_mean', v.get('psnr', 0)):.2f} dB (worst {v.get('psnr_worst', 0):.2f}), "
                   f"kept wide: {', '.join(a.get('kept_wide', [])[:6]) or 'none'} ({met})" if a.get("metric") == "psnr" else
                   f"held-out cosine {v.get('cosine', 0):.5f}, top-1 {v.get('top1', 0):.3f} ({met})") + _engine_rounds(a)
                + (f"; INT8 broke {len(a['int8_broken'])} layer(s), e.g. {a['int8_broken'][0]['layer']} (report: int8_broken)"
                   if a.get("int8_broken") else ""))
    if _weight_only(mode):
        sec = report.get(mode, {})
        extra = [f"block {sec.get('block_size')}" if sec.get("block_size") else "per-channel",
                 f"AWQ {sec.get('awq')}" if sec.get("awq", "none") != "none" else "round-to-nearest"]
        if cov.get("int8"):
            extra.append(f"{cov['int8']} kept INT8")
        text = f"quantized {q}/{q + s} layers to {mode} weight-only ({', '.join(extra)}), {s} skipped"
    elif report.get("blockfp"):
        sec = report["blockfp"]
        kind = " weight-only" if sec.get("weight_only") else ""
        text = (f"quantized {q}/{q + s} layers: {cov.get(mode, 0)} {mode}{kind} (block {sec.get('block_size')}), "
                f"{cov.get('fp8', 0)} fp8 ({cov.get('attention_bmms', 0)} attention BMMs), {s} skipped")
    else:
        bmm = cov.get("attention_bmms", 0)
        text = f"quantized {q}/{q + s} layers to {mode}" + (f" ({bmm} attention BMMs)" if bmm else "") + f", {s} skipped"
        if report.get("smoothquant"):
            sq = report["smoothquant"]
            text += f"; SmoothQuant on {len(sq.get('groups', []))} activations" + (f" ({sq['shifted']} inputs centred)" if sq.get("shifted") else "")
    lr = report.get("lowrank")
    if lr and lr.get("layers"):
        text += (f"; low-rank branch on {len(lr['layers'])} layers (+{lr['extra_bytes']} bytes, "
                 f"{100 * lr['extra_fraction']:.1f}% of their quantized weights)")
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
    if value is not None and str(value).strip().lower() in ("none", "off"):
        return None  # explicit off: the command line's source says it was given (a denoiser's default off too)
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
@_flags(formats.low_precision(), formats.FP16.name)
@click.option("--io-dtype", type=click.Choice(formats.low_precision()), help="Also convert graph inputs/outputs.")
@click.option("--keep-fp32", "keep_fp32_ops", multiple=True, help="Op type to keep in FP32 (repeatable).")
@click.option("--no-ranges", is_flag=True, help="Do not measure value ranges (FP32 only where the op type needs it; not recommended).")
@click.option("--no-check", is_flag=True, help="Skip the finite-output check of the written graph against the FP32 model.")
@functools.partial(run_options, exclude=False)
@handle_errors
def convert(model, output, io_dtype, keep_fp32_ops, no_ranges, no_check, calib_path, calib_random, seed, shapes,
            skip_nonfinite, calib_batches, max_batch, provider, allow_cpu_fallback, memory_budget, report_path, **options):
    """Convert MODEL to FP16 (the TensorRT baseline) or BF16. Measured value ranges (--calib, or a few
    generated samples where the input shapes are static) decide what stays FP32, and the written graph is
    checked for finite outputs against the FP32 model."""
    from ..passes import Autocast
    dtype = (_given_flag(options, formats.low_precision(), "precisions") or formats.FP16.name)
    runner = command_runner([Autocast(dtype, io_dtype=io_dtype, keep_fp32_ops=tuple(keep_fp32_ops), measure_ranges=not no_ranges)],
                     calib_path=calib_path, calib_random=calib_random, seed=seed, shapes=shapes, calib_batches=calib_batches,
                     max_batch=max_batch, provider=provider, allow_cpu_fallback=allow_cpu_fallback,
                     memory_budget=memory_budget, skip_nonfinite=skip_nonfinite, check_finite=not no_check)
    output = output or default_output(model, dtype)
    check_report(report_path, model, output=output)
    check_input(model)
    result = runner.run(model, output)
    if report_path:
        write_json(report_path, result.report)
    ac = result.report["autocast"]
    checked = (f"{len(ac.get('kept_fp32', {}))} kept in fp32 by measured range" if ac.get("ranges_checked")
               else "ranges not checked (pass --calib, or --calib-random N --shapes for dynamic inputs)")
    summary_line(f"converted to {dtype}: {ac.get('fp32_nodes', 0)} nodes fp32 ({100 * ac.get('fp32_share', 0):.1f}%), {checked}, "
             f"{ac.get('casts', 0)} casts", result.path, result.report)
