"""sparsify: 2:4 pruning as a one-pass recipe."""
from __future__ import annotations

import click

from .common import (
    option_alias, check_input, check_report, default_output, command_runner, run_options, summary_line, write_json,
    handle_errors, main, progress_enabled)


@main.command("sparsify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model (default: MODEL.sparse.onnx).")
@click.option("--sparsity", "pattern", metavar="N:M", help="N:M: at most N non-zeros in every M input channels (default 2:4).")
@click.option("--sparsity-method", "method", type=click.Choice(["magnitude", "sparsegpt"]),
              help="magnitude (default): keep the largest |w|; sparsegpt: minimise layer-output error (needs --calib).")
@run_options
@click.option("--min-params", type=int, default=4096, show_default=True, help="Skip weights with fewer values.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="SparseGPT damping, a fraction of mean diag(H).")
@click.option("--block", type=int, default=128, show_default=True, help="SparseGPT lazy-update block (columns).")
@click.option("--one-shot", is_flag=True, help="SparseGPT: calibrate all layers on the dense graph (faster, less accurate).")
@click.option("--pattern", "old_pattern", hidden=True, help="Old spelling of --sparsity.")
@click.option("--method", "old_method", type=click.Choice(["magnitude", "sparsegpt"]), hidden=True, help="Old spelling of --sparsity-method.")
@click.option("--calib-limit", "old_calib_limit", type=int, hidden=True, help="Old spelling of --calib-batches.")
@click.option("--calib-provider", "old_provider", type=click.Choice(["cpu", "cuda"]), hidden=True, help="Old spelling of --provider.")
@handle_errors
def sparsify_cmd(model, output, pattern, method, calib_path, calib_random, seed, shapes, skip_nonfinite, calib_batches, max_batch, provider,
                 allow_cpu_fallback, memory_budget, exclude, report_path, min_params, damp, block, one_shot, old_pattern,
                 old_method, old_calib_limit, old_provider):
    """Prune Conv/ConvTranspose/MatMul/Gemm weights to 2:4 along input channels (TensorRT sparse tensor cores)."""
    from ..passes import Sparsify
    sp = Sparsify(option_alias(pattern, old_pattern, "--sparsity", "--pattern", default="2:4"), method=option_alias(method, old_method, "--sparsity-method", "--method", default="magnitude"),
                  exclude=tuple(exclude), min_params=min_params, damp=damp, block=block, sequential=not one_shot)
    runner = command_runner([sp], calib_path=calib_path, calib_random=calib_random, seed=seed, shapes=shapes,
                     calib_batches=option_alias(calib_batches, old_calib_limit, "--calib-batches", "--calib-limit"), max_batch=max_batch,
                     provider=option_alias(provider, old_provider, "--provider", "--calib-provider"), allow_cpu_fallback=allow_cpu_fallback,
                     memory_budget=memory_budget, skip_nonfinite=skip_nonfinite)
    output = output or default_output(model, "sparse")
    check_report(report_path, model, output=output)
    check_input(model)
    result = runner.run(model, output)
    rep = result.report["sparsity"]
    if report_path:
        write_json(report_path, rep)
    for r in rep["layers"] if progress_enabled() else ():  # -q: errors only
        if r["status"] == "skipped":
            click.echo(f"skipped {r['name']}: {r['reason']}", err=True)
    summary_line(f"pruned {rep['pruned']} layers to {rep['pattern']} ({rep['method']}), {rep['skipped']} skipped, "
             f"{rep['already']} already {rep['pattern']}; {100 * rep['sparse_param_share']:.1f}% of weight parameters sparse",
             result.path, result.report)
