"""SmoothQuant INT8 as a candidate format of the search ("int8-sq").

Per activation read by INT8-planned weight layers, one smoothing vector s along the input channels, alpha
searched per activation as `onnxopt.rewrite.smoothquant` does (simulated INT8 error of the layers' outputs on row
samples), from the same single calibration pass as every other candidate. A layer in int8-sq computes
QDQ(x ⊘ s) · QDQ(s ⊙ W): the gated graph writes it as s ⊙ QDQ(x ⊘ s) on the activation and QDQ(s ⊙ W) ⊘ s
on the weight (its other inputs untouched), the final graph (`quant.writer`) divides x by s (folded into a
norm producer when every reader of x is int8-sq, else a Mul in front of the layers) and multiplies W by s.
The INT8 range of x ⊘ s is a share of its max (the one pass sees x, not x ⊘ s), chosen after alpha by
the same simulated output error on the row samples (outliers that smoothing leaves are clipped as INT8's MSE
calibration would).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .. import calib, formats
from ..rewrite import fold, smoothquant
from ..quant import writer

SQ = formats.INT8_SQ.name       # the candidate's name
BASE = formats.INT8_SQ.base     # the format it quantizes to once smoothed (its plan and ranges are that format's)
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)   # INT8 range of x ⊘ s as a share of its max


@dataclass
class Smoothing:
    s: np.ndarray           # one factor per input channel of the activation
    amax: float             # max |x ⊘ s|: the INT8 range of the smoothed activation
    alpha: float | None     # None: smoothing did not lower the simulated error (s = 1)
    layers: list            # names of the layers reading the activation
    clip: float = 1.0       # share of max |x ⊘ s| kept as the INT8 range (searched like alpha)


def groups(graph: gs.Graph, plan, names: set) -> list:
    """smoothquant groups (layers sharing one activation) of the INT8 plan, restricted to `names`."""
    out = []
    for g in smoothquant.find_groups(graph, plan):
        g.layers = [n for n in g.layers if n.name in names]
        if g.layers:
            out.append(g)
    return out


def add_reducers(gs_: list, reducers: dict, batches: int, rows: int = smoothquant.SEARCH_ROWS) -> None:
    """Per-channel max and row (patch) samples of each group's activation, riding on the one calibration pass."""
    for i, g in enumerate(gs_):
        conv = next((n for n in g.layers if n.op in ("Conv", "ConvTranspose")), None)
        rank = len(fold.effective_shape(conv)) if conv is not None else None
        g.absmax = calib.ChannelAbsMax(g.axis, rank)
        reducers.setdefault(g.activation, []).append(g.absmax)
        shared = None
        for n in g.layers:
            if n.op == "Conv":
                smp = calib.PatchSample(n, tuple(fold.effective_shape(n)[2:]), rows, batches, seed=i)
            elif shared is None:
                smp = shared = calib.RowSample(g.axis, rows, batches, seed=i)
            else:
                g.samplers.append(shared)
                continue
            g.samplers.append(smp)
            reducers[g.activation].append(smp)


def finish(gs_: list) -> dict:
    """{activation: Smoothing} from the collected statistics (alpha searched per activation). Activations whose
    layers read one weight constant (ALBERT: one layer's weights at every depth; `smoothquant.tied`) take one s,
    from the maxima of every use with the error summed over them, as the uniform SmoothQuant does: the writer
    then scales the shared weight once, so it stays one tensor (a scale per use stored a copy per use: the ALBERT
    stand-in's --auto file 38.5 MB instead of ~28)."""
    out = {}
    for unit in smoothquant.tied([g for g in gs_ if g.absmax.value is not None]):
        act_max = np.max([g.absmax.value for g in unit], axis=0)
        w_max = np.max([fold.input_channel_absmax(n) for g in unit for n in g.layers], axis=0)
        uses = [([smoothquant.sim_layer(n, smp.value) for n, smp in zip(g.layers, g.samplers)], g.absmax.value)
                for g in unit]
        if len(unit) > 1 and any(fold.is_attention_output(g.layers[0].inputs[0]) for g in unit):
            # as the uniform pass: 1/s would need a Mul on every attention output (splitting fused attention)
            alpha, s = None, np.ones_like(act_max)
        else:
            alpha, s, _ = smoothquant.search_alpha(uses[0][0], act_max, w_max, uses)
        s = np.asarray(s, np.float64)
        for g, (layers, am) in zip(unit, uses):
            clip = min(CLIPS, key=lambda c: smoothquant.simulated_error(layers, am * c, s))
            g.samplers.clear()
            out[g.activation] = Smoothing(s, clip * float(np.max(am / s)), alpha, [n.name for n in g.layers], clip)
    return out


def channel_factor(node: gs.Node, shape, s: np.ndarray) -> np.ndarray:
    """s laid out along the input channels of the layer's effective weight (float64, as fold scales it)."""
    return np.asarray(fold.input_factor(node, shape, np.asarray(s, np.float64)), np.float64)


def activation_factor(s: np.ndarray, axis: int, rank: int | None) -> np.ndarray:
    """s laid out along the channel axis of an activation of `rank` dimensions."""
    return fold.activation_shape(np.asarray(s, np.float64), axis, rank).astype(np.float32)


def fake_weight(node: gs.Node, w: np.ndarray, sm: Smoothing, hp: str) -> np.ndarray:
    """QDQ(s ⊙ W) ⊘ s, per-output-channel INT8 as the final graph quantizes s ⊙ W."""
    f = channel_factor(node, w.shape, sm.s)
    ws = (w.astype(np.float64) * f).astype(np.float32)  # what fold.fold_input_scale writes
    return (writer.fake_weight(node, ws, BASE, hp, 0) / f).astype(np.float32)


def activation_scale(sm: Smoothing, hp: str) -> np.ndarray:
    """The scale of the smoothed activation's per-tensor Q/DQ."""
    return formats.get(BASE).activation_scale(sm.amax, hp)
