import tempfile
from pathlib import Path

import numpy as np
import pytest

import tiny
from onnxopt import calib, modelfile, scratch
from onnxopt.errors import OnnxoptError


@pytest.fixture
def cnn(tmp_path):
    return modelfile.load(tiny.save(tiny.cnn(), tmp_path / "m.onnx"))


def test_npz_directory_and_npy_sources(tmp_path, cnn):
    specs = calib.input_specs(cnn)
    x = np.random.default_rng(0).standard_normal((5, 1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x[:3])
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "0.npz", x=x[:3])
    np.savez(tmp_path / "d" / "1.npz", x=x[3:])
    np.save(tmp_path / "x.npy", x)
    assert len(calib.CalibData.from_path(tmp_path / "a.npz", specs)) == 3
    feeds = list(calib.CalibData.from_path(tmp_path / "d", specs))
    assert len(feeds) == 5 and feeds[4]["x"].shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(feeds[4]["x"], x[4])
    assert len(calib.CalibData.from_path(tmp_path / "x.npy", specs, limit=2)) == 2
    # Without a sample axis, the first axis is the batch, chunked by batch_size.
    np.savez(tmp_path / "b.npz", x=x[:, 0])
    assert [f["x"].shape[0] for f in calib.CalibData.from_path(tmp_path / "b.npz", specs, batch_size=2)] == [2, 2, 1]


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((2, 1, 3, 16, 16), np.float32)}, "no array for model input"),
    ({"x": np.zeros((2, 1, 3, 16, 16), np.int64)}, "dtype int64"),
    ({"x": np.zeros((2, 1, 3, 8, 16), np.float32)}, "dimension 2 differs"),
    ({"x": np.zeros((2, 3), np.float32)}, "the model expects"),
])
def test_bad_calibration_data_says_what_is_wrong(tmp_path, cnn, arrays, message):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(OnnxoptError, match=message):
        calib.CalibData.from_path(tmp_path / "c.npz", calib.input_specs(cnn))


def test_corrupt_npz(tmp_path, cnn):
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(OnnxoptError, match="cannot read calibration data"):
        calib.CalibData.from_path(tmp_path / "c.npz", calib.input_specs(cnn))


def test_random_data_needs_shapes_for_dynamic_dims(cnn):
    specs = calib.input_specs(cnn)
    with pytest.raises(OnnxoptError, match="--shapes x:"):
        calib.CalibData.random(specs, 2)
    data = calib.CalibData.random(specs, 3, shapes=calib.parse_shapes(["x:2x3x16x16"]))
    feeds = list(data)
    assert len(feeds) == 3 and feeds[0]["x"].shape == (2, 3, 16, 16)
    again = list(calib.CalibData.random(specs, 3, shapes={"x": (2, 3, 16, 16)}))
    np.testing.assert_array_equal(feeds[2]["x"], again[2]["x"])


def test_histogram_grows_its_range_and_keeps_counts():
    rng = np.random.default_rng(0)
    h = calib.Histogram(bins=1024)
    chunks = [rng.standard_normal(5000) * s for s in (0.1, 1.0, 7.0)]
    for c in chunks:
        h.update(c)
    allv = np.abs(np.concatenate(chunks))
    assert h.counts.sum() == allv.size
    assert h.amax == pytest.approx(allv.max())
    assert h.range >= allv.max()
    # Percentile from the histogram is within one bin of numpy's.
    p = calib.amax_from_histogram(h, "percentile", percentile=99.0)
    assert abs(p - np.percentile(allv, 99.0)) <= 2 * h.range / h.bins


@pytest.mark.parametrize("qtype", ["int8", "fp8"])
def test_mse_and_entropy_clip_outliers_but_max_does_not(qtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [80.0]])
    h = calib.Histogram()
    h.update(x)
    assert calib.amax_from_histogram(h, "max", qtype) == pytest.approx(80.0)
    mse = calib.amax_from_histogram(h, "mse", qtype)
    assert mse <= 80.0
    if qtype == "int8":
        assert mse < 60.0  # one outlier's clipping error still weighs against 200k rounding errors
        assert calib.amax_from_histogram(h, "entropy", qtype) < 20.0


def test_collect_in_several_passes_matches_one_pass(tmp_path, cnn):
    data = calib.CalibData.random(calib.input_specs(cnn), 3, shapes={"x": (2, 3, 16, 16)})
    names = ["c1", "r1", "c2", "a", "cat", "r3", "logits"]
    one = {n: [calib.Histogram()] for n in names}
    many = {n: [calib.Histogram()] for n in names}
    calib.collect(cnn, data, one, progress=False)
    calib.collect(cnn, data, many, progress=False, memory_budget_mb=0)  # one whole tensor per pass
    for n in names:
        assert one[n][0].amax > 0
        assert one[n][0].amax == pytest.approx(many[n][0].amax)
        np.testing.assert_array_equal(one[n][0].counts, many[n][0].counts)


class _Fetched(calib.Reducer):
    """Keeps whole tensors (test reference for the in-graph reductions)."""

    def __init__(self):
        self.batches = []

    def update(self, x):
        self.batches.append(np.array(x))


def test_in_graph_reductions_match_whole_tensors(cnn):
    data = calib.CalibData.random(calib.input_specs(cnn), 3, shapes={"x": (2, 3, 16, 16)})
    names = ["c1", "cat", "logits"]
    red = {n: [calib.AbsMax(), calib.ChannelAbsMax(1), calib.ChannelMean(1), _Fetched()] for n in names}
    calib.collect(cnn, data, red, progress=False)
    for n in names:
        amax, chmax, mean, fetched = red[n]
        allv = np.concatenate(fetched.batches)
        assert amax.value == pytest.approx(float(np.abs(allv).max()), rel=1e-6)
        axes = tuple(i for i in range(allv.ndim) if i != 1)
        np.testing.assert_allclose(chmax.value, np.abs(allv).max(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(mean.value, allv.mean(axis=axes), rtol=1e-5, atol=1e-6)


def test_channel_absmax_axis():
    r = calib.ChannelAbsMax(axis=1)
    x = np.zeros((2, 3, 4, 4), np.float32)
    x[:, 1] = -5.0
    r.update(x)
    np.testing.assert_array_equal(r.value, [0.0, 5.0, 0.0])


def test_max_batch_splits_dynamic_batch_and_keeps_broadcast_inputs():
    specs = [calib.InputSpec("x", ("N", 4), np.dtype(np.float32)), calib.InputSpec("t", (1,), np.dtype(np.float32))]
    x = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)  # 3 samples of batch 2 (a CFG pair)
    t = np.ones((3, 1), np.float32)
    data = calib.CalibData(specs, [lambda: {"x": x, "t": t}], max_batch=1)
    feeds = list(data)
    assert len(feeds) == 6 and all(f["x"].shape == (1, 4) and f["t"].shape == (1,) for f in feeds)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x.reshape(6, 4))


def test_entropy_ignores_the_zero_spike_of_relu_outputs():
    # 75% exact zeros (a ReLU6 output): KL must still keep most of the 0..6 range.
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros(300_000), rng.uniform(0, 6, 100_000)])
    h = calib.Histogram()
    h.update(x)
    assert calib.amax_from_histogram(h, "entropy", "int8") > 4.0


def assert_same_statistics(one: dict, other: dict, names) -> None:
    """Every reducer of `names` in `other` holds the same statistic as in `one`, bit for bit."""
    for n in names:
        for a, b in zip(one[n], other[n]):
            if isinstance(a, calib.Histogram):
                np.testing.assert_array_equal(a.counts, b.counts)
            elif isinstance(a, calib.TopAbs):
                assert a.value == b.value and a.count == b.count
            else:
                np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))


def _stats(model, data, names, **kwargs):
    red = {n: [calib.AbsMax(), calib.ChannelMean(-1, 3) if n.startswith("ln") else calib.AbsMax(), calib.Histogram(),
               calib.TopAbs(99.0), calib.Histogram(in_graph=True), calib.TopAbs(99.0, device_sort=True)]
           for n in names}
    calib.collect(model, data, red, progress=False, **kwargs)
    return red


@pytest.mark.parametrize("stages", [2, 3, 5])
def test_staged_calibration_matches_one_stage(tmp_path, stages):
    """Big models run in stages (weights of one stage at a time, boundary tensors on disk); the
    statistics must not change."""
    m = modelfile.load(tiny.save(tiny.transformer(), tmp_path / "t.onnx"))
    data = calib.CalibData.from_path(_token_npz(tmp_path, m), calib.input_specs(m))
    names = [o for n in m.graph.node if n.op_type in ("MatMul", "Softmax", "LayerNormalization", "Add") for o in n.output]
    one = _stats(m, data, names, stages=1)
    before = set(Path(tempfile.gettempdir()).glob("onnxopt-stages-*"))
    many = _stats(m, data, names, stages=stages, memory_budget_mb=0)
    scratch.wait()  # the boundary folder is removed on a background thread
    assert set(Path(tempfile.gettempdir()).glob("onnxopt-stages-*")) <= before
    plan = calib.split_stages(m, stages)
    assert len(plan) == stages and sum(len(s.nodes) for s in plan) == len(m.graph.node)
    assert any(s.outputs for s in plan[:-1])
    assert_same_statistics(one, many, names)
    for n in names:
        # the CUDA forms (in-graph bins, device-sorted TopK) give the host's numbers, staged or not
        np.testing.assert_array_equal(many[n][4].counts, one[n][2].counts)
        assert many[n][5].value == one[n][3].value


def _token_npz(tmp_path, m):
    rng = np.random.default_rng(0)
    arrays = {}
    for s in calib.input_specs(m):
        shape = tuple(d if isinstance(d, int) and d > 0 else 2 for d in s.shape)
        arrays[s.name] = (rng.integers(0, 50, (3,) + shape) if s.dtype.kind == "i" else rng.standard_normal((3,) + shape)).astype(s.dtype)
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz"


def test_stage_count_follows_the_weight_budget(cnn):
    assert calib.stage_count(cnn, 2**30) == 1
    weights = sum(modelfile.tensor_bytes(t) for t in cnn.graph.initializer)
    assert calib.stage_count(cnn, 0) == 1  # budgets below 64 MB are raised to it
    big = calib.STAGE_MIN_BYTES
    assert calib.stage_count(cnn, big) == 1 and weights < big


def test_stage_cut_avoids_big_activations(cnn):
    # Near the weight midpoint (after conv2) the cut may cross {r1, c2}, {r1, a} or {cat}: it takes the
    # fewest bytes.
    sizes = {o: 100 for n in cnn.graph.node for o in n.output}
    assert calib.split_stages(cnn, 2, sizes)[0].outputs == ["cat"]
    sizes["cat"] = 10**9
    assert calib.split_stages(cnn, 2, sizes)[0].outputs in (["c2", "r1"], ["a", "r1"])


@pytest.mark.parametrize("pct", [99.99, 99.0, 50.0])
def test_top_abs_gives_the_exact_percentile_in_one_pass(cnn, pct):
    data = calib.CalibData.random(calib.input_specs(cnn), 4, shapes={"x": (2, 3, 16, 16)}, seed=3)
    names = ["c1", "cat", "logits"]
    red = {n: [calib.TopAbs(pct), _Fetched()] for n in names}
    red["x"] = [calib.TopAbs(pct), _Fetched()]  # graph inputs take the whole-tensor path
    calib.collect(cnn, data, red, progress=False)
    for n, (top, fetched) in red.items():
        allv = np.abs(np.concatenate([b.ravel() for b in fetched.batches]))
        assert top.count == allv.size
        assert top.value == np.percentile(allv, pct, method="inverted_cdf"), n
        assert top.top.size <= calib.top_k(allv.size // 4, 1 - pct / 100, 4)  # a few values, not the tensor


def _mul_model(n):
    """y = 1 * x over a flat [n] input: a tensor of the graph (not an input) for the in-graph reductions."""
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Mul", ["x", "one"], ["y"])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
                          [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _heavy_tail(rng, batches, n):
    x = rng.standard_normal((batches, n)).astype(np.float32)
    hit = rng.random((batches, n)) < 3e-4  # rare outliers at 20..60 sigma: they decide the MSE clip
    x[hit] *= rng.uniform(20, 60, hit.sum()).astype(np.float32)
    return x


def _in_graph_and_whole(tmp_path, x, bins=4096):
    """Histograms of y = 1 * x (one batch per row of x) in one pass: one binned in the graph, one fed whole
    tensors, the same definition."""
    np.savez(tmp_path / "d.npz", x=x)
    m = _mul_model(x.shape[-1])
    data = calib.CalibData.from_path(tmp_path / "d.npz", calib.input_specs(m))
    red = {"y": [calib.Histogram(bins, in_graph=True), calib.Histogram(bins), _Fetched()]}
    calib.collect(m, data, red, progress=False)
    return red["y"]


def _reference(batches, bins):
    """The histogram definition in plain numpy: first range max * (1 + 1e-6), doubled (bin pairs merged) as
    often as a batch needs, bin = min(floor(f32(v) * f32(bins / range)), bins - 1)."""
    counts, rng = np.zeros(bins), 0.0
    for b in batches:
        a = np.abs(b.astype(np.float32)).ravel()
        m = float(a.max())
        if rng == 0.0:
            if m == 0.0:
                counts[0] += a.size
                continue
            rng = m * (1 + 1e-6)
        while m >= rng:
            counts = np.concatenate([counts.reshape(-1, 2).sum(axis=1), np.zeros(bins // 2)])
            rng *= 2.0
        idx = np.minimum((a * np.float32(bins / rng)).astype(np.int64), bins - 1)
        counts += np.bincount(idx, minlength=bins)
    return counts, rng


@pytest.mark.parametrize("case", ["growing", "zeros_first", "exact_powers", "shrinking"])
def test_in_graph_histogram_equals_the_numpy_reference(tmp_path, case):
    """Random data with outliers; ranges that grow by 1..5 doublings, a first batch of zeros, maxima landing
    exactly on doubled edges: the in-graph counts equal numpy's bit for bit."""
    rng = np.random.default_rng(7)
    n = 20_000
    x = _heavy_tail(rng, 5, n)
    if case == "growing":
        x *= np.array([0.01, 0.5, 0.7, 13.0, 900.0], np.float32)[:, None]
    elif case == "zeros_first":
        x[0] = 0.0
        x[2] *= 1e-3
    elif case == "exact_powers":
        m0 = float(np.abs(x[0]).max())
        for i, k in enumerate([1, 2, 3, 8], start=1):
            x[i, 0] = np.float32(m0 * (1 + 1e-6) * 2.0 ** k)  # exactly on a doubled edge (as float32 allows)
    else:
        x *= np.array([100.0, 1.0, 0.01, 50.0, 1e-5], np.float32)[:, None]
    graph, host, fetched = _in_graph_and_whole(tmp_path, x, bins=2048)
    counts, r = _reference(fetched.batches, 2048)
    np.testing.assert_array_equal(host.counts, counts)
    np.testing.assert_array_equal(graph.counts, counts)
    assert graph.range == host.range == r and graph.amax == host.amax == float(np.abs(x).max())
    assert graph.counts.sum() == x.size
    for method in ("mse", "entropy", "percentile"):
        assert calib.amax_from_histogram(graph, method) == calib.amax_from_histogram(host, method)


@pytest.mark.parametrize("scales, runs", [((1.0, 1.0, 1.0), 4), ((1.0, 3.0, 11.0), 4), ((1.0, 40.0, 0.5), 5)])
def test_in_graph_histogram_fetches_bins_and_reruns_only_big_growth(tmp_path, scales, runs):
    """Only the grid's counts and the max come back. The first batch runs twice (its max sets the range), a
    range growing up to 2^HIST_GROWTH = 4x merges on the grid, 40x runs the batch again; counts as numpy's."""
    n = 300_000
    x = np.clip(_heavy_tail(np.random.default_rng(0), len(scales), n), -50, 50)
    x[:, 7] = 50.0  # every batch's max is 50 * its scale: growths of 3x and 11x/3 (2 doublings), 40x (6)
    x *= np.array(scales, np.float32)[:, None]
    np.savez(tmp_path / "d.npz", x=x)
    m = _mul_model(n)
    data = calib.CalibData.from_path(tmp_path / "d.npz", calib.input_specs(m))
    h = calib.Histogram(1024, in_graph=True)
    got = []
    reduced = h.reduced
    h.reduced = lambda *outs: (got.append([np.size(o) for o in outs]), reduced(*outs))[1]  # noqa: E731
    calib.collect(m, data, {"y": [h]}, progress=False)
    assert got == [[4 * 1024 + 1, 1]] * runs
    np.testing.assert_array_equal(h.counts, _reference(list(x), 1024)[0])


def test_in_graph_histogram_names_non_finite_tensors(tmp_path):
    x = _heavy_tail(np.random.default_rng(0), 2, 1000)
    x[1, 5] = 3e38  # finite input, y = 10 * x overflows
    np.savez(tmp_path / "d.npz", x=x)
    m = _mul_model(1000)
    m.graph.initializer[0].float_data[0] = 10.0
    data = calib.CalibData.from_path(tmp_path / "d.npz", calib.input_specs(m))
    with pytest.raises(OnnxoptError, match="'y' holds inf or NaN on calibration batch 1"):
        calib.collect(m, data, {"y": [calib.Histogram(in_graph=True)]}, progress=False)


def test_in_graph_histogram_needs_opset_16_else_whole_tensors(tmp_path):
    x = _heavy_tail(np.random.default_rng(0), 2, 1000)
    np.savez(tmp_path / "d.npz", x=x)
    m = _mul_model(1000)
    m.opset_import[0].version = 13
    data = calib.CalibData.from_path(tmp_path / "d.npz", calib.input_specs(m))
    red = {"y": [calib.Histogram(in_graph=True), calib.Histogram()]}
    calib.collect(m, data, red, progress=False)
    np.testing.assert_array_equal(red["y"][0].counts, red["y"][1].counts)


def test_grown_range_is_the_smallest_power_of_two_above():
    from onnxopt.calib.reducers import grown_range
    for r, m in [(1.0, 0.5), (1.0, 1.0), (1.0, 3.9), (1.0, 4.0), (3.0, 3e38), (1e-30, 1e30), (0.1, 0.1 * 2 ** 7)]:
        g = grown_range(r, m)
        d = round(np.log2(g / r))
        assert g == r * 2.0 ** d and m < g and (d == 0 or m >= g / 2 or d == 1)


def test_reducers_in_the_graph_on_cuda_only():
    """Whole tensors and unsorted TopK on the CPU (faster there); in-graph bins and device-wide sorted TopK on CUDA."""
    assert calib.Histogram.for_provider("cpu").pre_reduce is None
    assert calib.Histogram.for_provider("cuda").pre_reduce.op == "Histogram"
    assert not calib.TopAbs.for_provider(99.99, "cpu").pre_reduce.sorted
    assert calib.TopAbs.for_provider(99.99, "cuda").pre_reduce.sorted


@pytest.mark.parametrize("pct", [99.99, 50.0])
def test_device_sorted_top_abs_gives_the_same_percentile(cnn, pct):
    """The CUDA form (sorted, at least DEVICE_SORT_K values) run here on the CPU: the same exact percentile."""
    data = calib.CalibData.random(calib.input_specs(cnn), 3, shapes={"x": (2, 3, 16, 16)}, seed=5)
    names = ["c1", "cat", "logits"]
    red = {n: [calib.TopAbs(pct), calib.TopAbs(pct, device_sort=True), _Fetched()] for n in names}
    calib.collect(cnn, data, red, progress=False)
    for n, (plain, dev, fetched) in red.items():
        allv = np.abs(np.concatenate([b.ravel() for b in fetched.batches]))
        assert plain.value == dev.value == np.percentile(allv, pct, method="inverted_cdf"), n


@pytest.mark.parametrize("method", ["mse", "entropy", "percentile"])
def test_cuda_reducers_give_the_cpu_ranges(tmp_path, method):
    """The reducers quant.calibration picks for CUDA (in-graph bins, device-sorted TopK), run here on the CPU
    provider, give the same clip ranges as the CPU's: the same graphs whichever provider calibrates."""
    from onnxopt.quant import calibration
    m = modelfile.load(tiny.save(tiny.transformer(), tmp_path / "t.onnx"))
    data = calib.CalibData.from_path(_token_npz(tmp_path, m), calib.input_specs(m))
    names = [o for n in m.graph.node if n.op_type in ("MatMul", "Softmax", "Add") for o in n.output]
    red = {n: [calibration.range_reducer(method, "cpu"), calibration.range_reducer(method, "cuda")] for n in names}
    assert all(r.pre_reduce is not None for _, r in red.values())
    calib.collect(m, data, red, progress=False)

    def amax(r):
        return calib.amax_from_histogram(r, method) if isinstance(r, calib.Histogram) else r.value
    for n, (cpu, cuda) in red.items():
        assert amax(cpu) == amax(cuda) and amax(cpu) > 0, n


def test_in_graph_histogram_of_an_fp16_tensor(tmp_path):
    """FP16 activations are binned as float32, as the host does."""
    from onnx import TensorProto
    x = _heavy_tail(np.random.default_rng(2), 3, 4000).astype(np.float16)
    np.savez(tmp_path / "d.npz", x=x)
    m = _mul_model(4000)
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    one = m.graph.initializer[0]
    one.data_type = TensorProto.FLOAT16
    del one.float_data[:]
    one.int32_data.append(int(np.array(1.0, np.float16).view(np.uint16)))
    data = calib.CalibData.from_path(tmp_path / "d.npz", calib.input_specs(m))
    red = {"y": [calib.Histogram(in_graph=True), calib.Histogram()]}
    calib.collect(m, data, red, progress=False)
    np.testing.assert_array_equal(red["y"][0].counts, red["y"][1].counts)
    assert red["y"][0].range == red["y"][1].range > 0


def test_one_hessian_for_all_rows_sampled_rows_and_awq_gram():
    """calib.Hessian is the one XᵀX: all rows of any channel axis, Conv im2col patches, sampled rows (error-feedback
    rounding), and AWQ's float32 Gram; each equals numpy's product of the same rows, batch by batch."""
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, 6, 5, 5)).astype(np.float32) for _ in range(3)]
    rows = np.concatenate([np.moveaxis(b, 1, -1).reshape(-1, 6) for b in batches]).astype(np.float64)
    h, g = calib.Hessian(axis=1), calib.Gram(axis=1)
    for b in batches:
        h.update(b)
        g.update(b)
    np.testing.assert_allclose(h.value, rows.T @ rows, rtol=1e-5)
    assert h.value.dtype == np.float64 and h.rows == len(rows) and h.dim == 6
    assert g.value.dtype == np.float32 and g.total_rows == len(rows)
    np.testing.assert_allclose(g.value, rows.T @ rows, rtol=1e-4)
    assert calib.Gram().value is None   # no rows yet, no size

    # sampled rows: XᵀX of the rows the same seeded sampler draws (float32 products, summed in float64); rows not kept
    x2 = [rng.normal(size=(40, 8)).astype(np.float32) for _ in range(2)]
    ref, hs = calib.RowSample(-1, 30, 2), calib.Hessian(8, sample=calib.RowSample(-1, 30, 2))
    for b in x2:
        ref.update(b)
        hs.update(b)
    r = ref.value.astype(np.float64)
    np.testing.assert_allclose(hs.value, r.T @ r, rtol=1e-5, atol=1e-5)
    assert hs.value.dtype == np.float64 and hs.n == len(r) == 30 and not hs.sample.parts

    # a Conv input: im2col patches, (kernel position, channel) order
    view = calib.ConvView((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "NOTSET")
    hc = calib.Hessian(6 * 9, view)
    hc.update(batches[0])
    xp = np.pad(batches[0], [(0, 0), (0, 0), (1, 1), (1, 1)]).astype(np.float64)
    patches = np.stack([xp[:, :, i:i + 3, j:j + 3].transpose(0, 2, 3, 1).reshape(2, -1) for i in range(5) for j in range(5)], 1).reshape(-1, 54)
    ref = patches.T @ patches   # float32 products: cancellation error relative to the largest entry
    np.testing.assert_allclose(hc.value, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
