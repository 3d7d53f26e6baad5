"""build and bench: TensorRT / TensorRT-RTX engines and the backend-neutral benchmark."""
from __future__ import annotations

import logging

import click

from ..errors import OnnxoptError
from .common import (check_report, provider_options, summary_line, write_json, handle_errors, main)


_SHAPES_HELP = "Input shapes, name:MIN/OPT/MAX (e.g. sample:1x4x64x64/2x4x128x128/2x4x128x128) or name:1x4x128x128 (repeatable)."


def engine_build_config(shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed):
    """The TensorRT build settings of the build/inspect --engine options."""
    from ..trt.build import BuildConfig, parse_profiles
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
    config = engine_build_config(shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed)
    output = output or (model[:-5] if model.endswith(".onnx") else model) + ".plan"
    if backend == "rtx":
        from ..trt import report, rtx
        rtx.parse_targets(targets)  # a bad value is an error before any work
        res = rtx.build(model, output, config=config, targets=list(targets) or None, log_path=log_path)
        rep = report.report_for(model, res)
        level = logging.getLogger().getEffectiveLevel()
        if level < logging.ERROR:  # the table on stderr; stdout keeps the one summary line
            click.echo(report.format_report(rep, all_layers=level <= logging.INFO), err=True)
        if report_path:
            write_json(report_path, rep)
        if level < logging.ERROR:
            click.echo(f"built TensorRT-RTX {res.tensorrt_rtx} engine for SM {', '.join(rep['targets'])} in {res.seconds:.1f} s: "
                       f"{report.summary_line(rep)}; wrote {res.path} ({res.engine_bytes / 1e6:.1f} MB)")
        return
    if targets or report_path or log_path:
        raise OnnxoptError("--compute-capability, --report and --log need --backend rtx")
    from ..trt.build import build as run
    res = run(model, output, config=config)
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
@provider_options
@_build_options
@click.pass_context
@handle_errors
def bench(ctx, baseline, candidates, backend, warmup, iters, data, samples, shapes, seed, report_path, labels, work_dir,
          no_fp16_baseline, threads, ort_level, provider, allow_cpu_fallback, timing_cache, opt_level, workspace,
          sparse_weights, strongly_typed):
    """Time BASELINE and each CANDIDATE; print speedup, size and output fidelity against the baseline."""
    from ..bench import BenchConfig, format_table
    from ..bench import bench as run
    _check_bench_options(ctx, backend)
    check_report(report_path, baseline, *candidates)
    build_config = engine_build_config(shapes, timing_cache, opt_level, workspace, sparse_weights, strongly_typed)
    config = BenchConfig(backend=backend, warmup=warmup, iters=iters, samples=samples, profiles=build_config.profiles,
                         seed=seed, threads=threads, ort_level=ort_level, provider=provider,
                         allow_cpu_fallback=allow_cpu_fallback, fp16_baseline=not no_fp16_baseline,
                         work_dir=work_dir, build=build_config)
    result = run(baseline, candidates, config=config, data=data, labels=labels or None, report=report_path)
    click.echo(format_table(result))
    summary_line(_bench_summary(result) + (f"; wrote {report_path}" if report_path else ""))


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
