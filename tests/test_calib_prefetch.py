"""Staged calibration building the next stage's session on a thread while the current one runs (calib.collect's
`prefetch`, on by default on CUDA): the same statistics as one session at a time, at most two sessions alive."""
from __future__ import annotations

import numpy as np
import pytest

from onnxopt import calib, modelfile

import tiny
from test_calib import _stats, _token_npz


@pytest.mark.parametrize("stages", [2, 4])
def test_prefetched_stages_give_the_same_statistics(tmp_path, stages):
    m = modelfile.load(tiny.save(tiny.transformer(), tmp_path / "t.onnx"))
    data = calib.CalibData.from_path(_token_npz(tmp_path, m), calib.input_specs(m))
    names = [o for n in m.graph.node if n.op_type in ("MatMul", "Softmax", "LayerNormalization", "Add") for o in n.output]
    one = _stats(m, data, names, stages=1)
    ahead = _stats(m, data, names, stages=stages, memory_budget_mb=0, prefetch=True)
    for n in names:
        for a, b in zip(one[n], ahead[n]):
            if isinstance(a, calib.Histogram):
                np.testing.assert_array_equal(a.counts, b.counts)
            elif isinstance(a, calib.TopAbs):
                assert a.value == b.value and a.count == b.count
            else:
                np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))


class _CountingSessions(calib.AbsMax):
    """AbsMax that notes, at each batch, how many ORT sessions are alive."""
    seen: list = []

    def reduced(self, *outs):
        import gc
        import onnxruntime as ort
        self.seen.append(sum(isinstance(o, ort.InferenceSession) for o in gc.get_objects()))
        return super().reduced(*outs)


def test_prefetch_holds_at_most_two_sessions(tmp_path):
    """Sessions are built one ahead, not all at once (on CUDA their weights are on the device: two stages at most)."""
    import gc
    m = modelfile.load(tiny.save(tiny.transformer(), tmp_path / "t.onnx"))
    data = calib.CalibData.from_path(_token_npz(tmp_path, m), calib.input_specs(m))
    gc.collect()
    red = {n: [_CountingSessions()] for n in [o for n in m.graph.node if n.op_type == "MatMul" for o in n.output]}
    _CountingSessions.seen = []
    calib.collect(m, data, red, stages=4, memory_budget_mb=0, prefetch=True, progress=False)
    assert _CountingSessions.seen and max(_CountingSessions.seen) <= 2
    assert 2 in _CountingSessions.seen  # the next session was built while a stage ran
    for n, (r,) in red.items():
        assert r.value is not None
