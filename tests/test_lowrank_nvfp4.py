"""Low-rank branch with NVFP4 W4A4 (passes.LowRank before BlockFP): the written FP4 weight is the NVFP4
quantization of W - L1·L2 (numpy reference), the FP16 branch reads the unquantized input, the output error
falls against plain --nvfp4 (exact emulation in ORT), and TensorRT-RTX for SM 12.0 keeps every NVFP4 layer
in an FP4 kernel with the branch GEMMs beside it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner

from onnxopt import QuantConfig, formats, modelfile, ort, quantize
from onnxopt.rewrite import lowrank
from onnxopt.cast.autocast import fp32_view
from onnxopt.cli import main
from onnxopt.formats import nvfp4
from onnxopt.formats.emulation import lower_for_ort
from onnxopt.trt import rtx_available
from test_lowrank import K, feed, model

NV = formats.get("nvfp4")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lrnv")
    modelfile.save(model(outlier=60.0), d / "m.onnx")
    np.savez(d / "c.npz", **{k: np.stack([feed(s)[k] for s in range(4)]) for k in ("x", "img")})
    out = {"dir": d}
    for name, extra in (("plain", {}), ("lr", {"lowrank": 8})):
        out[name] = quantize(d / "m.onnx", d / f"{name}.onnx", data=d / "c.npz",
                             config=QuantConfig(mode="nvfp4", awq="none", progress=False, **extra))
    return out


def _fp4_weight(g: gs.Graph, layer: str) -> np.ndarray:
    """The dequantized NVFP4 weight [K, N] the written graph gives `layer` (codes and both scales read back)."""
    for dq in g.nodes:
        if dq.op == "DequantizeLinear" and isinstance(dq.inputs[0], gs.Constant) and dq.inputs[0].dtype == NV.np_dtype:
            users, t = [], dq.outputs[0]
            for _ in range(4):  # through a Cast/Transpose to the layer
                users = t.outputs
                if not users or users[0].name == layer or users[0].op in ("MatMul", "Gemm"):
                    break
                t = users[0].outputs[0]
            if users and users[0].name == layer:
                sdq = dq.inputs[1].inputs[0]
                p = nvfp4.Fp4Weight(np.asarray(dq.inputs[0].values), np.asarray(sdq.inputs[0].values),
                                    np.float32(sdq.inputs[1].values))
                w = p.dequantize()
                return w if int(dq.attrs.get("axis", 0)) == 0 else w.T
    raise AssertionError(f"no NVFP4 weight for {layer}")


def test_residual_is_nvfp4_and_branch_restores_the_weight(files):
    """FP4 weight == NVFP4 fake-quant of W - L1·L2 bit for bit; L1·L2 + that weight is closer to W than plain NVFP4."""
    src = modelfile.import_graph(model(outlier=60.0))
    w = np.asarray(next(t for t in src.tensors().values() if t.name == "W").values, np.float32)
    g = modelfile.import_graph(onnx.load(files["lr"].path))
    consts = {n.name: n.inputs[1] for n in g.nodes if lowrank.is_branch(n) and n.op == "MatMul"}
    l1 = np.asarray(consts["mm/lowrank_down"].values, np.float32)
    l2 = np.asarray(consts["mm/lowrank_up"].values, np.float32)
    assert l1.shape == (K, 8) and l2.shape == (8, w.shape[1])
    assert np.array_equal(l1.astype(np.float16).astype(np.float32), l1)          # the branch is FP16-exact
    res = (w.astype(np.float64) - l1.astype(np.float64) @ l2.astype(np.float64)).astype(np.float32)
    deq = _fp4_weight(g, "mm")
    assert np.array_equal(deq, NV.fake_quant(res, 1, "fp32"))                    # the writer's NVFP4 path, unchanged
    plain = _fp4_weight(modelfile.import_graph(onnx.load(files["plain"].path)), "mm")
    err_lr, err_plain = np.linalg.norm(deq + l1 @ l2 - w), np.linalg.norm(plain - w)
    assert err_lr < 0.5 * err_plain, (err_lr, err_plain)


def test_branch_reads_unquantized_input_and_layers_stay_nvfp4(files):
    rep = files["lr"].report
    assert set(rep["lowrank"]["layers"]) == {"mm", "gemm"}         # NVFP4 layers; the Conv stays FP8 without a branch
    assert {n: ly.get("format") for n, ly in rep["blockfp"]["layers"].items()} == {
        n: ly.get("format") for n, ly in files["plain"].report["blockfp"]["layers"].items()}
    m = files["lr"].model
    producers = {o: n for n in m.graph.node for o in n.output}
    branch = [n for n in m.graph.node if lowrank.is_branch(n)]
    assert len(branch) == 6
    for n in branch:
        assert all(producers.get(i) is None or producers[i].op_type not in ("DequantizeLinear", "TRT_FP4DynamicQuantize")
                   for i in n.input), n.name


def test_output_error_falls_against_plain_nvfp4(files):
    """Held-out input, exact NVFP4 emulation in ORT: the outlier layer's output error roughly halves."""
    ref = ort.session(model(outlier=60.0), level="disable").run(None, feed(9))
    errs = {}
    for name in ("plain", "lr"):
        out = ort.session(fp32_view(lower_for_ort(onnx.load(files[name].path))), level="disable").run(None, feed(9))
        errs[name] = [float(np.linalg.norm(o - r) / np.linalg.norm(r)) for o, r in zip(out, ref)]
    assert errs["lr"][0] < 0.7 * errs["plain"][0], errs
    assert abs(errs["lr"][1] - errs["plain"][1]) < 1e-6                       # the FP8 Conv is untouched


def test_cli_nvfp4_lowrank_runs(tmp_path):
    modelfile.save(model(outlier=60.0), tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "--nvfp4", "--lowrank", "4", "--awq", "none",
                                  "--calib-random", "2", "--shapes", f"x:2x{K}", "--shapes", "img:1x64x8x8",
                                  "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o.onnx").is_file()


@pytest.mark.rtx
@pytest.mark.skipif(not rtx_available(), reason="tensorrt_rtx is not importable (install the rtx extra)")
def test_rtx_nvfp4_layers_stay_fp4_with_the_branch(files, tmp_path):
    pytest.importorskip("polygraphy")
    from onnxopt.trt import report
    from onnxopt.trt.build import BuildConfig
    shapes = {"x": ((8, K),) * 3, "img": ((2, 64, 8, 8),) * 3}
    rep = report.engine_report_of(files["lr"].path, config=BuildConfig(profiles=shapes), targets=["12.0"])
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["mm"]["engine"] == rows["gemm"]["engine"] == "nvfp4" and rows["mm"]["graph"].startswith("nvfp4")
    assert rep["fallbacks"] == []
    assert rep["lowrank_branch"] == {"gemms": 4, "in_gemm_kernels": 4, "in_elementwise_kernels": 0,
                                     "precisions": {"fp16": 4}}   # FP16 GEMMs beside
    assert rep["quantized_in_quantized_kernels"] == rep["quantized_layers"] == 3, json.dumps(rep["layers"])


def test_weight_only_nvfp4_takes_the_branch_too():
    """W4A16 (no activation noise in the rank model): the branch on both NVFP4 layers, the outlier layer's error falls."""
    ref = ort.session(model(outlier=60.0), level="disable").run(None, feed(9))
    errs = {}
    for lr in (None, 8):
        res = quantize(model(outlier=60.0), config=QuantConfig(mode="nvfp4", weight_only=True, awq="none", lowrank=lr,
                                                               progress=False), calib_random=2, shapes={"x": (2, K), "img": (1, 64, 8, 8)})
        out = ort.session(fp32_view(lower_for_ort(res.model)), level="disable").run(None, feed(9))
        errs[lr] = float(np.linalg.norm(out[0] - ref[0]) / np.linalg.norm(ref[0]))
    assert set(res.report["lowrank"]["layers"]) == {"mm", "gemm"}
    assert errs[8] < 0.7 * errs[None], errs
