"""Evaluation of mixes on the gated graph (FP32 reference once) and the restartable per-candidate sensitivities."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .. import atomicfile, metrics, ort
from ..compare import evaluation_session
from ..errors import OnnxoptError
from ..progress import track
from .candidates import GATES

log = logging.getLogger(__name__)



# ---------------------------------------------------------------- evaluation
class Gates:
    """The gate vector of a mix over `self.index` ({(layer, format): gate}), shared by both evaluators."""
    index: dict

    def zeros(self) -> np.ndarray:
        return np.zeros(max(len(self.index), 1), np.float32)

    def gates(self, mix: dict) -> np.ndarray:
        g = self.zeros()
        for layer, f in mix.items():
            if f != "none":
                g[self.index[(layer, f)]] = 1.0
        return g


class Evaluator(Gates):
    """One ORT session over the gated graph; outputs of the FP32 reference are computed once."""

    def __init__(self, model, index: dict, search: list, verify: list, provider: str, shape_names: dict):
        self.index, self.provider = index, provider
        self.sess = ort.session(model, provider=provider, level="disable")
        self.out = self.sess.get_outputs()[0].name
        self.shape_names = shape_names
        self.search, self.verify = search, verify
        self.shapes: dict[str, list] = {}
        self.ref = {"search": self._outputs(self.zeros(), search, shapes=True), "verify": self._outputs(self.zeros(), verify)}

    def _outputs(self, gates, feeds, shapes=False, sess=None) -> np.ndarray:
        names = [self.out] + (list(self.shape_names) if shapes else [])
        outs = []
        for feed in feeds:
            got = (ort.run(self.sess, names, {**feed, GATES: gates}, label="the gated graph") if sess is None
                   else ort.run(sess, names, feed, label="the written graph"))
            outs.append(got[0].reshape(got[0].shape[0] if got[0].ndim > 1 else 1, -1))
            if shapes:
                for n, v in zip(names[1:], got[1:]):
                    self.shapes.setdefault(n, []).append([int(d) for d in v])
        return np.concatenate(outs).astype(np.float64)

    def sensitivities(self, todo: list, progress: bool = True):
        """Yield ((layer, format), 1 - cosine of the model output with only that candidate on)."""
        for name, f in track(todo, total=len(todo), desc="sensitivity (layer, format)", enabled=progress,
                             unit="candidate"):
            yield (name, f), max(0.0, 1.0 - self.metrics(self.gates({name: f}))["cosine"])

    def metrics(self, gates, split: str = "search") -> dict:
        """Cosine and top-1 agreement on the "search" or "verify" batches, or on "all" of them ("held-out": all
        of them, the cosine the verify batches', see `metrics_of`)."""
        if split in ("all", HELD_OUT):
            ref = np.concatenate([self.ref["search"], self.ref["verify"]])
            cand = np.concatenate([self._outputs(gates, self.search), self._outputs(gates, self.verify)])
            return metrics_of(ref, cand, len(self.ref["verify"]) if split == HELD_OUT else 0)
        ref = self.ref[split]
        cand = self._outputs(gates, self.search if split == "search" else self.verify)
        return metrics_of(ref, cand)


    def written_metrics(self, model, split: str = "search") -> dict:
        """`metrics` of `model` (the graph the writer produced: no gates) on the same batches and FP32 reference:
        what ships is what is verified."""
        sess = evaluation_session(model, self.provider)[0]
        if split in ("all", HELD_OUT):
            ref = np.concatenate([self.ref["search"], self.ref["verify"]])
            cand = np.concatenate([self._outputs(None, self.search, sess=sess), self._outputs(None, self.verify, sess=sess)])
            return metrics_of(ref, cand, len(self.ref["verify"]) if split == HELD_OUT else 0)
        return metrics_of(self.ref[split], self._outputs(None, self.search if split == "search" else self.verify, sess=sess))


HELD_OUT = "held-out"


class Memo:
    """An evaluator whose metrics are kept per (gates, split): the search meets the same mix at nearby
    budgets, and the report asks again for the chosen one (a verification of the full SDXL UNet: ~25 s)."""

    def __init__(self, ev):
        self.ev, self._seen = ev, {}

    def __getattr__(self, name):  # everything else is the evaluator's
        return getattr(self.ev, name)

    def metrics(self, gates, split: str = "search") -> dict:
        key = (gates.tobytes() if isinstance(gates, np.ndarray) else repr(gates), split)
        if key not in self._seen:
            self._seen[key] = self.ev.metrics(gates, split)
        return self._seen[key]


def metrics_of(ref: np.ndarray, cand: np.ndarray, held: int = 0) -> dict:
    """The search's figures of `cand` against `ref` (onnxopt.metrics.cosine_summary: the one cosine)."""
    return metrics.cosine_summary(ref, cand, held)


# ---------------------------------------------------------------- sensitivities (restartable)
def load_sensitivities(path, key: str) -> dict:
    """{layer: {format: error}} saved by an earlier run on the same model and options ({} if none)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise OnnxoptError(f"cannot read sensitivities {path} ({e}); delete it to measure again") from None
    if saved.get("key") != key:
        log.warning("sensitivities in %s are for another model or options; measuring again", path)
        return {}
    return saved.get("layers", {})


def save_sensitivities(path, key: str, layers: dict) -> None:
    if path is None:
        return
    with atomicfile.atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"key": key, "layers": {n: l.error for n, l in layers.items()}}, indent=1))


def measure(ev: Evaluator, layers: dict, *, path=None, key: str = "", progress: bool = True) -> int:
    """Error of each (layer, format) alone on the search batches; returns how many were measured now."""
    saved = load_sensitivities(path, key)
    todo = [(n, f) for n, l in layers.items() for f in l.formats if f != "none"
            and f not in saved.get(n, {})]
    for n, l in layers.items():
        l.error = {"none": 0.0, **{f: v for f, v in saved.get(n, {}).items() if f in l.formats}}
    last = None
    for i, ((name, f), err) in enumerate(ev.sensitivities(todo, progress)):
        layers[name].error[f] = err
        if name != last or i == len(todo) - 1:
            save_sensitivities(path, key, layers)
            last = name
    if todo:
        save_sensitivities(path, key, layers)
    return len(todo)


