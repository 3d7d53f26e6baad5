"""Weights quantized during calibration (quant.prequantize, issue 25) give the very files of the synchronous writer:
the same codes (spilled early, not written twice), scales and bias-correction shifts, with and without SmoothQuant."""
import logging

import numpy as np
import onnx
import pytest

import onnxopt
import tiny
from onnxopt import QDQ, Autocast, SmoothQuant, modelfile
from onnxopt.quant import prequantize

NEVER = 1 << 62


def _qdq(mode: str, min_bytes: int) -> QDQ:
    q = QDQ(mode)
    q.prequantize_bytes = min_bytes  # 0: every run big enough; NEVER: the synchronous writer only
    return q


def _both(tmp_path, caplog, before, mode, src, data) -> tuple:
    """(background run's files, synchronous run's files, the background path's log line)."""
    out = {}
    for tag, min_bytes in (("bg", 0), ("sync", NEVER)):
        d = tmp_path / tag
        d.mkdir()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=prequantize.__name__):
            onnxopt.run([*before(), _qdq(mode, min_bytes), Autocast("fp32")], src, d / "q.onnx", data=str(data),
                        progress=False, threads=2)
        out[tag] = ({p.name: p.read_bytes() for p in sorted(d.iterdir())},
                    [r.getMessage() for r in caplog.records if "background weight quantization" in r.getMessage()])
    return out["bg"], out["sync"]


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_background_codes_and_shifts_equal_synchronous_writer(tmp_path, caplog, mode):
    # 384-channel 3x3 convolutions with biases: codes over modelfile.SPILL_BYTES (spilled by the background thread),
    # each with a bias-correction shift computed after calibration
    feeds = tiny.residual_block(tmp_path / "res.onnx", 384, kernels=(3, 3, 3))
    np.savez(tmp_path / "c.npz", x=np.concatenate([f["x"] for f in feeds]))
    bg, sync = _both(tmp_path, caplog, lambda: [], mode, tmp_path / "res.onnx", tmp_path / "c.npz")
    assert bg[0] == sync[0]
    assert len(bg[1]) == 1 and "3 weights" in bg[1][0] and "shifts of 3 weights" in bg[1][0]
    assert sync[1] == []
    g = modelfile.import_graph(modelfile.load(tmp_path / "bg" / "q.onnx"))
    assert sum(n.op == "DequantizeLinear" for n in g.nodes) >= 3


def test_background_with_lazy_smoothquant_weights_equals_synchronous_writer(tmp_path, caplog):
    # external weights over lazyscale.LAZY_BYTES: SmoothQuant scales them lazily, and calibration spills the
    # products (lazyscale.compute_all) on the main thread while the background thread spills codes
    m = tiny.transformer(d=512)
    onnx.save(m, tmp_path / "tr.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="tr.data",
              size_threshold=1024)
    np.savez(tmp_path / "c.npz", ids=np.random.default_rng(0).integers(0, 50, (6, 2, 16)).astype(np.int64))
    bg, sync = _both(tmp_path, caplog, lambda: [SmoothQuant(0.8)], "int8", tmp_path / "tr.onnx", tmp_path / "c.npz")
    assert bg[0] == sync[0]
    assert len(bg[1]) == 1 and sync[1] == []
