"""NVFP4's activation tensor scale sits a power of two above the calibrated max (`nvfp4.HEADROOM`): data within
the calibrated range rounds bit for bit as without it, and held-out values beyond it are not clipped."""
import numpy as np

from onnxopt.formats import nvfp4


def test_activation_headroom_keeps_calibrated_data_bit_identical_and_does_not_clip_beyond():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 64)) * np.exp2(rng.integers(-3, 3, (64, 64)))).astype(np.float32)
    amax = float(np.abs(x).max())
    # within the calibrated range: the power-of-two headroom changes no block's rounding (normal FP8 scales)
    old = nvfp4.fake_quant_blocks(x.reshape(-1, 16), nvfp4.tensor_scale(amax)).reshape(x.shape)
    assert np.array_equal(nvfp4.fake_quant_activation(x, amax), old)
    # held-out data 1.5x beyond the calibrated max: without headroom its block scale saturates and clips it
    y = x.copy()
    y[3, 5] = 1.5 * amax
    clipped = nvfp4.fake_quant_blocks(y.reshape(-1, 16), nvfp4.tensor_scale(amax)).reshape(y.shape)
    assert clipped[3, 5] <= amax * 1.0001
    got = nvfp4.fake_quant_activation(y, amax)
    assert abs(got[3, 5] - y[3, 5]) <= 0.07 * y[3, 5]  # within FP4/FP8 rounding of the block's max
    assert nvfp4.activation_scale(amax) == np.float32(2.0) * nvfp4.tensor_scale(amax)
    assert nvfp4.activation_scale(0.0) == np.float32(1.0) and nvfp4.activation_scale(float("nan")) == np.float32(1.0)
