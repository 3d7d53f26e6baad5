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
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"progress": not quiet}


def progress_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("progress", True))


# Commands live below, one function each, grouped by capability.
# ---- quantize / convert / inspect / compare (core)

# ---- sparsify

# ---- build / bench (trt)

# ---- calib-data (diffusion)


if __name__ == "__main__":
    main()
