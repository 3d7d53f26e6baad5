"""Calibration with ONNX Runtime: one engine for every technique that needs activation statistics.

- `data`: model input specs and `CalibData` (an .npz, a directory of .npz, an .npy, or generated inputs),
- `inputs`: the values integer inputs accept (embedding rows, masks), for generated data and checks,
- `text`: a text encoder's token inputs from a text file, one unpadded sample per line (`calib-data text`),
- `reducers`: streaming statistics (max |x|, per-channel max |x|, extremes and mean, histograms, top |x|, Gram/Hessian, row samples),
- `im2col`: a Conv input as rows of patches (the one im2col of the package),
- `methods`: clip ranges from a histogram (max, percentile, entropy, mse),
- `collect`: runs the model and feeds each named tensor to its reducers, in-graph reductions where possible,
- `stages`: models with more weights than the memory budget, run one stage at a time.
"""
from .collect import collect, collect_graph
from .data import CalibData, InputSpec, input_specs, parse_shapes
from .methods import METHODS, amax_from_histogram
from .im2col import ConvView, im2col
from .inputs import IntRange, integer_ranges
from .reducers import (AbsMax, ChannelAbsMax, ChannelExtreme, ChannelMean, ChannelMeanAbs, Gram, Hessian, Histogram, PatchSample,
                       PreReduce, Reducer, RowSample, TopAbs, top_k)
from .stages import MAX_STAGES, STAGE_MIN_BYTES, Stage, split_stages, stage_count, stage_index

__all__ = ["collect", "collect_graph", "CalibData", "InputSpec", "input_specs", "parse_shapes", "METHODS",
           "amax_from_histogram", "ConvView", "im2col", "IntRange", "integer_ranges", "AbsMax", "ChannelAbsMax", "ChannelExtreme", "ChannelMean",
           "ChannelMeanAbs", "Gram", "Hessian", "RowSample", "PatchSample", "Histogram", "PreReduce", "Reducer",
           "TopAbs", "top_k", "MAX_STAGES", "STAGE_MIN_BYTES", "Stage", "split_stages", "stage_count", "stage_index"]
