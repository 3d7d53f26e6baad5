"""Issue 25's speed work keeps results: the weight writer's thread pool gives byte-identical graphs at any
thread count, and the Runner's report carries a phase breakdown (load, calibrate, plan, search, write,
check, save) that adds up to the run's total."""
import hashlib

import numpy as np
import onnx
import pytest

import tiny
from onnxopt import Autocast, threads
from onnxopt.errors import OnnxoptError
from onnxopt.pipeline import PHASES, Runner
from onnxopt.api import QuantConfig, quantize, recipe


def _digest(path) -> str:
    m = onnx.load(str(path))
    h = hashlib.sha256()
    for n in m.graph.node:
        h.update(n.SerializeToString())
    for t in sorted(m.graph.initializer, key=lambda t: t.name):
        h.update(t.SerializeToString())
    return h.hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("speed")
    out = {"cnn": tiny.model_and_calib(d, tiny.cnn(), (8, 3, 16, 16))}
    src = tiny.save(tiny.transformer(), d / "tr.onnx")
    np.savez(d / "tr.npz", ids=np.random.default_rng(0).integers(0, 50, (6, 2, 16)).astype(np.int64))
    out["transformer"] = (src, d / "tr.npz")
    return out


@pytest.mark.parametrize("name", ["cnn", "transformer"])
@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_thread_count_does_not_change_the_graph(models, tmp_path, name, mode):
    model, calib = models[name]
    got = {}
    for n in (1, 3):
        out = tmp_path / f"{n}.onnx"
        Runner(recipe(QuantConfig(mode=mode, progress=False)), data=str(calib), progress=False, threads=n).run(str(model), out)
        got[n] = _digest(out)
    assert got[1] == got[3]


def test_ordered_map_keeps_order_and_bounds_the_window():
    live, peak = [0], [0]

    def f(i):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        live[0] -= 1
        return i * i
    assert list(threads.ordered_map(f, range(50), threads=4, window=3)) == [i * i for i in range(50)]
    assert list(threads.ordered_map(f, range(5), threads=1)) == [0, 1, 4, 9, 16]
    assert threads.count(0) >= 1 and threads.count(5) == 5
    assert threads.for_bytes(1 << 10) == 1 and threads.for_bytes(1 << 10, 4) == 4  # small work: no pool unless asked
    assert threads.for_bytes(1 << 40) == threads.count(0)


def test_report_has_a_phase_breakdown(models, tmp_path):
    model, calib = models["cnn"]
    res = quantize(str(model), str(tmp_path / "q.onnx"), config=QuantConfig(mode="int8", progress=False), data=str(calib))
    b = res.report["breakdown_s"]
    assert list(b) == [*PHASES, "total"]
    assert all(v >= 0 for v in b.values())
    assert b["calibrate"] > 0 and b["write"] > 0 and b["save"] > 0 and b["check"] > 0
    # the phases account for the run: what is left is bookkeeping between them
    assert sum(v for k, v in b.items() if k != "total") == pytest.approx(b["total"], rel=0.1, abs=0.05)


def test_breakdown_in_verbose_output(models, tmp_path, caplog):
    from click.testing import CliRunner

    from onnxopt.cli import main
    model, calib = models["cnn"]
    with caplog.at_level("INFO", logger="onnxopt"):
        r = CliRunner().invoke(main, ["-v", "quantize", str(model), "--fp8", "--calib", str(calib), "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 0, r.output
    line = next(rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("timings:"))
    for phase in ("load", "calibrate", "write", "check", "save", "total"):
        assert phase in line


def test_negative_threads_is_a_user_error():
    with pytest.raises(OnnxoptError, match="--threads"):
        Runner([Autocast("fp16")], threads=-1)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_weights_quantized_before_give_the_same_graph(models, mode):
    """writer.quantize_weights (each weight once, e.g. for a search's gated graph) then write(quantized=...):
    the graph write() alone gives, and no weight is quantized again."""
    from onnxopt import modelfile, pipeline
    from onnxopt.quant import rules, writer
    from onnxopt.passes.static_qdq import QDQ
    model, _ = models["cnn"]

    def graph_and_plan():
        g = modelfile.import_graph(pipeline.load(model))
        place = rules.plan(g, QDQ(mode))
        amax = {t: 1.0 for t in place.activations}
        return g, writer.QuantPlan.uniform(mode, place, amax, {})

    g1, p1 = graph_and_plan()
    writer.write(g1, p1, high_precision="fp16")
    g2, p2 = graph_and_plan()
    pre = writer.quantize_weights(g2, p2, high_precision="fp16", threads=2)
    assert pre and all(f == mode for _, f in pre)
    writer.write(g2, p2, high_precision="fp16", quantized=pre)

    def digest(g):
        m = modelfile.export_graph(g)
        return hashlib.sha256(b"".join(n.SerializeToString() for n in m.graph.node)).hexdigest(), \
            sorted((t.name, t.raw_data) for t in m.graph.initializer)
    assert digest(g1) == digest(g2)
