"""Staged calibration building the following stages' sessions on threads while the current one runs (calib.collect's
`prefetch`, on by default on CUDA): the same statistics as one session at a time, at most 1 + prefetch alive."""
from __future__ import annotations

import pytest

from onnxopt import calib, modelfile

import tiny
from test_calib import _stats, _token_npz, assert_same_statistics


@pytest.mark.parametrize("stages,ahead", [(2, 1), (4, 1), (4, 3)])
def test_prefetched_stages_give_the_same_statistics(tmp_path, stages, ahead):
    m = modelfile.load(tiny.save(tiny.transformer(), tmp_path / "t.onnx"))
    data = calib.CalibData.from_path(_token_npz(tmp_path, m), calib.input_specs(m))
    names = [o for n in m.graph.node if n.op_type in ("MatMul", "Softmax", "LayerNormalization", "Add") for o in n.output]
    one = _stats(m, data, names, stages=1)
    ahead = _stats(m, data, names, stages=stages, memory_budget_mb=0, prefetch=ahead)
    assert_same_statistics(one, ahead, names)


def _alive_sessions() -> int:
    import gc
    import onnxruntime as ort
    gc.collect()
    return sum(isinstance(o, ort.InferenceSession) for o in gc.get_objects())


class _CountingSessions(calib.AbsMax):
    """AbsMax that notes, at each batch, how many ORT sessions are alive (besides those alive before: `base`)."""
    seen: list = []
    base: int = 0

    def reduced(self, *outs):
        self.seen.append(_alive_sessions() - self.base)
        return super().reduced(*outs)


@pytest.mark.parametrize("ahead", [1, 2])
def test_prefetch_holds_at_most_the_sessions_ahead(tmp_path, ahead):
    """At most 1 + `prefetch` sessions are alive (on CUDA their weights are on the device), and sessions ahead are
    really built while a stage runs."""
    m = modelfile.load(tiny.save(tiny.transformer(), tmp_path / "t.onnx"))
    data = calib.CalibData.from_path(_token_npz(tmp_path, m), calib.input_specs(m))
    _CountingSessions.base = _alive_sessions()   # other tests' sessions the suite still holds
    red = {n: [_CountingSessions()] for n in [o for n in m.graph.node if n.op_type == "MatMul" for o in n.output]}
    _CountingSessions.seen = []
    calib.collect(m, data, red, stages=4, memory_budget_mb=0, prefetch=ahead, progress=False)
    assert _CountingSessions.seen and max(_CountingSessions.seen) <= 1 + ahead
    assert max(_CountingSessions.seen) >= 2  # a later session was built while a stage ran
    for n, (r,) in red.items():
        assert r.value is not None


def test_cpu_weight_budget_is_the_host_budget():
    """On the CPU ORT maps a session's weights into this process: the stage budget stays --memory-budget (on CUDA it
    is a third of the GPU's memory, or the budget if larger: not testable here)."""
    from onnxopt.calib.collect import weight_budget
    assert weight_budget("cpu", 4096 << 20) == 4096 << 20
