"""--auto on big models: compact gated weights and staged evaluation (one stage's gated graph at a time).
Small in-code models cut into stages by force; the staged metrics of a mix must be the one-graph gated metrics
exactly, the staged sensitivities must rank like the exact ones, and the pass must meet its target."""
import json

import numpy as np
import onnx
import pytest
import tiny
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxopt import autoquant, metrics, modelfile, ort, pipeline
from onnxopt.autoquant import gated, staged
from onnxopt.cli import main
from onnxopt.passes import AutoQuant
from onnxopt.passes.autoquant import Feeds

D, L = 64, 8


def _deep(seed: int = 0) -> onnx.ModelProto:
    """L MatMul layers with residual adds, a few with outlier channels (sensitive to per-tensor activations),
    a Gemm (transB) and a Conv head, so stages cut through residuals and every weight layout is gated."""
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i in range(L):
        w = rng.normal(0, D ** -0.5, (D, D)).astype(np.float32)
        if i in (2, 5):
            w[:, 3 + i] *= 50.0 * i   # the next layer's input channel is an outlier...
        if i in (3, 6):
            w[5 + i - 1, :] /= 50.0 * (i - 1)  # ...that contributes normally
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"], name=f"layer{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        if i % 2 and i < 7:
            nodes.append(helper.make_node("Add", [f"r{i}", f"r{i - 1}"], [f"a{i}"], name=f"add{i}"))
            h = f"a{i}"
        else:
            h = f"r{i}"
    inits.append(numpy_helper.from_array(rng.normal(0, D ** -0.5, (D, D)).astype(np.float32), "wg"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (D,)).astype(np.float32), "bg"))
    nodes.append(helper.make_node("Gemm", [h, "wg", "bg"], ["g"], name="gemm", transB=1))
    inits.append(numpy_helper.from_array(np.array([-1, 16, 2, 2], np.int64), "shp"))
    nodes.append(helper.make_node("Reshape", ["g", "shp"], ["g4"], name="to_image"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.2, (16, 16, 3, 3)).astype(np.float32), "wc"))
    nodes.append(helper.make_node("Conv", ["g4", "wc"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    g = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 16, 2, 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return tiny.model_and_calib(tmp_path_factory.mktemp("staged"), _deep(), (40, D))


def _setup(model, calib, formats=("fp8", "int8", "int4"), block_size=32):
    graph = modelfile.import_graph(pipeline.load(str(model), 21))
    p = AutoQuant(formats, bits=8, block_size=block_size)
    cands = autoquant.candidates(graph, p.formats, p.configs(), block_size)
    x = np.load(calib)["x"]
    search, verify = Feeds([{"x": x[:16]}, {"x": x[16:30]}]), Feeds([{"x": x[30:]}])
    amax, means = autoquant.calibrate(graph, search, cands, provider="cpu", memory_budget_mb=512, progress=False)
    return graph, cands, amax, means, search, verify


def _gated(graph, cands, amax, means, block_size=32):
    g = modelfile.import_graph(modelfile.export_graph(graph))
    index = autoquant.build_gated(g, cands, amax, means, "fp32", block_size)
    shapes = autoquant.shape_outputs(g, list(cands.layers))
    return modelfile.export_graph(g, opset=21), index, shapes


@pytest.fixture(scope="module")
def setup(deep):
    return _setup(*deep)


def _exact(ev, keys):
    return {k: max(0.0, 1 - ev.metrics(ev.gates({k[0]: k[1]}))["cosine"]) for k in keys}


def test_compact_weights_give_the_same_sensitivities(setup, monkeypatch):
    graph, cands, amax, means, search, verify = setup
    res, size = {}, {}
    for compact in (False, True):
        monkeypatch.setattr(gated, "COMPACT_WEIGHTS", compact)
        model, index, shapes = _gated(graph, cands, amax, means)
        size[compact] = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(model))
        res[compact] = _exact(autoquant.Evaluator(model, index, search, verify, "cpu", shapes), index)
    assert {"fp8", "int8", "int4"} <= {f for _, f in res[True]}
    assert {"Gemm", "Conv", "MatMul"} <= {cands.layers[n].op for n, _ in res[True]}
    for k in res[True]:
        assert abs(res[True][k] - res[False][k]) <= 1e-6, k
    q = sum(l.params * (4 - staged.QBYTES[f]) for l in cands.layers.values() for f in l.formats if f != "none")
    assert size[False] - size[True] >= 0.9 * q   # 1 byte a parameter (INT4: 0.5) instead of 4


def _both(setup, n=3):
    graph, cands, amax, means, search, verify = setup
    fp32 = modelfile.export_graph(graph)
    where = staged.fp32_stages(fp32, n)
    model, index, shapes = _gated(graph, cands, amax, means)
    ev = autoquant.Evaluator(model, index, search, verify, "cpu", shapes)
    st = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False)
    return ev, st, cands


def test_staged_metrics_equal_the_gated_graph(setup):
    ev, st, cands = _both(setup)
    assert st.plan.n == 3 and st.peak_live == 1
    assert st.shapes == ev.shapes                               # MACs read from the same shapes
    rng = np.random.default_rng(0)
    for _ in range(4):
        mix = {n: l.formats[rng.integers(len(l.formats))] for n, l in cands.layers.items()}
        g = ev.gates(mix)
        np.testing.assert_array_equal(g, st.gates(mix))
        for split in ("search", "verify", "all", "held-out"):
            a, b = ev.metrics(g, split), st.metrics(g, split)
            assert abs(a["cosine"] - b["cosine"]) <= 1e-6 and a["top1"] == b["top1"], (split, a, b)
    assert st.metrics(st.zeros())["cosine"] == pytest.approx(1.0)
    # only the stages from the first one with a gate on run again
    loads = st.loads
    last = [k for k, i in st.index.items() if st.plan.gate_stages[i] == {st.plan.n - 1}][0]
    st.metrics(st.gates({last[0]: last[1]}))
    assert st.loads == loads + 1 and st.peak_live == 1


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_staged_sensitivities_rank_like_exact(setup):
    ev, st, cands = _both(setup)
    keys = list(ev.index)
    exact = _exact(ev, keys)
    approx = dict(st.sensitivities(keys, progress=False))
    assert set(approx) == set(keys) and st.peak_live == 1
    rho = _spearman([exact[k] for k in keys], [approx[k] for k in keys])
    assert rho >= 0.9, rho
    # on the scale of model-output error, not merely in rank: within a factor of 3 for the errors that matter
    big = [k for k in keys if exact[k] > 1e-4]
    ratio = np.array([approx[k] / exact[k] for k in big])
    assert np.median(ratio) == pytest.approx(1.0, rel=0.5) and np.all((ratio > 1 / 5) & (ratio < 5)), ratio


def _run(model, x):
    sess = ort.session(modelfile.load(model), level="disable")
    return sess.run(None, {"x": x})[0].reshape(len(x), -1).astype(np.float64)


@pytest.mark.parametrize("inline", [False, True], ids=["ifs", "inlined"])
def test_pass_with_stages_forced_meets_its_target(deep, tmp_path, monkeypatch, inline):
    """The whole pass through stages, with the gates as Ifs (the CPU form) and inlined (the CUDA form)."""
    made = staged.StagedEvaluator.__init__
    monkeypatch.setattr(staged.StagedEvaluator, "__init__", lambda self, *a, **k: made(self, *a, **k, inline=inline))
    model, calib = deep
    out, rep, sens = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "s.json"
    args = ["quantize", str(model), "--auto", "--target-cosine", "0.995", "--auto-stages", "3", "--calib", str(calib),
            "-o", str(out), "--report", str(rep), "--sensitivity", str(sens), "--high-precision", "fp32"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    a = json.loads(rep.read_text())["autoquant"]
    assert a["met"] is True and a["coverage"]["quantized"] >= 4
    x = np.load(calib)["x"][-10:]                    # the held-out quarter of the calibration samples
    assert metrics.mean_cosine_score(_run(model, x), _run(out, x)) >= 0.995
    assert all(l["macs"] > 0 for l in a["layers"].values())
    st = a["staged"]                                 # where the staged time went, in the report
    assert st["n"] == 3 and st["peak_live"] >= 1 and st["loads"] >= 3
    assert sum(v["candidates"] for v in st["stages"].values()) == sum(len(l["candidates"]) - 1 for l in a["layers"].values())
    # restartable, and the one-graph sensitivities are not taken for staged ones (nor the reverse)
    assert CliRunner().invoke(main, args).exit_code == 0
    assert json.loads(rep.read_text())["autoquant"]["measured_now"] == 0
    r = CliRunner().invoke(main, [a if a != "3" else "1" for a in args])
    assert r.exit_code == 0 and json.loads(rep.read_text())["autoquant"]["measured_now"] > 0


def test_one_stage_session_alive_at_a_time(setup, monkeypatch):
    """Each stage's session is the only one alive, and holds only its own weights (about a third here)."""
    from onnxopt import ort as ortx
    alive, peak, sizes = [0], [0], []
    real = ortx.session

    def counting(model, **kw):
        s = real(model, **kw)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        sizes.append(sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(model)))
        import weakref
        weakref.finalize(s, lambda: alive.__setitem__(0, alive[0] - 1))
        return s
    monkeypatch.setattr(ortx, "session", counting)
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    st = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, staged.fp32_stages(modelfile.export_graph(graph), 3),
                                progress=False)
    list(st.sensitivities(list(index), progress=False))
    st.metrics(st.gates({n: l.formats[-1] for n, l in cands.layers.items()}), "verify")
    assert peak[0] == 1 and len(sizes) > 6
    whole = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(model))
    assert max(sizes) < 0.6 * whole


def test_auto_stage_rule_and_option_errors(deep, setup, tmp_path, monkeypatch):
    graph, cands, *_ = setup
    fp32 = modelfile.export_graph(graph)
    total = sum(modelfile.tensor_bytes(t) for t in fp32.graph.initializer) + \
        sum(l.params * staged.QBYTES[f] for l in cands.layers.values() for f in l.formats if f != "none")
    assert staged.stages_needed(fp32, cands.layers, 4096) == 1
    budget = total / 3.5 / 2**20
    assert staged.stages_needed(fp32, cands.layers, budget) == 4
    assert staged.stages_needed(fp32, cands.layers, total / 1000 / 2**20) == staged.MAX_STAGES
    # a large model (many candidates) is staged for time even when it fits: here 27 candidates count as large
    monkeypatch.setattr(staged, "LARGE", 20)
    monkeypatch.setattr(staged, "PER_STAGE", 10)
    assert staged.stages_needed(fp32, cands.layers, 4096) == 3
    model, calib = deep
    r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--bits", "8", "--auto-stages", "99",
                                  "--calib", str(calib), "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "--auto-stages 99" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["quantize", str(model), "--fp8", "--auto-stages", "2", "--calib", str(calib)])
    assert r.exit_code == 2 and "--auto-stages" in r.output and "--auto only" in r.output


def test_stage_sessions_kept_within_the_budget(setup, monkeypatch):
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    mix = {n: l.formats[1] for n, l in cands.layers.items()}
    big = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                 memory_budget_mb=64)
    monkeypatch.setattr(staged, "GROUP", 1)                           # whole stages, not a few gates' Ifs
    a = big.metrics(big.gates(mix), "verify")
    loads = big.loads
    assert big.metrics(big.gates(mix), "verify") == a
    assert big.loads == loads and big.peak_live == 6                  # FP32 and gated stages kept: they fit 64 MB
    one = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                 memory_budget_mb=0.01)
    assert one.metrics(one.gates(mix), "verify") == a and one.peak_live == 1


def test_error_sessions_with_a_few_gates_give_the_same_errors(setup, monkeypatch):
    """Each error session keeps the Ifs of GROUP candidates only (the rest pass through): same numbers."""
    ev, st, cands = _both(setup)
    keys = list(st.index)
    s = 1
    mine = [k for k in keys if st.plan.gate_stages[st.index[k]] == {s}]
    whole = st._stage_errors(s, mine, False)
    monkeypatch.setattr(staged, "GROUP", 2)
    loads = st.loads
    parts = st._stage_errors(s, mine, False)
    assert st.loads - loads == -(-len(mine) // 2) + 1  # + the FP32 prefix run of the suffixes
    pruned = st.plan.proto(s, st.types, True, {st.index[mine[0]]})
    ifs = [n for n in pruned.graph.node if n.op_type == "If"]
    assert 0 < len(ifs) < sum(n.op_type == "If" for n in st.plan.proto(s, st.types, True).graph.node)
    for k in mine:
        assert parts[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-12)


@pytest.mark.slow
def test_tiny_sdxl_staged_sensitivities_rank_like_exact(tmp_path):
    """The tiny SDXL UNet (64x64 images) in 4 stages: 40 candidates across the stages, staged vs one-graph."""
    pytest.importorskip("diffusers")  # installed by the export extra (.ci/run)
    from models import sdxl_unet
    unet = str(sdxl_unet.export(tmp_path / "unet" / "unet.onnx", scale="tiny", seed=0))
    from onnxopt import attention_guard, calib, diffusion
    from onnxopt.passes.autoquant import split_feeds
    with modelfile.spilling(tmp_path):
        p = AutoQuant(("fp8", "int8"), target_cosine=0.99)
        graph = modelfile.import_graph(pipeline.load(unet, p.min_opset, tmp_path))
        attention_guard.remove(graph)
        npz = tmp_path / "calib.npz"
        diffusion.save_npz(diffusion.synthesize_sdxl(8, shapes=diffusion.SDXLShapes(height=64, width=64), seed=0), npz)
        data = calib.CalibData.from_path(npz, calib.input_specs(modelfile.export_graph(graph)))
        search, verify = split_feeds(data, 0.25, 16)
        cands = autoquant.candidates(graph, p.formats, p.configs(), 128)
        amax, means = autoquant.calibrate(graph, search, cands, provider="cpu", memory_budget_mb=4096, progress=False)
        where = staged.fp32_stages(modelfile.export_graph(graph), 4)
        model, index, shapes = _gated(graph, cands, amax, means, 128)
        keys = list(index)[:: len(index) // 40][:40]
        st = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, workdir=tmp_path, progress=False)
        approx = dict(st.sensitivities(keys, progress=False))
        mix = {n: l.formats[-1] for n, l in cands.layers.items()}
        m_staged = st.metrics(st.gates(mix), "verify")
        ev = autoquant.Evaluator(model, index, search, verify, "cpu", shapes)
        exact = _exact(ev, keys)
        assert abs(ev.metrics(ev.gates(mix), "verify")["cosine"] - m_staged["cosine"]) <= 1e-6
    assert st.plan.n == 4 and len({min(st.plan.gate_stages[index[k]]) for k in keys}) == 4
    assert _spearman([exact[k] for k in keys], [approx[k] for k in keys]) >= 0.9
    ratio = np.array([approx[k] / exact[k] for k in keys if exact[k] > 0])
    assert 0.5 < np.median(ratio) < 2.0


def test_cuda_stages_inline_their_gates(setup, monkeypatch):
    """On CUDA each If's subgraph holds a stream with its own cuBLAS handle (the full-size SDXL run failed in
    cublasCreate): CUDA stages carry no If, each gate is its then-branch under a Where. Same numbers as the Ifs
    (sessions made on the CPU here; the provider only picks the form)."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    made = ort.session
    monkeypatch.setattr(staged.ort, "session", lambda m, provider="cpu", **k: made(m, provider="cpu", **k))
    cuda = staged.StagedEvaluator(model, index, search, verify, "cuda", shapes, where, progress=False,
                                  memory_budget_mb=64)
    cpu = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                 memory_budget_mb=64)
    assert cuda.plan.inline and not cpu.plan.inline
    for s in range(cuda.plan.n):
        for errors, only in ((False, None), (True, None), (True, set(list(cuda.plan.stage_gates[s])[:2]))):
            ops = [n.op_type for n in cuda.plan.proto(s, cuda.types, errors, only).graph.node]
            assert "If" not in ops and ("Where" in ops) == (only is None or bool(only))
    rng = np.random.default_rng(1)
    for _ in range(3):
        mix = {n: l.formats[rng.integers(len(l.formats))] for n, l in cands.layers.items()}
        a, b = cuda.metrics(cuda.gates(mix), "all"), cpu.metrics(cpu.gates(mix), "all")
        assert abs(a["cosine"] - b["cosine"]) <= 1e-6 and a["top1"] == b["top1"]
    # the whole stages' sessions stay loaded for the next mix: no new load
    loads = cuda.loads
    mix = {n: l.formats[-1] for n, l in list(cands.layers.items())[:2]}
    assert cuda.metrics(cuda.gates(mix), "all")["cosine"] == pytest.approx(cpu.metrics(cpu.gates(mix), "all")["cosine"],
                                                                           abs=1e-6)
    assert cuda.loads == loads
    keys = [k for k in index if cuda.plan.gate_stages[index[k]] == {1}]
    x, y = cuda._stage_errors(1, keys, False), cpu._stage_errors(1, keys, False)
    for k in keys:
        assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-12)


def test_bound_inputs_keep_their_rank():
    """A scalar crossing a stage boundary (Gather of a Shape) is bound as a scalar, not as a 1-element vector."""
    for a in (np.array(7, np.int64), np.zeros((2, 3), np.float32)[:, ::2], np.ones(4, np.float32)):
        v = staged.onnxruntime_value(a, "cpu")
        assert v.shape() == list(a.shape)
        np.testing.assert_array_equal(v.numpy(), a)


def test_inlined_error_sessions_hold_many_candidates(setup, monkeypatch):
    """Inlined gates (the CUDA form) cost a Q/DQ each, not an If: one error session holds up to GROUP_INLINE
    candidates (full-size SDXL: ~1 session a stage instead of 5). Same errors as GROUP at a time, and as the Ifs."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    monkeypatch.setattr(staged, "UNIFIED", False)  # error sessions of their own (the unified stage: next test)
    inl = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False, inline=True)
    ifs = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False)
    s = 1
    mine = [k for k in index if inl.plan.gate_stages[index[k]] == {s}]
    assert 2 < len(mine) <= staged.GROUP_INLINE
    loads = inl.loads
    many = inl._stage_errors(s, mine, False)
    assert inl.loads - loads == 1
    monkeypatch.setattr(staged, "GROUP_INLINE", 2)
    few = inl._stage_errors(s, mine, False)
    assert inl.loads - loads == 1 + -(-len(mine) // 2) + 1  # + the FP32 prefix run of the suffixes
    by_if = ifs._stage_errors(s, mine, False)
    for k in mine:
        assert many[k] == pytest.approx(few[k], rel=1e-6, abs=1e-12)
        assert many[k] == pytest.approx(by_if[k], rel=1e-5, abs=1e-12)



def test_unified_stage_sessions_load_once_per_stage(setup, monkeypatch):
    """Inlined gates (CUDA): one session a stage serves the FP32 reference, every candidate's error, the gain
    probes and the verifications (was an FP32, an error and a whole session a stage: ~1 s a load on the GPU).
    The same reference outputs, sensitivities and verified metrics as separate sessions and as the Ifs."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    monkeypatch.setattr(staged, "SUFFIX", False)  # no split by measured times here (the next tests)
    one = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                 memory_budget_mb=64, inline=True)
    assert one.unified and one.loads == one.plan.n  # the reference loaded each stage once
    assert all(one.types[o].size == 0 for o in one.types)  # dtype and rank only, no batch kept
    ifs = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                 memory_budget_mb=64)
    monkeypatch.setattr(staged, "UNIFIED", False)
    sep = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                 memory_budget_mb=64, inline=True)
    assert not sep.unified
    for b in one.refout:
        np.testing.assert_array_equal(one.refout[b], ifs.refout[b])
    keys = [k for k in index if len(one.plan.gate_stages[index[k]]) == 1]
    a, b, c = (dict(e.sensitivities(keys, progress=False)) for e in (one, sep, ifs))
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-12) and a[k] == pytest.approx(c[k], rel=1e-5, abs=1e-12)
    mix = {n: min(l.error, key=l.error.get) if getattr(l, "error", None) else l.formats[-1]
           for n, l in cands.layers.items()}
    assert one.metrics(one.gates(mix), "all")["cosine"] == pytest.approx(ifs.metrics(ifs.gates(mix), "all")["cosine"],
                                                                         abs=1e-7)
    assert one.loads == one.plan.n  # errors, gains and the verification loaded nothing more
    assert sep.loads > 2 * sep.plan.n


def test_chains_run_batch_by_batch_in_memory_where_the_stages_stay_loaded(setup):
    """Where every stage session of a chain stays loaded (inlined gates: whole and FP32 stages), a chain runs each
    batch through all stages with the tensors between stages in memory (no .npy per stage and batch): the same
    metrics and gains, bit for bit, as stage by stage through disk."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    mem = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                 memory_budget_mb=64, inline=True)
    disk = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                  memory_budget_mb=0.01, inline=True)
    rng = np.random.default_rng(2)
    for _ in range(3):
        mix = {n: l.formats[rng.integers(len(l.formats))] for n, l in cands.layers.items()}
        g = mem.gates(mix)
        start = mem._start(g)
        assert mem._fit({s: None for s in range(start, mem.plan.n)}) and not disk._fit({s: None for s in range(start, disk.plan.n)})
        for split in ("search", "all"):
            assert mem.metrics(g, split) == disk.metrics(g, split)
        a, b = mem._chain(g, mem.ids["search"], start), disk._chain(g, disk.ids["search"], start)
        assert a[1] == b[1] and all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
    loads = mem.loads
    mem.metrics(mem.gates({n: l.formats[-1] for n, l in cands.layers.items()}), "all")
    assert mem.loads == loads  # every stage stayed loaded


def test_if_chains_reuse_the_loaded_whole_stage(setup, monkeypatch):
    """The If form without fixed stages (staged.FIXED off; chains of candidates spanning stages run so): a mix with
    a few gates on in a stage runs on that stage's whole session where it stays loaded, not on a session of its own
    made per mix (each ~0.4 s to load on the CPU): no load after the first, and the same metrics as a session of the
    few Ifs."""
    monkeypatch.setattr(staged, "FIXED", False)
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    big = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False, memory_budget_mb=64)
    tiny_budget = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                         memory_budget_mb=0.01)
    names = list(cands.layers)
    mixes = [{names[i]: cands.layers[names[i]].formats[-1], names[-1 - i]: cands.layers[names[-1 - i]].formats[0]}
             for i in range(3)]
    big.metrics(big.gates(mixes[0]), "all")
    loads = big.loads
    for mix in mixes:
        a, b = big.metrics(big.gates(mix), "all"), tiny_budget.metrics(tiny_budget.gates(mix), "all")
        assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-7) and a["top1"] == b["top1"]
    assert big.loads == loads


@pytest.mark.parametrize("inline", [False, True], ids=["ifs", "inlined"])
def test_suffix_error_sessions_skip_the_fp32_prefix(setup, monkeypatch, inline):
    """Candidates in the order their layers run, in groups whose sessions hold only what the group's gates can
    change (the FP32 tensors they read computed once per batch): the same errors as whole-stage sessions, on
    sessions of fewer nodes (later groups fewer still)."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 2)
    monkeypatch.setattr(staged, "UNIFIED", False)
    ev = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False, inline=inline)
    s = 1
    mine = [k for k in index if ev.plan.gate_stages[index[k]] == {s}]
    assert len(mine) >= 9
    monkeypatch.setattr(staged, "SUFFIX", False)
    whole = ev._stage_errors(s, mine, False)
    monkeypatch.setattr(staged, "SUFFIX", True)
    monkeypatch.setattr(staged, "GROUP", 3)
    monkeypatch.setattr(staged, "GROUP_INLINE", 3)
    pos = ev.plan.gate_positions(s)
    order = sorted(mine, key=lambda k: (pos[index[k]], index[k]))
    sizes = []
    for g in range(0, len(order), 3):
        gates = {index[k] for k in order[g:g + 3]}
        nodes, frontier = ev.plan.nodes(s, gates, gates)
        sizes.append(len(nodes))
        assert frontier or g == 0
    assert sizes[-1] < sizes[0] < len(ev.plan.nodes(s, {index[k] for k in order})[0])
    parts = ev._stage_errors(s, mine, False)
    for k in mine:
        assert parts[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-12), k


def test_unified_stage_splits_into_suffixes_where_it_pays(setup, monkeypatch):
    """Unified (CUDA) stages: one group, unless m suffix sessions save more forward time than m loads cost;
    the errors are the same either way."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 2)
    ev = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False, inline=True,
                                memory_budget_mb=64)
    s = 1
    mine = [k for k in index if ev.plan.gate_stages[index[k]] == {s}]
    ev.stats["load_s"], ev.loads = 1.0, 1        # a load costs 1 s
    ev.stats["forward_s"][s] = 1e-4              # a cheap stage: one group
    assert len(ev._groups(s, mine)[0]) == 1
    one = ev._stage_errors(s, mine, False)
    ev.stats["forward_s"][s] = 1.0               # an expensive one: suffixes
    groups, suffix = ev._groups(s, mine)
    assert suffix and 2 <= len(groups) <= staged.MAX_SUFFIXES and sum(map(len, groups)) == len(mine)
    split = ev._stage_errors(s, mine, False)
    for k in mine:
        assert split[k] == pytest.approx(one[k], rel=1e-6, abs=1e-12), k


def _mixes(cands, n, seed):
    rng = np.random.default_rng(seed)
    return [{name: l.formats[rng.integers(len(l.formats))] for name, l in cands.layers.items()} for _ in range(n)]


def test_fixed_stages_give_the_whole_stage_metrics(setup, monkeypatch):
    """Verifications and gain probes run a mix's own stages (no If; equal Q/DQ shared; weights dequantized once by
    ORT's kernel): the metrics and the stage errors of the whole-stage If chains, and each mix's stages load once."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)

    def ev():
        return staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                      memory_budget_mb=64)
    fixed, ifs = ev(), ev()
    for mix in _mixes(cands, 3, 5):
        g = fixed.gates(mix)
        start = fixed._start(g)
        monkeypatch.setattr(staged, "FIXED", False)
        want = {split: ifs.metrics(g, split) for split in ("search", "all", "held-out")}
        chain = ifs._chain(g, ifs.ids["search"], start, fixed=True)
        monkeypatch.setattr(staged, "FIXED", True)
        for split, w in want.items():
            got = fixed.metrics(g, split)
            assert got["top1"] == w["top1"] and got["cosine"] == pytest.approx(w["cosine"], abs=1e-9), (split, got, w)
        got = fixed._chain(g, fixed.ids["search"], start, fixed=True)
        assert got[1] == pytest.approx(chain[1], rel=1e-5)
        for b in got[0]:
            np.testing.assert_allclose(got[0][b], chain[0][b], rtol=1e-5, atol=1e-6)
        loads = fixed.loads
        fixed.metrics(g, "all")                      # the mix's stages stay loaded: no load the second time
        assert fixed.loads == loads
    assert any(k[1] == "fixed" for k in fixed.cached)


def test_fixed_stage_has_no_if_and_shares_equal_qdq():
    """fixed_stage.prepared: one Q/DQ pair where several nodes quantize the same tensor with equal scales, weights'
    DequantizeLinear replaced by their values, and the outputs bit for bit those of the unprepared stage."""
    from onnxopt.autoquant import fixed_stage
    rng = np.random.default_rng(0)
    nodes, inits = [], [numpy_helper.from_array(np.array(0.05, np.float32), "s0"),
                        numpy_helper.from_array(np.array(0.05, np.float32), "s1"),
                        numpy_helper.from_array(np.array(0, np.int8), "z0"),
                        numpy_helper.from_array(np.array(0, np.int8), "z1")]
    for i in range(3):  # three projections of x, each with its own (equal) activation Q/DQ and a quantized weight
        si = f"s{min(i, 1)}"
        zi = f"z{min(i, 1)}"
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (8, 4)).astype(np.int8), f"q{i}"),
                  numpy_helper.from_array(np.array(0.01 * (i + 1), np.float32), f"ws{i}")]
        nodes += [helper.make_node("QuantizeLinear", ["x", si, zi], [f"xq{i}"], name=f"Q{i}"),
                  helper.make_node("DequantizeLinear", [f"xq{i}", si, zi], [f"xd{i}"], name=f"DQ{i}"),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"ws{i}"], [f"w{i}"], name=f"WDQ{i}"),
                  helper.make_node("MatMul", [f"xd{i}", f"w{i}"], [f"y{i}"], name=f"mm{i}")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 4]) for i in range(3)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    before = onnx.ModelProto()
    before.CopyFrom(m)
    estimate = fixed_stage.prepared_bytes(m)  # what the budget check counts, before anything is dequantized
    out = fixed_stage.prepared(m, "cpu", 1)
    made = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(out))
    assert abs(estimate - made) <= 0.1 * made  # the float32 weights counted, not their 1-byte codes
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1 and ops.count("MatMul") == 3
    assert not {"q0", "q1", "q2"} & {t.name for t in out.graph.initializer}
    x = {"x": rng.normal(0, 1, (2, 8)).astype(np.float32)}
    for a, b in zip(ort.session(before).run(None, x), ort.session(out).run(None, x)):
        np.testing.assert_array_equal(a, b)


def test_threads_and_fixed_stages_give_the_reference_sensitivities(setup, monkeypatch):
    """The sensitivities with one intra-op thread and fixed gain probes against the path before them (ORT's default
    threads, whole-stage gain chains): the same up to float rounding, the same order, the same forwards."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    got, runs = {}, {}
    for ref in (True, False):
        monkeypatch.setattr(staged, "FIXED", not ref)
        monkeypatch.setattr(staged, "CPU_THREADS", 0 if ref else 1)
        st = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                    memory_budget_mb=64)
        count = {"n": 0}
        real = ort.run

        def counted(*a, **k):  # stage forwards (the fixed stages' one weight dequantization not counted)
            count["n"] += str(k.get("label", "")).startswith("stage")
            return real(*a, **k)
        monkeypatch.setattr(ort, "run", counted)
        got[ref] = dict(st.sensitivities(list(index), progress=False))
        monkeypatch.setattr(ort, "run", real)
        runs[ref] = count["n"]
    keys = list(index)
    assert runs[True] == runs[False] > 0  # the same chained stage runs (gain probes, prefixes), fixed or not
    for k in keys:
        assert got[False][k] == pytest.approx(got[True][k], rel=1e-4, abs=1e-12), k
    assert _spearman([got[True][k] for k in keys], [got[False][k] for k in keys]) == pytest.approx(1.0)


def test_concurrent_cpu_runs_give_the_same_bits(setup, monkeypatch):
    """Candidates of a group and batches of a chain run CPU_STREAMS at a time on the CPU (one intra-op thread
    each): every sensitivity, gain and verified metric bit for bit those of one at a time."""
    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    got = {}
    for streams in (1, 2):
        monkeypatch.setattr(staged, "CPU_STREAMS", streams)
        st = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False,
                                    memory_budget_mb=64)
        sens = dict(st.sensitivities(list(index), progress=False))
        mets = [st.metrics(st.gates(mix), "held-out") for mix in _mixes(cands, 3, 7)]
        got[streams] = (sens, [st.stats["stages"][s]["gain"] for s in sorted(st.stats["stages"])], mets)
    assert got[1] == got[2]


def test_a_dropped_evaluator_frees_its_sessions(setup):
    """Once the pass lets go of the evaluator, it and the sessions it cached are freed (a finalizer bound to the
    evaluator once kept both alive to the end of the process: +250 MB peak on the tiny SDXL UNet's --auto)."""
    import gc
    import weakref

    graph, cands, amax, means, search, verify = setup
    model, index, shapes = _gated(graph, cands, amax, means)
    where = staged.fp32_stages(modelfile.export_graph(graph), 3)
    st = staged.StagedEvaluator(model, index, search, verify, "cpu", shapes, where, progress=False, memory_budget_mb=64)
    mix = {n: l.formats[1] for n, l in cands.layers.items()}
    st.metrics(st.gates(mix), "verify")
    assert st.live >= 1 and len(st.cached) >= 1
    sessions = [weakref.ref(v[0]) for v in st.cached.values()]
    gone = weakref.ref(st)
    del st
    gc.collect()
    assert gone() is None and all(s() is None for s in sessions)


def test_pruned_stages_keep_exactly_the_gate_reads_their_ifs_need(setup):
    """A stage proto with a few gates on keeps, of the gates' Gather/Greater nodes, exactly those some kept node
    (an If, another gate read) or a stage output reads: none left dangling, none missing (the session loads)."""
    from onnxopt.autoquant.stage_plan import node_reads
    _, st, _ = _both(setup)
    rng = np.random.default_rng(1)
    for s in range(st.plan.n):
        gates = sorted(st.plan.stage_gates.get(s, ()))
        for only in (set(), set(gates), set(rng.choice(gates, len(gates) // 2, replace=False).tolist()) if gates else set()):
            for kw in ({}, {"fixed": True}):
                m = st.plan.proto(s, st.types, only=only, **kw)
                read = {r for n in m.graph.node for r in node_reads(n)} | {o.name for o in m.graph.output}
                gate_nodes = [n for n in m.graph.node if n.op_type in ("Gather", "Greater")]
                assert all(any(o in read for o in n.output) for n in gate_nodes), (s, only, kw)
                assert {st.plan.gate_by_node[n.name] for n in m.graph.node if n.op_type == "If"} <= (set() if kw else only)
                assert not kw or not gate_nodes  # fixed: the gates are on for good, nothing reads them
                ort.session(m)  # every read has its producer


def test_gated_graph_is_the_same_at_any_thread_count(setup, tmp_path, monkeypatch):
    """build_gated makes the weights' numbers on worker threads (spilling their codes there) and edits the graph on
    the caller's: one thread and three give the same gated graph, names, values and order, byte for byte."""
    graph, cands, amax, means, _, _ = setup
    monkeypatch.setattr(modelfile, "SPILL_BYTES", 0)  # every new weight spilled, from the worker threads too
    out = {}
    for n in (1, 3):
        with modelfile.spilling(tmp_path):
            g = modelfile.import_graph(modelfile.export_graph(graph))
            index = autoquant.build_gated(g, cands, amax, means, "fp16", 32, threads=n)
            m = modelfile.export_graph(g, opset=21)
            assert any(t.external_data for t in modelfile.all_tensors(m))  # spilled codes, read back below
            modelfile.internalize(m)
        out[n] = (m.SerializeToString(), index)
    assert {f for _, f in out[3][1]} >= {"fp8", "int8", "int4"}
    assert out[1] == out[3]


@pytest.mark.parametrize("stages", ["3", "1"])
def test_final_write_takes_the_gated_codes(deep, tmp_path, monkeypatch, stages):
    """The final graph's per-channel FP8/INT8 weights are the codes the gated graph made (each weight quantized once
    per format): the writer quantizes none of them again, and the file is the one it writes when it does (staged:
    the one write; one graph: the verified written graph)."""
    from onnxopt.passes import autoquant as aq_pass
    from onnxopt.quant import writer
    model, calib = deep
    made = writer.quantize_job
    calls = []
    monkeypatch.setattr(writer, "quantize_job", lambda job: calls.append(job.const.name) or made(job))
    out = {}
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(aq_pass, "_chosen_codes", lambda codes, mix: {})
        calls.clear()
        o, rep = tmp_path / f"o_{reuse}.onnx", tmp_path / f"r_{reuse}.json"
        r = CliRunner().invoke(main, ["quantize", str(model), "--auto", "--formats", "fp8,int8", "--target-cosine", "0.9",
                                      "--auto-stages", stages, "--calib", str(calib), "-o", str(o), "--report", str(rep)])
        assert r.exit_code == 0, r.output
        layers = json.loads(rep.read_text())["autoquant"]["layers"]
        written = sum(l["choice"] in ("fp8", "int8") for l in layers.values())
        out[reuse] = o.read_bytes()
        if reuse:  # the Gemm and the Conv among them: their bias corrections from the gated graph's shifts too
            assert written >= 4 and calls == []
            assert all(layers[n].get("bias_correction") for n in ("gemm", "conv")), layers
        else:
            assert len(calls) >= written
    assert out[True] == out[False]
