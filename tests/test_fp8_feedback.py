"""FP8 per-channel weights rounded with error feedback from the calibration data (quant.feedback, GPTQ;
`--weight-rounding feedback`): same graph, same scales, lower output error than round-to-nearest; bounded;
round-to-nearest stays the default."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxopt
from onnxopt import QuantConfig, modelfile, ort
from onnxopt.errors import OnnxoptError
from onnxopt.quant import feedback


def _model() -> onnx.ModelProto:
    """x -> 3x3 conv -> SiLU -> MatMul over channels (a Gemm-like 1x1 as MatMul on NHWC): correlated inputs."""
    rng = np.random.default_rng(0)
    wc = (rng.standard_normal((32, 32, 3, 3)) / 17).astype(np.float32)
    wm = (rng.standard_normal((32, 24)) / 6).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("Sigmoid", ["c"], ["sg"], name="sig"), h.make_node("Mul", ["c", "sg"], ["a"], name="silu"),
             h.make_node("Transpose", ["a"], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
             h.make_node("MatMul", ["t", "wm"], ["y"], name="proj")]
    g = h.make_graph(nodes, "fb", [h.make_tensor_value_info("x", T.FLOAT, ["N", 32, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 16, 16, 24]),
                      h.make_tensor_value_info("c", T.FLOAT, ["N", 32, 16, 16])],
                     [nh.from_array(wc, "wc"), nh.from_array(wm, "wm")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


MIX = np.random.default_rng(7).standard_normal((32, 32))  # one input distribution: calibration and held out


def _smooth_inputs(rng, n: int) -> np.ndarray:
    """Spatially smooth inputs with mixed, unequal channels: the rows of a conv are strongly correlated."""
    x = rng.standard_normal((n, 32, 20, 20))
    k = np.ones(5) / 5
    for ax in (2, 3):
        x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), ax, x)
    x = np.einsum("nchw,cd->ndhw", x[:, :, 2:18, 2:18], MIX)
    return (x * np.linspace(0.2, 3, 32)[None, :, None, None]).astype(np.float32)


def _snr(ref, got) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((got.astype(np.float64) - ref) ** 2)))


def test_fp8_feedback_lowers_output_error_same_graph(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_model(), src)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", x=_smooth_inputs(rng, 64))
    x = {"x": _smooth_inputs(rng, 4)}  # held out
    ref = ort.session(modelfile.load(str(src)), level="disable").run(None, x)
    out = {}
    for rounding in ("nearest", "feedback"):
        res = onnxopt.run([onnxopt.QDQ("fp8", weight_rounding=rounding)], src, tmp_path / f"q{rounding}.onnx",
                          data=str(tmp_path / "c.npz"), progress=False)
        m = modelfile.load(res.path)
        got = ort.session(m, level="disable").run(None, x)
        inits = {i.name: nh.to_array(i) for i in m.graph.initializer}
        out[rounding] = (res.report["qdq"], [n.op_type for n in m.graph.node], inits, [_snr(r, g) for r, g in zip(ref, got)])
    (rn, ops_n, init_n, snr_n), (fb, ops_f, init_f, snr_f) = out["nearest"], out["feedback"]
    assert rn["weight_rounding"] == "nearest" and "error_feedback" not in rn
    assert fb["weight_rounding"] == "feedback" and set(fb["error_feedback"]["layers"]) == {"conv", "proj"}
    assert ops_n == ops_f and init_n.keys() == init_f.keys()  # the same graph and the same scales
    for name, v in init_n.items():
        if "scale" in name:
            np.testing.assert_array_equal(v, init_f[name])
    assert any(not np.array_equal(init_n[k], init_f[k]) for k in init_n if k.endswith("_quantized"))
    for info in fb["error_feedback"]["layers"].values():  # measured on the calibration rows
        assert info["feedback_db"] > info["rtn_db"], info
    conv = fb["error_feedback"]["layers"]["conv"]
    assert conv["feedback_db"] > conv["rtn_db"] + 5, conv  # smooth inputs: strongly correlated patch rows
    # held out, through the written model (activation FP8 noise included): the conv output gains, y does not lose
    assert snr_f[1] > snr_n[1] + 1 and snr_f[0] > snr_n[0] - 0.5, (snr_n, snr_f)  # and on held-out inputs, through the whole model


def test_nearest_by_default_and_bad_choice_refused():
    assert onnxopt.QDQ("int8").rounding == "nearest" and onnxopt.QDQ("fp8").rounding == "nearest"
    with pytest.raises(OnnxoptError, match="weight rounding"):
        onnxopt.QDQ("fp8", weight_rounding="gptq")


def test_feedback_bounded_by_size_and_budget():
    assert feedback.rows_for(16) == feedback.ROWS_MIN and feedback.rows_for(10**6) == feedback.ROWS_MAX
    import onnx_graphsurgeon as gs
    from onnxopt.quant import rules
    g = gs.import_onnx(_model())
    plan = rules.plan(g, onnxopt.QDQ("fp8"))
    fb = feedback.Feedback.plan(plan, batches=4, memory_budget_mb=4096)
    weighted = {n.name for n, _, _, _ in plan.weights}
    assert "conv" in fb.keys and set(fb.keys) == weighted and not fb.skipped
    assert fb.by_key[fb.keys["conv"]].sample.rows == feedback.rows_for(32 * 9)   # rows drawn for its Hessian
    tiny = feedback.Feedback.plan(plan, batches=4, memory_budget_mb=0)  # no room for any Hessian
    assert not tiny.keys and set(tiny.skipped) == weighted
    assert set(tiny.skipped.values()) == {"Hessians beyond a quarter of the memory budget"}


def test_cli_weight_rounding_is_w8a8_only(tmp_path):
    """`--weight-rounding` with a weight-only mode is one error line, exit 2, before the model is read."""
    from click.testing import CliRunner

    from onnxopt.cli import main
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 1, 3, 8, 8), np.float32))
    r = CliRunner().invoke(main, ["quantize", str(model), "--int4", "--weight-rounding", "feedback",
                                  "--calib", str(tmp_path / "c.npz")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--weight-rounding" in lines[0], r.output


@pytest.mark.parametrize("mode", ["--auto", "--nvfp4", "--mxfp8"])
def test_cli_weight_rounding_refused_where_nothing_would_round(tmp_path, mode):
    """--auto and the block formats write no per-channel calibrated weights: the flag is an error, not ignored."""
    from click.testing import CliRunner

    from onnxopt.cli import main
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 1, 3, 8, 8), np.float32))
    r = CliRunner().invoke(main, ["quantize", str(model), mode, "--weight-rounding", "feedback",
                                  "--calib", str(tmp_path / "c.npz")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("error: --weight-rounding applies to") and "--fp8" in lines[0] and "--int8" in lines[0]
    assert mode in lines[0].split("only")[1], lines[0]   # names the mode it was given with
