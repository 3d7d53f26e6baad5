"""Issue 25, third round: work done in parts or ahead gives the same numbers as the whole. The writer's cast and
bias-correction error in parts of rows (a job's memory), SmoothQuant's weight scaling in parts on threads, its
per-input-channel weight maxima read ahead on threads (recomputed where a fold changed the weight since), and the
staged evaluator's boundary tensors mapped per use."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxopt import formats
from onnxopt.rewrite import fold
from onnxopt.autoquant import stage_data
from onnxopt.formats.base import Format
from onnxopt.quant import bias_correction, qdq, writer


def _conv(w, group=1):
    x, y = gs.Variable("x", np.float32), gs.Variable("y", np.float32)
    return gs.Node("Conv", "conv", inputs=[x, gs.Constant("w", w)], outputs=[y], attrs={"group": group})


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_cast_in_parts_gives_the_same_codes(fmt):
    f = formats.get(fmt)
    rng = np.random.default_rng(0)
    for shape, axis in (((700, 9000), 0), ((9000, 700), 1), ((300, 320, 3, 3), 0)):  # 25 MB, 25 MB, 3.5 MB
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w[3] *= 40.0
        scale = f.scale_of(f.weight_amax(w, axis), "fp16")
        assert np.array_equal(qdq.cast_over(f, w, scale).view(np.uint8), f.cast(w / scale).view(np.uint8))


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("group", [1, 2])
def test_writer_job_in_parts_equals_the_whole_computation(fmt, group):
    """A Conv weight above qdq.CAST_PART_BYTES (codes, scales, bias-correction shift) against the formulas on
    the whole weight: bit for bit."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((1280, 1280 // group, 3, 3)) * 0.02).astype(np.float32)   # 59 MB / group
    assert w.nbytes > qdq.CAST_PART_BYTES
    mean = rng.standard_normal(1280)
    node = _conv(w, group)
    job = writer.WeightJob(node, node.inputs[1], None, 0, fmt, "fp16", mean)
    _, (q, scale, fp32_scale, shift) = writer.quantize_job(job)
    f = formats.get(fmt)
    ref_scale = f.scale_of(f.weight_amax(w, 0), "fp16")
    ref_q = f.cast(w / ref_scale)
    ref_shift = bias_correction.output_shift(node, Format.dequantize(f, ref_q, ref_scale) - w, mean)
    assert np.array_equal(q.view(np.uint8), ref_q.view(np.uint8)) and np.array_equal(scale, ref_scale)
    assert fp32_scale is None and np.array_equal(shift, ref_shift)


def test_job_memory_counts_parts():
    big = _conv(np.zeros((1280, 1280, 3, 3), np.float32))
    small = _conv(np.zeros((64, 64, 3, 3), np.float32))
    job = lambda n: writer.WeightJob(n, n.inputs[1], None, 0, "fp8", "fp16", None)  # noqa: E731
    assert writer.job_bytes(job(big)) == int(writer.JOB_FP32_COPIES_IN_PARTS * 1280 * 1280 * 9 * 4)
    assert writer.job_bytes(job(small)) == writer.JOB_FP32_COPIES * 64 * 64 * 9 * 4


def test_scaled_in_parts_equals_one_multiply():
    rng = np.random.default_rng(2)
    for shape, f_shape in (((2560, 1280, 3, 3), (1, 1280, 1, 1)), ((5000, 2048), (5000, 1)), ((8, 8), (1, 8))):
        v = rng.standard_normal(shape).astype(np.float32)
        f = rng.uniform(0.1, 10.0, f_shape)
        ref = np.empty_like(v)
        np.multiply(v, f, out=ref, dtype=np.float64, casting="unsafe")
        assert np.array_equal(fold.scaled(v, f, threads=3), ref)


def _mlp(rng, n=4, d=64):
    """n MatMuls in a chain, each weight read by one layer."""
    nodes, x = [], gs.Variable("x", np.float32, (2, d))
    for i in range(n):
        y = gs.Variable(f"h{i}", np.float32, (2, d))
        nodes.append(gs.Node("MatMul", f"mm{i}", inputs=[x, gs.Constant(f"w{i}", rng.standard_normal((d, d)).astype(np.float32))],
                             outputs=[y]))
        x = y
    return gs.Graph(nodes=nodes, inputs=[nodes[0].inputs[0]], outputs=[x], opset=17)


def test_absmax_ahead_follows_folds_made_meanwhile():
    """Maxima read ahead, then a fold (into its producer's weight) changes a later unit's weight before its turn:
    the value given is the changed weight's, as a direct call at that time gives."""
    rng = np.random.default_rng(3)
    g = _mlp(rng)
    layers = g.nodes
    units = [[layers[3]], [layers[2]], [layers[1]], [layers[0]]]   # downstream first, as SmoothQuant folds
    got = []
    for unit, maxes in zip(units, fold.input_channel_absmax_ahead(units, threads=3)):
        n = unit[0]
        assert len(maxes) == 1 and np.array_equal(maxes[0], fold.input_channel_absmax(n))
        got.append(maxes[0])
        s = rng.uniform(0.5, 2.0, maxes[0].shape)
        fold.fold_input_scale(g, [n], s)   # x / s folded into the producer MatMul: the next unit's weight changes
    assert len(got) == 4


def test_staged_store_maps_spilled_tensors_per_use(tmp_path):
    store = stage_data.Store(tmp_path)
    big = np.arange(stage_data.SPILL // 4 + 10, dtype=np.float32)
    small = np.ones(3, np.float32)
    store.save(0, {"big": big, "small": small})
    a = store.get(0, "big")
    assert isinstance(a, np.memmap) and np.array_equal(a, big)
    assert store.get(0, "small") is small
    assert not any(isinstance(v, np.memmap) for d in store.data.values() for v in d.values())  # nothing mapped kept
    store.close()
