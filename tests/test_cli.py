import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h

import tiny
from onnxopt.cli import main


def run(*args, quiet=True):
    r = CliRunner().invoke(main, ["-q"] * quiet + list(map(str, args)))
    return r.exit_code, r.output


def _last_line(out: str) -> str:
    """The summary line, past any progress-bar residue (CliRunner mixes stderr into the output)."""
    return [line.strip() for line in out.splitlines() if line.strip()][-1]


@pytest.fixture
def cnn(tmp_path):
    return tiny.save(tiny.cnn(), tmp_path / "m.onnx")


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.npz"
    np.savez(p, x=np.random.default_rng(0).standard_normal((4, 1, 3, 16, 16)).astype(np.float32))
    return p


def test_quantize_inspect_compare_convert(tmp_path, cnn, calib):
    code, out = run("quantize", cnn, "--int8", "--calib", calib, "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json",
                    quiet=False)
    assert code == 0, out
    summary = _last_line(out)
    assert summary.startswith("quantized 4/5 layers to int8, 1 skipped; wrote ") and summary.endswith(" kB)")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mode"] == "int8" and report["qdq"]["skipped"] == {"fc": "N=10 < 16"}
    assert [p["pass"] for p in report["recipe"]] == ["qdq", "autocast"] and report["coverage"]["quantized"] == 4
    code, out = run("inspect", tmp_path / "q.onnx", "--layers", "--json", tmp_path / "i.json")
    assert code == 0 and "quantized: 4" in out and "lint: clean" in out
    assert json.loads((tmp_path / "i.json").read_text())["quantized_layers"] == 4
    code, out = run("compare", cnn, tmp_path / "q.onnx", "--data", calib)
    assert code == 0
    cos = float(out.splitlines()[1].split()[1])
    assert cos > 0.999
    pairs = tmp_path / "pairs.npz"  # samples of batch 2 (a CFG pair), compared one image at a time
    np.savez(pairs, x=np.random.default_rng(1).standard_normal((3, 2, 3, 16, 16)).astype(np.float32))
    whole = run("compare", cnn, tmp_path / "q.onnx", "--data", pairs, "--json", tmp_path / "c2.json")
    split = run("compare", cnn, tmp_path / "q.onnx", "--data", pairs, "--max-batch", "1", "--json", tmp_path / "c1.json")
    assert whole[0] == split[0] == 0
    a, b = (json.loads((tmp_path / f).read_text())["y"] for f in ("c2.json", "c1.json"))
    assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-6) and a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-3)
    code, out = run("convert", cnn, "--fp16", "-o", tmp_path / "f.onnx", quiet=False)
    assert code == 0 and (tmp_path / "f.onnx").exists()
    assert _last_line(out).startswith("converted to fp16: 0 nodes fp32 (0.0%), ranges not checked")
    code, out = run("convert", cnn, "--fp16", "-o", tmp_path / "f2.onnx")  # -q: no summary
    assert code == 0 and out == ""


def test_default_output_name_and_fp8_default(tmp_path, cnn):
    code, out = run("quantize", cnn, "--calib-random", 2, "--shapes", "x:1x3x16x16")
    assert code == 0, out
    assert (tmp_path / "m.fp8.onnx").exists()


def _one_line_error(code, out, *needles):
    assert code == 2
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for n in needles:
        assert n in lines[0]


def test_bad_inputs_get_one_line(tmp_path, cnn, calib):
    digest = hashlib.sha256(open(cnn, "rb").read()).hexdigest()
    _one_line_error(*run("quantize", cnn, "--calib", calib, "-o", cnn), "is the input")
    assert hashlib.sha256(open(cnn, "rb").read()).hexdigest() == digest

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00\x01\x02 definitely not protobuf" * 3)
    _one_line_error(*run("quantize", corrupt, "--calib", calib), "corrupt.onnx")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(open(cnn, "rb").read()[:300])
    _one_line_error(*run("inspect", trunc), "trunc.onnx")
    _one_line_error(*run("inspect", tmp_path / "nope.onnx"), "no such model file")

    ext = tmp_path / "ext.onnx"
    onnx.save(tiny.cnn(), str(ext), save_as_external_data=True, location="ext.bin", size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    _one_line_error(*run("quantize", ext, "--calib", calib), "external data", "missing")

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((2, 1, 3, 8, 8), np.float32))
    _one_line_error(*run("quantize", cnn, "--calib", wrong), "shape", "expects")
    np.savez(wrong, x=np.zeros((2, 1, 3, 16, 16), np.int32))
    _one_line_error(*run("quantize", cnn, "--calib", wrong), "dtype int32")
    _one_line_error(*run("quantize", cnn, "--calib-random", 2), "--shapes x:")
    _one_line_error(*run("quantize", cnn), "no calibration data")

    old = tmp_path / "old.onnx"
    tiny.save(tiny.cnn(opset=5), old)
    code, out = run("quantize", old, "--calib", calib, "-o", tmp_path / "old.q.onnx", quiet=False)  # upgraded first (issue 22 item 9)
    assert code == 0, out  # the warning line: tests/test_bad_input_corpus.py (a subprocess sees its stderr)
    assert onnx.load(tmp_path / "old.q.onnx").opset_import[0].version >= 13

    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)])
    relu = tiny.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    _one_line_error(*run("quantize", relu, "--calib", calib, "-o", tmp_path / "r.onnx"), "nothing to quantize")
    assert not (tmp_path / "r.onnx").exists()


def test_real_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    p = subprocess.run([sys.executable, "-m", "onnxopt", "quantize", str(bad), "--calib-random", "1"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: ")


def test_int4_and_sparsity_runs_say_what_they_did(tmp_path):
    src = tiny.save(tiny.transformer(), tmp_path / "tr.onnx")
    code, out = run("quantize", src, "--int4", "--awq", "none", "--block-size", "32", "--int8-layers", "mlp_down",
                    quiet=False)
    assert code == 0, out
    assert _last_line(out).startswith("quantized 6/8 layers to int4 weight-only (block 32, round-to-nearest, 1 kept INT8), "
                                      "2 skipped; wrote ")  # the attention BMMs have no weight
    assert (tmp_path / "tr.int4.onnx").exists()
    code, out = run("quantize", src, "--int8", "--sparsity", "2:4", "--calib-random", 2, "--shapes", "ids:2x16",
                    "-o", tmp_path / "s.onnx", quiet=False)
    assert code == 0, out
    line = _last_line(out)   # --int8 smooths the MatMuls by default (onnxopt.smoothing_defaults): said in between
    assert "0 skipped; SmoothQuant on " in line and "; pruned 6 layers to 2:4 (magnitude); " in line
    assert "the --int8 default (off: --smoothquant none); wrote " in line
    code, out = run("sparsify", src, "--min-params", 0, quiet=False)
    assert code == 0, out
    assert _last_line(out).startswith("pruned 6 layers to 2:4 (magnitude), 0 skipped")
    assert (tmp_path / "tr.sparse.onnx").exists()


def test_old_spellings_still_work(tmp_path, cnn, calib):
    code, out = run("quantize", cnn, "--int8", "--calib", calib, "--calib-provider", "cpu", "--calib-max-batch", 1,
                    "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json")
    assert code == 0, out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["qdq"]["coverage"]["quantized"] == 4
    src = tiny.save(tiny.transformer(), tmp_path / "tr.onnx")
    code, out = run("sparsify", src, "--pattern", "2:4", "--method", "sparsegpt", "--calib-random", 2, "--shapes", "ids:2x16",
                    "--calib-provider", "cpu", "--min-params", 0, "-o", tmp_path / "sp.onnx", "--report", tmp_path / "sp.json")
    assert code == 0, out
    assert json.loads((tmp_path / "sp.json").read_text())["method"] == "sparsegpt"


def test_analysis_commands_end_with_one_summary_line_and_no_bar_junk(tmp_path, cnn, calib):
    """Not a terminal (CliRunner): no progress bars or carriage returns; the last line says what was done;
    -q drops it. Old option spellings still work."""
    q = tmp_path / "q.onnx"
    assert run("quantize", cnn, "--int8", "--calib", calib, "-o", q)[0] == 0
    plain = lambda *a: CliRunner().invoke(main, list(map(str, a)))  # noqa: E731
    r = plain("compare", cnn, q, "--data", calib, "--report", tmp_path / "c.json")
    assert r.exit_code == 0 and "\r" not in r.output and "%|" not in r.output
    last = r.output.strip().splitlines()[-1]
    cos = json.loads((tmp_path / "c.json").read_text())["y"]["cosine"]
    assert last.startswith(f"compared 1 output(s) over 4 batch(es) on cpu: worst cosine {cos:.6f} (y)")
    r = plain("inspect", q, "--json", tmp_path / "i.json", "--sparsity")
    assert r.exit_code == 0 and (tmp_path / "i.json").exists() and "sparsity" in json.loads((tmp_path / "i.json").read_text())
    assert r.output.strip().splitlines()[-1] == f"inspected {q}: 4/5 layers quantized (int8 4), lint clean; wrote {tmp_path / 'i.json'}"
    r = plain("calib-data", "sdxl", "-o", tmp_path / "s.npz", "--samples", 1, "--height", 64, "--width", 64, "-q")
    assert r.exit_code == 0 and r.output == "" and np.load(tmp_path / "s.npz")["sample"].shape == (1, 2, 4, 8, 8)
    r = plain("calib-data", "sdxl", "-o", tmp_path / "s.npz", "--samples", 1, "--height", 64, "--width", 64)
    assert r.output.strip().splitlines()[-1].startswith(f"wrote {tmp_path / 's.npz'} (1 samples of 5 UNet inputs, synthetic 64x64")


def test_progress_logs_plain_lines_off_a_terminal(monkeypatch, caplog):
    import logging

    from onnxopt import progress
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="onnxopt"):
        assert list(progress.track(range(3), total=3, desc="compare: reference", unit="batch")) == [0, 1, 2]
    msgs = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in msgs[:3]] == [f"compare: reference: {i}/3 batch" for i in (1, 2, 3)]
    assert msgs[-1].startswith("compare: reference: done, 3 batch")


def test_every_command_and_subcommand_takes_v_and_q():
    """-v/-q after any command name, subcommands of groups included (calib-data trajectory lacked -q)."""
    def walk(group, path):
        for name, cmd in group.commands.items():
            yield path + [name], cmd
            if hasattr(cmd, "commands"):
                yield from walk(cmd, path + [name])
    seen = 0
    for path, cmd in walk(main, []):
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert {"-q", "--quiet", "-v", "--verbose"} <= opts, " ".join(path)
        seen += 1
    assert seen >= 10
