"""What every onnxopt command shares: the `main` group, one-line errors, verbosity, the one vocabulary of
options (calibration data, providers, reports) and the summary line each command ends with."""
from __future__ import annotations

import functools
import logging
import re
import sys

import click

from ..errors import OnnxoptError
from ..settings import MEMORY_BUDGET_MB

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


# Options whose value is optional: click would read a negative number after them as an option ("-0").
_OPTIONAL_VALUE = ("--smoothquant",)


class _OneLineErrors(click.Group):
    """Bad option values (click's usage errors) print one `error:` line too, exit 2, like every user error."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i in range(1, len(args)):  # a leading space keeps the value a value (float() strips it)
            if args[i - 1] in _OPTIONAL_VALUE and re.fullmatch(r"-\.?\d.*", args[i]):
                args[i] = " " + args[i]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click prints it
                raise
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
@click.version_option(package_name="onnxopt", prog_name="onnxopt")
@click.pass_context
def main(ctx, verbose, quiet):
    """onnxopt: quantize, sparsify and convert ONNX graphs for TensorRT."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # each invocation starts afresh (an earlier -q in-process left ERROR)
    logging.getLogger("onnxopt.progress").setLevel(logging.INFO)  # off a terminal, progress is these lines
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


def verbosity_after_command(cmd: click.Command) -> None:
    """-v / -q are accepted after the subcommand too (`onnxopt quantize m.onnx -q`)."""
    cmd.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False, is_eager=True,
                                   help="More logging (-vv for debug).",
                                   callback=lambda ctx, _, v: _set_verbosity(ctx, v, False)))
    cmd.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, is_eager=True,
                                   help="Only errors; no progress bars.",
                                   callback=lambda ctx, _, v: _set_verbosity(ctx, 0, v)))


def progress_enabled() -> bool:
    """Whether this invocation shows progress (not -q)."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("progress", True))


# ---- quantize / convert / inspect / compare (core)
def default_output(model: str, suffix: str) -> str:
    """MODEL.SUFFIX.onnx beside the input: the output path when -o is not given."""
    base = model[:-5] if model.endswith(".onnx") else model
    return f"{base}.{suffix}.onnx"


def write_json(path, obj) -> None:
    """Write `obj` as indented JSON to `path`, atomically."""
    import json

    from ..atomicfile import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def check_input(model: str) -> None:
    """An input model that is not a file is a user error."""
    from pathlib import Path
    if not Path(model).is_file():
        raise OnnxoptError(f"{model}: no such model file; check the path")


def summary_line(text: str, path=None, ctx_report: dict | None = None) -> None:
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


def run_options(fn, exclude: bool = True):
    """Calibration-data and ONNX Runtime options shared by quantize, sparsify and convert (one vocabulary)."""
    for opt in reversed([
        click.option("--calib", "calib_path", type=click.Path(), help=".npz (arrays keyed by input name, first axis = samples), .npy, or a directory of .npz."),
        click.option("--calib-random", type=int, help="Calibrate on N generated samples instead of --calib (smoke tests)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for --calib-random."),
        click.option("--shapes", multiple=True, help="name:1x4x128x128 for dynamic inputs of generated data (repeatable)."),
        click.option("--skip-nonfinite", is_flag=True, help="Leave out calibration samples holding inf or NaN (counted in the report) instead of failing."),
        click.option("--calib-batches", type=int, help="Use at most N calibration batches."),
        click.option("--max-batch", type=int, help="Split calibration feeds along a dynamic batch axis into at most N (bounds activation memory)."),
        click.option("--provider", type=click.Choice(["cpu", "cuda"]), help="ONNX Runtime execution provider for calibration (default: cpu)."),
        click.option("--allow-cpu-fallback", is_flag=True, help="Run on the CPU when --provider cuda is not available instead of failing."),
        click.option("--memory-budget", type=int, default=MEMORY_BUDGET_MB, show_default=True, help="Calibration memory in MB: weights ONNX Runtime holds at once (bigger models run in stages), whole activations fetched per pass, Hessians."),
        click.option("--exclude", multiple=True, help="Regex on node names to leave alone (repeatable).") if exclude else None,
        click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the run's JSON report here."),
    ]):
        fn = opt(fn) if opt else fn
    return fn


def option_alias(new, old, new_name: str = "", old_name: str = "", default=None):
    """The value of an option that also has a hidden old spelling (kept for one release)."""
    if old is not None and old is not False:
        if new not in (None, False) and new != old:
            raise OnnxoptError(f"{old_name} is the old name of {new_name}; give only {new_name}")
        return old
    return new if new is not None else default


def one_of(flags: dict, what: str):
    """The one flag given among mutually exclusive ones (None if none); two or more are an error, not the last."""
    given = [f for f, on in flags.items() if on]
    if len(given) > 1:
        raise OnnxoptError(f"{' and '.join(given)} are different {what}; give one of {', '.join(flags)}")
    return given[0] if given else None


def check_report(report, *inputs, output=None, option: str = "--report") -> None:
    """A JSON file the command writes (--report, --sensitivity) is neither an input nor the output model."""
    from pathlib import Path

    from ..atomicfile import check_writable
    if report and any(Path(report).resolve() == Path(i).resolve() for i in inputs):
        raise OnnxoptError(f"{option} {report} is an input model; choose another file so that the input stays untouched")
    if report and output and Path(report).resolve() == Path(output).resolve():
        raise OnnxoptError(f"{option} {report} is also the output model (-o); choose another file")
    if report:
        check_writable(report, option)


def file_size(path) -> str:
    """A file's size in MB, for summary lines."""
    import os
    return f"{os.path.getsize(path) / 2**20:.1f} MB"


_PROVIDER_OPTIONS = [
    click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                 help="ONNX Runtime execution provider (cuda needs onnxruntime-gpu and a CUDA 13 stack)."),
    click.option("--allow-cpu-fallback", is_flag=True, help="Run on the CPU, with one warning, when the provider is not available (default: an error)."),
]


# The denoising loop's settings, shared by compare --sampler and calib-data trajectory (onnxopt.sampler).
_SAMPLER_LOOP_OPTIONS = [
    click.option("--steps", type=click.IntRange(1, 1000), help="Denoising steps (default: 50, diffusers' SDXL default; consistency: 1, and calib-data trajectory records 1, 2, 3 and 4)."),
    click.option("--guidance", type=float, help="euler/ddim/dpmpp: classifier-free guidance scale, 1 = none (default: 5.0, SDXL's); doubles the batch."),
    click.option("--size", "sample_size", help="HxW of the sample (latents: pixels / 8) when the model's is dynamic."),
    click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]), default="epsilon", show_default=True, help="euler/ddim/dpmpp: what the UNet predicts."),
    click.option("--sigma-max", type=float, default=80.0, show_default=True, help="consistency: initial noise level."),
    click.option("--sigma-min", type=float, default=0.002, show_default=True, help="consistency: the model's smallest noise level."),
]


def sampler_loop_options(fn):
    """The denoising loop's options (compare --sampler, calib-data trajectory)."""
    for opt in reversed(_SAMPLER_LOOP_OPTIONS):
        fn = opt(fn)
    return fn


def provider_options(fn):
    """--provider and --allow-cpu-fallback."""
    for opt in reversed(_PROVIDER_OPTIONS):
        fn = opt(fn)
    return fn


def command_runner(recipe, *, calib_path, calib_random, seed, shapes, calib_batches, max_batch, provider, allow_cpu_fallback,
            memory_budget, skip_nonfinite=False, check_finite=True):
    """The Runner of a command, every setting checked here, before any model is read."""
    from ..calib import parse_shapes
    from ..pipeline import Runner
    from ..settings import RunSettings
    settings = RunSettings(provider=provider or "cpu", allow_cpu_fallback=allow_cpu_fallback, memory_budget_mb=memory_budget,
                           progress=progress_enabled(), seed=seed)
    return Runner.from_settings(recipe, settings, data=calib_path, calib_random=calib_random, shapes=parse_shapes(shapes),
                                calib_batches=calib_batches, max_batch=max_batch, skip_nonfinite=skip_nonfinite,
                                check_finite=check_finite)
