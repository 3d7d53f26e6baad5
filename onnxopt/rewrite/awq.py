"""AWQ for 4-bit block weights (INT4 W4A16, NVFP4): activation-aware input-channel scales and per-block clip ratios.

- lite: per activation (layers that read it share one s), s = x^a / w^(1-a) with x the mean |X_j| over the
  calibration data and w the mean block-normalized |W_j|; a is searched on a grid (0.1, refined by 0.05)
  by the layers' output MSE against FP32, and s is folded into the graph by `fold.fold_input_scale` (the
  same folding as SmoothQuant).
- clip: per (block, output channel) clip ratio of the INT4 scale, searched by output MSE: each block on its
  own, then coordinate descent over the blocks of each output channel.
- full: lite, then clip on the scaled weights.

One streaming calibration pass collects, per activation, the channel means and the Gram matrix X^T X over
all rows (bounded row samples instead when the Gram matrices would not fit the memory budget); every
output MSE is then tr(D^T H D) for a weight error D, without stored activations.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import calib, obs
from . import fold
from ..calib import ChannelMeanAbs, Gram, RowSample
from ..errors import OnnxoptError
from ..progress import track
from ..formats import FP16, INT4
from ..formats.int4 import expand
from ..graph import activation_channel_axis, to_kn
from ..settings import MEMORY_BUDGET_MB
from ..pass_protocol import AwqChoice, PassBase, StaticQuantizer, WeightOnlyQuantizer, after, check_choice

log = logging.getLogger(__name__)

ALPHAS = tuple(round(a, 2) for a in np.arange(0.0, 1.0001, 0.05))
CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5
CLIP_SWEEPS = 2           # coordinate-descent passes over the blocks of a column
ROWS = 2048               # sampled input rows per activation when Gram matrices would not fit the budget
_S_RANGE = (1e-4, 1e4)


def _quant(w_kn: np.ndarray, fmt, block_size: int, hp: str, clip=None) -> np.ndarray:
    return fmt.fake_quant(w_kn, 1, hp, block_size=block_size, clip=clip)


def _weight_norm_mean(w_kn: np.ndarray, block_size: int) -> np.ndarray:
    """Mean over output channels of |W| normalized by its block's max: how large row j is within its blocks."""
    k, n = w_kn.shape
    b = block_size or k
    nb = -(-k // b)
    a = np.abs(w_kn)
    pad = np.concatenate([a, np.zeros((nb * b - k, n), a.dtype)]) if nb * b != k else a
    amax = pad.reshape(nb, b, n).max(axis=1, keepdims=True)
    norm = (pad.reshape(nb, b, n) / np.maximum(amax, 1e-12)).reshape(nb * b, n)[:k]
    return norm.mean(axis=1)


def _rel_error(h: np.ndarray, w: np.ndarray, deq: np.ndarray, norm: float) -> float:
    """||X (deq - W)||^2 / ||X W||^2 through the Gram matrix H = X^T X."""
    d = deq - w
    return float(np.sum((h @ d) * d, dtype=np.float64)) / norm




def search_scale(h: np.ndarray, x_mean: np.ndarray, weights: list[tuple[np.ndarray, int]], block_size: int,
                 hp: str = "fp32") -> tuple[float | None, np.ndarray, dict]:
    """AWQ-lite: the s (one per input channel) minimizing sum over layers of ||X W - (X/s) Q(W s)||^2 / ||X W||^2,
    with H = X^T X; alpha on a 0.1 grid, then refined by 0.05. `weights` holds (W [K, N], format).
    Returns (alpha, or None for no scaling, s, errors)."""
    norms = [max(float(np.sum((h @ w) * w, dtype=np.float64)), 1e-30) for w, _ in weights]
    w_mean = np.mean([_weight_norm_mean(w, block_size) for w, _ in weights], axis=0)
    xm = np.maximum(x_mean, 1e-8)
    wm = np.maximum(w_mean, 1e-8)

    def loss(s):
        sc = s[:, None].astype(np.float32)
        return sum(_rel_error(h, w, _quant(w * sc, fmt, block_size, hp) / sc, nrm) for (w, fmt), nrm in zip(weights, norms))

    def scales(a):
        s = xm ** a / wm ** (1.0 - a)
        return np.clip(s / math.sqrt(float(s.max() * s.min())), *_S_RANGE)

    tried = {}
    for a in ALPHAS[::2]:
        tried[a] = loss(scales(a))
    best = min(tried, key=tried.get)
    for a in (round(best - 0.05, 2), round(best + 0.05, 2)):
        if 0.0 <= a <= 1.0 and a not in tried:
            tried[a] = loss(scales(a))
    best = min(tried, key=tried.get)
    base = loss(np.ones_like(xm))
    if base <= tried[best]:
        return None, np.ones_like(xm), {"unscaled": base, "scaled": base}
    return float(best), scales(best), {"unscaled": base, "scaled": tried[best]}


def _quad(hbb: np.ndarray, c: np.ndarray) -> np.ndarray:
    """c_r[:, n]^T H c_r[:, n] for every r and n, as one matrix product. c: [R, B, N] -> [R, N]."""
    r, b, n = c.shape
    flat = np.ascontiguousarray(c.transpose(1, 0, 2)).reshape(b, r * n)
    return np.einsum("bk,bk->k", hbb @ flat, flat).reshape(r, n)


def search_clip(h: np.ndarray, w_kn: np.ndarray, block_size: int, hp: str = "fp32",
                sweeps: int = CLIP_SWEEPS, fmt=INT4) -> tuple[np.ndarray, dict]:
    """Per (block, output channel) clip ratio of the block scale of `fmt` (INT4, NVFP4). First each block alone minimizes its own
    output error d_b^T H_bb d_b; then coordinate descent over the blocks minimizes each column's whole
    output error d^T H d (the blocks of one column interact through H)."""
    k, n = w_kn.shape
    b = block_size or k
    nb = -(-k // b)
    # A format whose block scales round to a coarse type (NVFP4's FP8) may clip the block's max at ratio 1: it also
    # tries ratios above 1 (MiniLM NVFP4 weight-only 0.98539 -> 0.98636).
    ratios = np.asarray(tuple(fmt.awq_ratios_above) + CLIP_RATIOS, np.float32)
    rtn = len(fmt.awq_ratios_above)  # the index of ratio 1
    amax_all = float(np.abs(w_kn).max())  # NVFP4's tensor scale is the whole weight's
    cols = np.arange(n)
    choice = np.zeros((nb, n), np.int64)
    d = np.empty_like(w_kn)
    d_rtn = np.empty_like(w_kn)
    own = []
    for i in range(nb):
        sl = slice(i * b, min((i + 1) * b, k))
        c = fmt.block_candidates(w_kn, sl, ratios, hp, b, tensor_amax=amax_all) - w_kn[sl][None]  # [R, B, N]: weight error at each ratio
        err = _quad(h[sl, sl], c)                               # [R, N]: c^T H_bb c
        choice[i] = np.argmin(err, axis=0)
        d[sl] = np.take_along_axis(c, choice[i][None, None, :], axis=0)[0]
        d_rtn[sl] = c[rtn]
        own.append(err)
    if nb > 1 and sweeps:
        g = h @ d                                               # H d, kept current
        for _ in range(sweeps):
            moved = 0
            for i in range(nb):
                sl = slice(i * b, min((i + 1) * b, k))
                c, db = fmt.block_candidates(w_kn, sl, ratios, hp, b, tensor_amax=amax_all) - w_kn[sl][None], d[sl]  # recomputed: R copies of W are big
                hd = h[sl, sl] @ db                             # H_bb d_b
                # Error change when block i switches from d_b to c_r, all else fixed:
                # 2 (c_r - d_b).g_b + c_r^T H c_r - 2 c_r^T H d_b + d_b^T H d_b
                cur = np.einsum("bn,bn->n", db, hd)
                change = (2 * np.einsum("rbn,bn->rn", c, g[sl] - hd) - 2 * np.einsum("bn,bn->n", db, g[sl])
                          + own[i] + cur)
                best = np.argmin(change, axis=0)
                upd = change[best, cols] < -1e-12 * np.abs(cur).max(initial=1.0)
                if upd.any():
                    choice[i] = np.where(upd, best, choice[i])
                    new = np.take_along_axis(c, choice[i][None, None, :], axis=0)[0]
                    g += h[:, sl] @ (new - db)
                    d[sl] = new
                    moved += int(upd.sum())
            if not moved:
                break
    norm = max(float(np.sum((h @ w_kn) * w_kn, dtype=np.float64)), 1e-30)
    info = {"rtn": _rel_error(h, w_kn, w_kn + d_rtn, norm), "clip": _rel_error(h, w_kn, w_kn + d, norm),
            "mean_ratio": float(ratios[choice].mean())}
    return ratios[choice], info


def gptq_round(w_kn: np.ndarray, h: np.ndarray, scale: np.ndarray, block_size: int, damp: float = 0.01,
               lazy: int = 128, fmt=INT4) -> np.ndarray:
    """`fmt` codes (INT4, NVFP4) for W [K, N] with fixed block scales, rounded one input channel at a time with the
    error of each fed back into the channels not yet rounded (GPTQ, Frantar et al. 2023), so that the
    layer output error ||X (W - Q)||, not the weight error, is what the rounding minimizes."""
    return obs.feedback_round(fmt, w_kn, expand(scale, w_kn.shape[0], block_size), h, damp, lazy)


def _error_feedback(node, fmt, w, h, clips, block_size, hp, entry: dict) -> None:
    """Replace the clip ratios of `node` by (values, scales) rounded with error feedback, or keep them (plain
    rounding with the searched scales) when the Hessian is not positive definite even with more damping."""
    scale = fmt.block_scales(w, block_size, clips[node.name], hp)
    try:
        q = gptq_round(w, h, scale, block_size, fmt=fmt)
    except obs.SingularHessian as e:
        log.warning("awq: %s: %s; keeping the searched scales without error feedback", node.name, e)
        entry["gptq"] = f"skipped: {e}"
        return
    deq = fmt.dequantize(q, scale, 1, block_size=block_size)
    nrm = max(_rel_error(h, w, np.zeros_like(w), 1.0), 1e-30)
    entry["gptq_error"] = _rel_error(h, w, deq, nrm)
    clips[node.name] = (q, scale)


def apply(graph: gs.Graph, data: calib.CalibData, layers: list[tuple[gs.Node, int]], *, method: str = "full",
          block_size: int = 128, high_precision: str = FP16.name, provider: str = "cpu", memory_budget_mb: int = MEMORY_BUDGET_MB,
          progress: bool = True, feedback: bool | None = None, prescale: dict | None = None,
          feedback_rows_per_k: int = 1) -> tuple[dict, dict[str, np.ndarray]]:
    """AWQ on `layers` ((node, format) pairs) of `graph`: scales folded in place, clip ratios returned
    (node name -> [blocks, N]) for the INT4 writer. `full` also rounds each INT4 weight with error feedback
    (`gptq_round`) and returns (q, scale) pairs instead of clip ratios; `feedback` (default: only `full`) asks
    for it with `clip` too (--auto's NVFP4 candidate: no scales folded, the graph stays the FP32 one); `prescale`
    {layer: s [K]}: that layer will read x ⊘ s with weight s ⊙ W (applied by the caller), its clips are for s ⊙ W;
    error feedback runs only where the calibration rows number at least `feedback_rows_per_k` x K.
    Returns (report, clips)."""
    if method not in ("lite", "clip", "full"):
        raise OnnxoptError(f"unknown AWQ method '{method}'; use lite, clip or full")
    t0 = time.perf_counter()
    fmts = {id(n): f for n, f in layers}
    groups: dict[str, list[gs.Node]] = {}
    for n, _ in layers:
        groups.setdefault(n.inputs[0].name, []).append(n)
    stats = _Stats.collect(graph, data, groups, provider, memory_budget_mb, progress)
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    order = sorted(groups, key=lambda k: -min(position.get(id(n), 0) for n in groups[k]))
    report = {"method": method, "groups": [], "layers": {}, "statistics": "gram" if stats.use_gram else "sampled rows"}
    run = _Search(groups, order, fmts, stats, block_size, high_precision, progress, report, prescale=dict(prescale or {}),
                  feedback_rows_per_k=max(1, int(feedback_rows_per_k)))
    if method in ("lite", "full"):
        run.scales(graph, keep_grams=method == "full")
    if method in ("clip", "full"):
        run.clip(feedback=method == "full" if feedback is None else feedback)
    clips = run.clips
    report["time_s"] = round(time.perf_counter() - t0, 3)
    log.info("awq-%s: %d activations, %d layers, %.1f s", method, len(groups), len(layers), report["time_s"])
    return report, clips


class _Stats:
    """Per activation: channel mean |x| and the Gram matrix X^T X (over all rows, or over sampled rows)."""

    def __init__(self, by_name: dict, use_gram: bool):
        self.by_name, self.use_gram = by_name, use_gram

    @classmethod
    def collect(cls, graph, data, groups: dict, provider: str, memory_budget_mb: int, progress: bool) -> "_Stats":
        # Gram matrices over all data when they fit half the budget; else Gram matrices of sampled rows.
        widths = {name: fold.input_channels(nodes[0], fold.effective_shape(nodes[0])) for name, nodes in groups.items()}
        use_gram = sum(4 * c * c + 2**23 for c in widths.values()) <= memory_budget_mb * 2**20 // 2  # + row buffers
        n_batches = len(data)
        reducers: dict[str, list] = {}
        stats = {}
        for i, (name, nodes) in enumerate(groups.items()):
            axis = activation_channel_axis(nodes[0])
            if any(activation_channel_axis(n) != axis for n in nodes):
                raise OnnxoptError(f"layers reading '{name}' disagree on its channel axis")
            rows = ROWS if use_gram else int(np.clip(memory_budget_mb * 2**20 // 8 // max(sum(widths.values()), 1), 64, ROWS))
            stats[name] = (ChannelMeanAbs(axis), Gram(axis) if use_gram else RowSample(axis, rows, n_batches, seed=i))
            reducers[name] = list(stats[name])
        calib.collect_graph(graph, data, reducers, provider=provider, memory_budget_mb=memory_budget_mb, progress=progress,
                            desc="awq: calibrating")
        return cls(stats, use_gram)

    def mean(self, name: str):
        return self.by_name[name][0].value

    def gram(self, name: str):
        r = self.by_name[name][1]
        if self.use_gram:
            return r.value
        x = r.value
        return (x.T @ x) if len(x) else None

    def rows(self, name: str) -> int:
        return getattr(self.by_name[name][1], "total_rows", 0)


@dataclass
class _Search:
    """The searches after the calibration pass, over activations in `order` (downstream first)."""
    groups: dict                 # activation -> the layers reading it
    order: list
    formats: dict                # id(node) -> its weight Format (INT4, or INT8 for --int8-layers)
    stats: _Stats
    block_size: int
    hp: str
    progress: bool
    report: dict
    clips: dict = field(default_factory=dict)     # node name -> clip ratios, or (q, scale) after error feedback
    x_scale: dict = field(default_factory=dict)   # activation -> folded input-channel scale
    hs: dict = field(default_factory=dict)        # activation -> Gram matrix kept for the clip search
    prescale: dict = field(default_factory=dict)  # layer -> s: it reads x ⊘ s, weight s ⊙ W (applied by the caller)
    feedback_rows_per_k: int = 1                  # error feedback needs this many calibration rows per input channel

    def scales(self, graph: gs.Graph, keep_grams: bool) -> None:
        """lite: one input-channel scale per activation, folded into the graph; with `keep_grams` the Gram
        matrices stay for the clip search (else one at a time)."""
        # Downstream first: a fold into a producer rescales its output columns before its own search.
        for name in track(self.order, total=len(self.order), desc="awq: scale search", enabled=self.progress):
            nodes = self.groups[name]
            mean = self.stats.mean(name)
            h = self.hs[name] = self.stats.gram(name)
            if mean is None or h is None:
                continue
            ws = [(to_kn(n, fold.effective_weight(n)), self.formats[id(n)]) for n in nodes]
            alpha, s, errs = search_scale(h, mean, ws, self.block_size, self.hp)
            entry = {"activation": name, "layers": [n.name for n in nodes], "alpha": alpha, "error": errs}
            if alpha is not None:
                entry["fold"] = fold.fold_input_scale(graph, nodes, s)
                self.x_scale[name] = s
            else:
                entry["fold"] = "not scaled: scaling did not lower the output error"
            self.report["groups"].append(entry)
            for n in nodes:
                self.report["layers"][n.name] = {"alpha": alpha}
            if not keep_grams:
                self.hs.pop(name)

    def clip(self, feedback: bool) -> None:
        """clip: per-block clip ratios of each INT4 layer; with `feedback`, error-feedback rounding after."""
        todo = [(name, n) for name in self.order for n in self.groups[name] if self.formats[id(n)].awq]
        for j, (name, n) in enumerate(track(todo, total=len(todo), desc="awq: clip search", enabled=self.progress)):
            h = self.hs[name] if name in self.hs else self.stats.gram(name)
            if h is None:
                continue
            if name in self.x_scale:  # the layer now reads X / s
                inv = (1.0 / self.x_scale[name]).astype(np.float32)
                h = h * inv[:, None] * inv[None, :]
            w = to_kn(n, fold.effective_weight(n))
            if n.name in self.prescale:
                s = np.asarray(self.prescale[n.name], np.float32)
                h, w = h * (1.0 / s)[:, None] * (1.0 / s)[None, :], (w * s[:, None]).astype(np.float32)
            fmt = self.formats[id(n)]
            self.clips[n.name], info = search_clip(h, w, self.block_size, self.hp, fmt=fmt)
            self.report["layers"].setdefault(n.name, {})["clip"] = info
            # Error feedback needs a well-determined H: with too few calibration rows per input channel it
            # fits the calibration set, not the layer, and round-to-nearest with the searched clips is kept.
            if feedback and self.stats.rows(name) >= self.feedback_rows_per_k * w.shape[0]:
                _error_feedback(n, fmt, w, h, self.clips, self.block_size, self.hp, self.report["layers"][n.name])
            elif feedback:
                self.report["layers"][n.name]["gptq"] = (f"skipped: {self.stats.rows(name)} calibration rows < "
                                                         f"{self.feedback_rows_per_k} x K = {self.feedback_rows_per_k * w.shape[0]}")
            if j + 1 == len(todo) or todo[j + 1][0] != name:
                self.hs.pop(name, None)


# The pass: awq's options as a recipe step (onnxopt.pass_protocol.Pass).
METHODS = ("lite", "clip", "full")


@dataclass
class AWQ(PassBase):
    method: str = "full"   # lite: scale search; clip: clip search; full: both, then error-feedback rounding
    name = "awq"

    def __post_init__(self):
        check_choice(self.method, METHODS, "--awq")

    @property
    def needs_data(self) -> bool:
        return True

    def check_recipe(self, recipe, index: int) -> None:
        nxt = after(recipe, index, (WeightOnlyQuantizer, StaticQuantizer))
        if not nxt or not isinstance(nxt[0], WeightOnlyQuantizer):
            raise OnnxoptError("--awq applies to --int4 only (it searches INT4 scales); drop it or quantize with --int4")

    def run(self, ctx) -> dict:
        target = ctx.following(WeightOnlyQuantizer, self)
        layers, _ = target.select(ctx.graph)
        report, clips = apply(ctx.graph, ctx.require_data(f"--awq {self.method}"), layers, method=self.method,
                                  block_size=target.block_size, high_precision=ctx.high_precision,
                                  provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress)
        ctx.awq = AwqChoice(clips, self.method)
        return report
