"""Calibration with ONNX Runtime: one engine for every technique that needs activation statistics.

- `data`: model input specs and `CalibData` (an .npz, a directory of .npz, an .npy, or generated inputs),
- `reducers`: streaming statistics (max |x|, per-channel max and mean, histograms, top |x|, Gram/Hessian),
- `methods`: clip ranges from a histogram (max, percentile, entropy, mse),
- `collect`: runs the model and feeds each named tensor to its reducers, in-graph reductions where possible,
- `stages`: models with more weights than the memory budget, run one stage at a time.
"""
from .collect import collect, collect_graph
from .data import CalibData, InputSpec, input_specs, parse_shapes
from .methods import FP8_MAX, METHODS, amax_from_histogram
from .reducers import AbsMax, ChannelAbsMax, ChannelMean, Histogram, PreReduce, Reducer, TopAbs, top_k
from .stages import MAX_STAGES, STAGE_MIN_BYTES, Stage, split_stages, stage_count, stage_index

__all__ = ["collect", "collect_graph", "CalibData", "InputSpec", "input_specs", "parse_shapes", "FP8_MAX", "METHODS",
           "amax_from_histogram", "AbsMax", "ChannelAbsMax", "ChannelMean", "Histogram", "PreReduce", "Reducer",
           "TopAbs", "top_k", "MAX_STAGES", "STAGE_MIN_BYTES", "Stage", "split_stages", "stage_count", "stage_index"]
