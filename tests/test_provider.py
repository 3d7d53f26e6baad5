"""ort.check_provider: real availability, one error naming what to install, or one warning on fallback;
ORT failures while running become one line naming the input."""
import logging

import numpy as np
import onnxruntime
import pytest

import tiny
from onnxopt import ort
from onnxopt.errors import OnnxoptError


def test_cpu_is_always_available():
    assert ort.check_provider("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(OnnxoptError, match="unknown provider 'tpu'"):
        ort.check_provider("tpu")


def test_cuda_probe_matches_what_a_session_really_uses():
    """The probe is the truth ORT itself reports: where it says CUDA works, a session runs on it."""
    reason = ort._unavailable("cuda")
    assert ort._unavailable("cuda") == reason and ort._unavailable.cache_info().hits >= 1  # probed once
    m = tiny.cnn()
    if reason is None:
        assert ort.check_provider("cuda")[0] == "CUDAExecutionProvider"
        assert "CUDAExecutionProvider" in ort.session(m, provider="cuda").get_providers()
    else:
        with pytest.raises(OnnxoptError, match="onnxruntime-gpu.*CUDA 13.*--allow-cpu-fallback"):
            ort.check_provider("cuda")
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            # onnxruntime-gpu without its CUDA libraries: ORT itself would silently run on the CPU
            so = onnxruntime.SessionOptions()
            so.log_severity_level = 4
            s = onnxruntime.InferenceSession(m.SerializeToString(), so, providers=ort.PROVIDERS["cuda"])
            assert s.get_providers() == ["CPUExecutionProvider"]


def test_fallback_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(ort, "_unavailable", lambda name: "no CUDA here" if name == "cuda" else None)
    monkeypatch.setattr(ort, "_fallen_back", set())
    with pytest.raises(OnnxoptError, match=r"cannot use CUDA here \(no CUDA here\); install onnxruntime-gpu"):
        ort.session(tiny.cnn(), provider="cuda")
    with caplog.at_level(logging.WARNING):
        assert ort.check_provider("cuda", allow_fallback=True) == ["CPUExecutionProvider"]
        assert ort.check_provider("cuda", allow_fallback=True) == ["CPUExecutionProvider"]
        s = ort.session(tiny.cnn(), provider="cuda")  # after an allowed fallback, sessions follow it
    assert s.get_providers() == ["CPUExecutionProvider"]
    assert len([r for r in caplog.records if "cannot use CUDA" in r.getMessage()]) == 1


def test_run_failure_names_the_input_and_the_gather_range():
    m = tiny.transformer()
    s = ort.session(m)
    good = {"ids": np.full((1, 16), 3, np.int64)}
    assert ort.run(s, None, good, model=m)[0].shape == (1, 16, 64)
    with pytest.raises(OnnxoptError) as e:
        ort.run(s, None, {"ids": np.full((1, 16), 50, np.int64)}, model=m, label="m.onnx")
    msg = str(e.value)
    assert "\n" not in msg and "m.onnx" in msg and "input 'ids'" in msg and "50-row table 'emb'" in msg
    assert "[0, 49]" in msg and "got 50..50" in msg
    with pytest.raises(OnnxoptError, match="Got invalid dimensions for input: ids") as e:
        ort.run(s, None, {"ids": np.zeros((1, 15), np.int64)}, model=m)
    assert "\n" not in str(e.value)


def test_sessions_skip_the_buffer_reuse_planner_and_compute_the_same():
    """onnxopt's sessions turn ORT's buffer-reuse planner off (its cost grows with tensors x free buffers: 11 of
    12 s for a quantized tiny SDXL UNet); the outputs stay bit for bit those of ORT's default session."""
    m = tiny.cnn()
    s = ort.session(m)
    assert s.get_session_options().enable_mem_reuse is False
    so = onnxruntime.SessionOptions()
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = onnxruntime.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert ref.get_session_options().enable_mem_reuse is True
    i = s.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32)
    for a, b in zip(s.run(None, {i.name: x}), ref.run(None, {i.name: x})):
        assert np.array_equal(a, b)
