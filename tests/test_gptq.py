import numpy as np

from onnxopt.rewrite import awq
from onnxopt.formats import INT4
from onnxopt.formats.int4 import expand


def test_error_feedback_rounding_lowers_output_error_not_weight_error():
    # Correlated inputs with a few loud channels: rounding with error feedback must beat round-to-nearest
    # on the layer output ||X(W - Q)||, with the same block scales.
    rng = np.random.default_rng(0)
    k, n, rows = 256, 64, 4096
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((rows, k)) @ mix
    x[:, :8] *= 10
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    h = x.T @ x
    scale = INT4.block_scales(w, 128)
    rtn = np.clip(np.rint(w / expand(scale, k, 128)), -8, 7)
    q = awq.gptq_round(w, h, scale, 128)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    s = expand(scale, k, 128)

    def out_err(qv):
        return np.linalg.norm(x @ (qv * s - w)) / np.linalg.norm(x @ w)

    assert out_err(q) < 0.7 * out_err(rtn)
