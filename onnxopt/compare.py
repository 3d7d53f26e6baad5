"""Output fidelity of a candidate model against a reference, evaluated with ORT at ORT_DISABLE_ALL."""
from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from . import modelfile
from . import metrics as M
from . import ort as ortx
from .calib import CalibData, input_specs
from .errors import OnnxoptError
from .progress import track
from .settings import MEMORY_BUDGET_MB

log = logging.getLogger(__name__)


def metrics(ref: np.ndarray, cand: np.ndarray) -> dict:
    """Global cosine similarity, SNR in dB (signal = ref, noise = cand - ref), and max abs error (onnxopt.metrics)."""
    return {"cosine": M.cosine(ref, cand), "snr_db": M.snr_db(ref, cand), "max_abs": M.max_abs(ref, cand)}


def evaluation_session(model: onnx.ModelProto, provider: str = "cpu"):
    """ORT_DISABLE_ALL session; FP16/BF16 graphs that the provider cannot run get an exact emulation
    (FP32 compute, every low-precision tensor rounded to its format: onnxopt.emulate). Inside `ort.device_weights`
    (compare on CUDA) its big weights are read and copied to the device on threads."""
    try:
        return ortx.session(model, provider=provider, level="disable", shared=True), False
    except OnnxoptError as e:
        from .emulate import emulated_view
        log.info("evaluating an exact FP16/BF16 emulation (%s)", e)
        return ortx.session(emulated_view(model), provider=provider, level="disable"), True


def compare(ref, cand, data: CalibData | str | None = None, *, n_random: int = 4, seed: int = 1,
            shapes: dict | None = None, provider: str = "cpu", max_batch: int | None = None,
            allow_cpu_fallback: bool = False, progress: bool = False) -> dict:
    """Per-output cosine, SNR and max abs error of `cand` against `ref` over `data`. `max_batch` splits
    feeds along a dynamic batch axis (a CFG pair, say): the same comparison with less activation memory.
    `provider` "cuda" runs both models on ORT's CUDA provider (an error if ORT cannot use it, unless
    `allow_cpu_fallback`)."""
    ran_on = "cuda" if "CUDAExecutionProvider" in ortx.check_provider(provider, allow_cpu_fallback) else "cpu"
    if n_random < 1:
        raise OnnxoptError(f"--random {n_random}: compare needs at least 1 sample")
    with tempfile.TemporaryDirectory(prefix="onnxopt-compare-") as work:
        res = _compare(ref, cand, data, n_random, seed, shapes, provider, max_batch, Path(work), progress)
    res.provider = ran_on
    return res


class Comparison(dict):
    """{output: metrics (global cosine, SNR, max abs; per-sample cosine mean and worst)}, plus how many batches were compared and on which provider."""
    samples: int = 0
    provider: str = "cpu"


def _compare(ref, cand, data, n_random, seed, shapes, provider, max_batch, work: Path, progress: bool = False) -> dict:
    # Embedded weights go to files first, so that session creation does not copy them.
    ref_m = ref if isinstance(ref, onnx.ModelProto) else modelfile.externalize_if_large(modelfile.load(ref), work / "ref")
    cand_m = cand if isinstance(cand, onnx.ModelProto) else modelfile.externalize_if_large(modelfile.load(cand), work / "cand")
    specs = input_specs(ref_m)
    if data is None:
        data = CalibData.random(specs, n_random, seed=seed, shapes=shapes, max_batch=max_batch)
    elif not isinstance(data, CalibData):
        data = CalibData.from_path(data, specs, max_batch=max_batch)
    outs = [o.name for o in ref_m.graph.output]
    missing = [o for o in outs if o not in {o.name for o in cand_m.graph.output}]
    if missing:
        raise OnnxoptError(f"candidate lacks outputs {missing}; compare models of the same network")
    inits = {t.name for t in cand_m.graph.initializer}
    extra = [i.name for i in cand_m.graph.input if i.name not in inits and i.name not in {s.name for s in specs}]
    if extra:
        raise OnnxoptError(f"candidate takes inputs {extra} that the reference does not; compare models of the same network")
    acc = {o: M.Stream() for o in outs}
    # The reference's outputs wait on disk while the candidate runs. Where both models' weights fit at once
    # (CUDA: a third of the GPU; CPU: the memory budget), the candidate's session is built in a worker thread
    # while the reference's is built and run (ORT releases the GIL: the two session set-ups, most of a big
    # UNet's compare, overlap). Otherwise one model at a time, so the peak is the larger model's, not the sum
    # (a full-size SDXL UNet pair would not fit 24 GB of host memory).
    together = ortx.fit_together([ref_m, cand_m], provider, MEMORY_BUDGET_MB)
    # both at once: their weights read and copied to the device on threads (ort.device_weights; each session keeps
    # its copies alive, the block's cache lets go at its end)
    with ThreadPoolExecutor(1) as pool, (ortx.device_weights(provider) if together else contextlib.nullcontext()):
        pending = (pool.submit(contextvars.copy_context().run, evaluation_session, cand_m, provider)
                   if together else None)
        rs, _ = evaluation_session(ref_m, provider)
        n = 0
        for i, feed in enumerate(track(data, desc="compare: reference", enabled=progress, unit="batch")):
            got = ortx.run_fetched(rs, outs, feed, model=ref_m, label=f"{_name(ref, 'the reference')} on batch {i + 1}")
            for j, a in enumerate(got):
                np.save(work / f"{i}_{j}.npy", a)
            n = i + 1
        if n == 0:
            raise OnnxoptError(f"{getattr(data, 'describe', data)}: no samples to compare; give data with at least one sample")
        del rs
        gc.collect()
        cs, viewed = pending.result() if pending is not None else evaluation_session(cand_m, provider)
    cand_inputs = {i.name: i.type for i in cs.get_inputs()}
    for i, feed in track(zip(range(n), data), total=n, desc="compare: candidate", enabled=progress, unit="batch"):
        cfeed = {k: (v.astype(np.float32) if viewed and v.dtype == np.float16 else _match(v, cand_inputs.get(k)))
                 for k, v in feed.items()}
        got = ortx.run_fetched(cs, outs, cfeed, model=cand_m, label=f"{_name(cand, 'the candidate')} on batch {i + 1}")
        for j, (o, c) in enumerate(zip(outs, got)):
            acc[o].update(np.load(work / f"{i}_{j}.npy"), c)
    del cs
    res = Comparison((o, a.result()) for o, a in acc.items())
    res.samples = n
    return res


def _name(model, default: str) -> str:
    return default if isinstance(model, onnx.ModelProto) else f"{default} {Path(model).name}"


def _match(v: np.ndarray, ort_type: str | None) -> np.ndarray:
    # Candidates may take FP16 I/O (--io-dtype fp16): feed them what they expect.
    if ort_type == "tensor(float16)" and v.dtype != np.float16:
        return v.astype(np.float16)
    if ort_type == "tensor(float)" and v.dtype != np.float32:
        return v.astype(np.float32)
    return v
