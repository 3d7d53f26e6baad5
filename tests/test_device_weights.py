"""Calibration sessions sharing one device copy of the weights (ort.device_weights): ORT takes the copies as user
initializers in place, every session reading the same bytes of the same file gets the same copy, and the outputs
are those of sessions that load their own weights. (On the CPU here, `device="cpu"`; on CUDA the copies are on the GPU.)"""
from __future__ import annotations

import numpy as np
import onnx

from onnxopt import calib, modelfile
from onnxopt import ort as ortx

import tiny


def _model(tmp_path):
    m = tiny.transformer(d=512, heads=8, seq=16)
    onnx.save(m, str(tmp_path / "t.onnx"), save_as_external_data=True, location="t.data", size_threshold=1024)
    return modelfile.load(tmp_path / "t.onnx")


def test_sessions_share_one_copy_and_give_the_same_outputs(tmp_path):
    m = _model(tmp_path)
    big = [t for t in m.graph.initializer if modelfile.tensor_bytes(t) >= ortx.SHARE_BYTES]
    assert len(big) >= 4
    ids = {"ids": np.random.default_rng(0).integers(0, 50, (2, 16)).astype(np.int64)}
    want = ortx.session(m, level="basic", lean=True).run(None, ids)
    with ortx.device_weights("cpu", device="cpu") as shared:
        s1 = ortx.session(m, level="basic", lean=True, shared=True)
        s2 = ortx.session(m, level="basic", lean=True, shared=True)
        assert shared.uploads == len(big) and len(shared.values) == len(big) and not shared.broken
        for s in (s1, s2):
            for a, b in zip(s.run(None, ids), want):
                np.testing.assert_array_equal(a, b)
    assert not shared.values  # the block's cache lets go; each session keeps the copies it uses
    for a, b in zip(s1.run(None, ids), want):
        np.testing.assert_array_equal(a, b)


def test_calibration_in_the_block_gives_the_same_statistics(tmp_path):
    m = _model(tmp_path)
    np.savez(tmp_path / "c.npz", ids=np.random.default_rng(3).integers(0, 50, (4, 2, 16)).astype(np.int64))
    data = calib.CalibData.from_path(tmp_path / "c.npz", calib.input_specs(m))
    names = [n.output[0] for n in m.graph.node if n.op_type == "MatMul"]

    def stats():
        red = {n: [calib.AbsMax(), calib.TopAbs(99.0)] for n in names}
        calib.collect(m, data, red, progress=False, stages=2, memory_budget_mb=0, prefetch=1)
        return {n: [r.value for r in rs] for n, rs in red.items()}
    ref = stats()
    with ortx.device_weights("cpu", device="cpu") as shared:
        got = stats()
        assert shared.uploads > 0
    assert got == ref


def test_no_sharing_outside_the_block_or_on_the_cpu_provider(tmp_path):
    with ortx.device_weights("cpu") as shared:
        assert shared is None
