"""The one calibration plan of the quantizers: which statistics one pass over the data collects for a set of
placements (activation ranges per format by its calibration method, input means for bias correction), and
the ranges and means they give. The uniform QDQ pass plans one format; `--auto` plans every candidate."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import calib, threads
from . import bias_correction, rules


def range_reducer(method: str, provider: str, percentile: float = 99.99):
    """The streaming statistic a clip-range method needs."""
    if method == "max":
        return calib.AbsMax()
    if method == "percentile":  # exact, from the top values each batch keeps in the graph
        return calib.TopAbs.for_provider(percentile, provider)
    return calib.Histogram.for_provider(provider)


@dataclass
class CalibrationPlan:
    """Reducers for each format's planned activations and for bias-correction means."""
    placements: dict                    # format -> rules.Plan
    methods: dict                       # format -> clip-range method
    ranges: dict = field(default_factory=dict)   # format -> {tensor: reducer}
    means: dict = field(default_factory=dict)    # tensor -> calib.ChannelMean
    percentile: float = 99.99

    def reducers(self) -> dict[str, list]:
        """{tensor: [reducer]}: ranges first, then means (what collect_graph takes)."""
        out: dict[str, list] = {}
        for rs in self.ranges.values():
            for n, r in rs.items():
                out.setdefault(n, []).append(r)
        for n, r in self.means.items():
            out.setdefault(n, []).append(r)
        return out

    def amax(self) -> dict:
        """{format: {tensor: clip range}} once the data has run; Concat groups share their largest range where
        rules.share_concat_scales allows."""
        def one(item):
            f, r = item
            return calib.amax_from_histogram(r, self.methods[f], f, self.percentile) if isinstance(r, calib.Histogram) else r.value
        # the histogram searches (~300 of a few ms on the tiny UNet) on worker threads: numpy releases the GIL
        items = [(f, r) for f in self.placements for r in self.ranges[f].values()]
        values = iter(threads.ordered_map(one, items,
                                          threads=0 if any(isinstance(r, calib.Histogram) for _, r in items) else 1))
        out = {}
        for f, place in self.placements.items():
            a = dict(place.fixed_amax)
            for name in self.ranges[f]:
                a[name] = next(values)
            rules.share_concat_scales(place, a)
            out[f] = a
        return out

    def mean_values(self) -> dict:
        """{tensor: channel mean} of the layers' inputs (bias correction)."""
        return {n: r.value for n, r in self.means.items() if r.value is not None}


def plan(placements: dict, methods: dict, *, provider: str, percentile: float = 99.99,
         bias_correction_means: bool = True) -> CalibrationPlan:
    """The statistics `placements` ({format: rules.Plan}) need, each format's ranges by `methods[format]`."""
    p = CalibrationPlan(placements, methods, percentile=percentile)
    for f, place in placements.items():
        p.ranges[f] = {n: range_reducer(methods[f], provider, percentile) for n in place.activations
                       if n not in place.fixed_amax}
    if bias_correction_means:
        for place in placements.values():
            for node, _, _, _ in place.weights:
                if node.op in bias_correction.OPS and node.inputs[0].name not in p.means:
                    p.means[node.inputs[0].name] = calib.ChannelMean(bias_correction.input_axis(node),
                                                                     bias_correction.input_rank(node))
    return p
