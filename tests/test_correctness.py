"""Correct on real-weight patterns: graph outputs read internally, FP16 overflow, precision loss, finite outputs."""
import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import tiny
from onnxopt import io, ort
from onnxopt.compare import compare
from onnxopt.quant import QuantConfig, quantize

IDS = {"ids": (2, 16)}


def _albert_like(tmp_path):
    # Like an ALBERT export: one layer's attention probabilities are a 2nd graph output that attn_pv also reads.
    m = tiny.transformer()
    m.graph.output.append(h.make_tensor_value_info("p", T.FLOAT, None))
    return tiny.save(m, tmp_path / "albert.onnx")


@pytest.mark.parametrize("mode,floor", [("fp8", 0.99), ("int8", 0.99), ("int4", 0.99)])
def test_output_read_internally_keeps_user_dtype_and_loads(tmp_path, mode, floor):
    src = _albert_like(tmp_path)
    r = quantize(src, tmp_path / f"q.{mode}.onnx", config=QuantConfig(mode=mode, progress=False), calib_random=4, shapes=IDS)
    assert [o.type.tensor_type.elem_type for o in r.model.graph.output] == [T.FLOAT, T.FLOAT]
    ort.session(io.load(r.path))  # ORT loads it as written (no FP32 view)
    res = compare(src, r.path, n_random=2, shapes=IDS)
    assert set(res) == {"y", "p"}
    for name, m in res.items():
        assert m["cosine"] >= floor, (name, m)
