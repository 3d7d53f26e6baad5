"""Memory stays bounded on big models (issues 24/25: full-size SDXL --fp8/--int8/--nvfp4 within 2 GiB): the weight
writer's worker threads hold at most a byte budget of weights at once, whatever the thread count, and write the
same graph as one thread; 4-bit codes (NVFP4, INT4) are spilled packed instead of held until the save."""
import threading
import tracemalloc

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.external_data_helper import uses_external_data

from onnxopt import QDQ, formats, modelfile, opset_upgrade, threads
from onnxopt.quant import rules, writer

DIM = 1024               # 4 MiB of FP32 per weight: its 1 MiB of FP8 codes is spilled
LAYERS = 16


def test_ordered_map_holds_at_most_the_byte_budget():
    sizes = [(i * 7919) % 13 + 1 for i in range(60)]  # bytes of each item, uneven
    lock, live, peak = threading.Lock(), [0], [0]

    def work(i):
        with lock:  # from the start of its work (after its submission) ...
            live[0] += sizes[i]
            peak[0] = max(peak[0], live[0])
        return i

    got = []
    for i in threads.ordered_map(work, range(len(sizes)), threads=6, cost=lambda i: sizes[i], budget=20):
        got.append(i)
        with lock:  # ... until the consumer is done with its result and comes back for the next
            live[0] -= sizes[i]
    assert got == list(range(len(sizes)))
    assert peak[0] <= 20
    # one item bigger than the budget still runs, alone
    assert list(threads.ordered_map(lambda i: i, [0, 1, 2], threads=4, cost=lambda i: 100, budget=10)) == [0, 1, 2]


def _model(d) -> str:
    """LAYERS MatMuls of DIM x DIM FP32 weights (4 MiB each) in an external data file, as big models come."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(LAYERS):
        inits.append(nh.from_array((rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32), f"w{i}"))
        nodes += [h.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  h.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    g = h.make_graph(nodes, "stack", [h.make_tensor_value_info("x", T.FLOAT, [4, DIM])],
                     [h.make_tensor_value_info(x, T.FLOAT, [4, DIM])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 19)])
    m.ir_version = 9
    path = str(d / "stack.onnx")
    onnx.save(m, path, save_as_external_data=True, location="stack.onnx.data", size_threshold=1024)
    return path


def _write(path, work, n_threads: int, budget: int) -> tuple[dict, int]:
    """The FP8 writer on the lazily loaded model: ({initializer: bytes}, tracemalloc peak during the write)."""
    graph = modelfile.import_graph(opset_upgrade.infer_shapes(modelfile.load(path)))
    place = rules.plan(graph, QDQ(formats.FP8.name))
    plan = writer.QuantPlan.uniform(formats.FP8.name, place, {a: 4.0 for a in place.activations}, {})
    with modelfile.spilling(work):
        tracemalloc.start()
        try:
            writer.write(graph, plan, high_precision="fp32", threads=n_threads, in_flight_bytes=budget)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        model = modelfile.export_graph(graph)
        out = {t.name: modelfile.to_array(t).tobytes() for t in model.graph.initializer}
    return out, peak


def test_writer_threads_hold_at_most_the_budget_and_write_the_same_graph(tmp_path):
    path = _model(tmp_path)
    weight = DIM * DIM * 4
    budget = 2 * writer.JOB_FP32_COPIES * weight  # two weights' work at a time
    one, _ = _write(path, tmp_path, 1, 0)
    bounded, peak_bounded = _write(path, tmp_path, 8, budget)
    _, peak_free = _write(path, tmp_path, 8, 1 << 40)  # no byte budget: only the window of 16 items
    assert bounded == one  # byte-identical codes and scales
    assert sum(k.endswith("_quantized") for k in one) == LAYERS
    assert peak_bounded <= budget + weight, peak_bounded / weight   # (+ the graph's scales and names)
    assert peak_free > 1.5 * budget, peak_free / weight             # what 8 threads hold without it


def test_fp4_and_int4_codes_spill_packed(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1024, 2048)).astype(np.float32)  # 2 M codes: 1 MiB packed, above the spill threshold
    fp4 = formats.get("nvfp4")
    p = fp4.quantize_parts(w)
    int4 = formats.get("int4")
    q4, _ = int4.quantize_weight(w, 1, "fp32", block_size=128)
    with modelfile.spilling(tmp_path):
        for f, codes in ((fp4, p.codes), (int4, q4)):
            c = f.weight_constant(f"{f.name}_codes", codes)
            t = c._values.tensor
            assert uses_external_data(t)  # on disk, not in the graph
            assert modelfile.tensor_bytes(t) == codes.size // 2          # two codes a byte
            back = modelfile.to_array(t)
            assert back.shape == codes.shape
            assert np.array_equal(back.view(np.uint8) & 0x0F, np.asarray(codes).astype(back.dtype).view(np.uint8) & 0x0F)
    # outside a quantize run: in memory, packed, as before
    c = fp4.weight_constant("mem", p.codes[:16])
    assert not uses_external_data(c._values.tensor)
    assert np.array_equal(modelfile.to_array(c._values.tensor).view(np.uint8), p.codes[:16].view(np.uint8))


def test_one_file_save_is_streamed_byte_for_byte(tmp_path):
    """A model saved as one file: the same bytes as internalize + SerializeToString (FP32, packed FP4, FP8 spilled
    tensors, small embedded ones), and afterwards the model reads its weights from the saved file."""
    rng = np.random.default_rng(2)
    fp4 = formats.get("nvfp4")
    src = _model(tmp_path)  # external FP32 weights
    m = modelfile.load(src)
    with modelfile.spilling(tmp_path):
        graph = modelfile.import_graph(m)
        p = fp4.quantize_parts(rng.standard_normal((2048, 1024)).astype(np.float32))
        extra = [fp4.weight_constant("codes_big", p.codes), fp4.weight_constant("codes_small", p.codes[:32]),
                 modelfile.constant("fp8_big", formats.get("fp8").cast(rng.standard_normal((1024, 1024)).astype(np.float32))),
                 modelfile.constant("small", np.arange(6, dtype=np.float32))]
        for i, c in enumerate(extra):  # read by Identity nodes so that export keeps them
            graph.nodes.append(onnx_gs_identity(c, f"id{i}"))
            graph.outputs.append(graph.nodes[-1].outputs[0])
        model = modelfile.export_graph(graph)
        del graph
        expect = onnx.ModelProto()
        expect.CopyFrom(model)
        modelfile.internalize(expect)
        want = expect.SerializeToString()
        values = {t.name: modelfile.to_array(t) for t in expect.graph.initializer}
        out = modelfile.save(model, tmp_path / "one.onnx", external_data=False)
    assert out.read_bytes() == want
    assert all(np.array_equal(modelfile.to_array(t).view(np.uint8), values[t.name].view(np.uint8))
               for t in model.graph.initializer)  # lazy on the saved file (the spill file is gone)


def onnx_gs_identity(c, name):
    import onnx_graphsurgeon as gs
    return gs.Node("Identity", name=name, inputs=[c], outputs=[gs.Variable(f"{name}_out", dtype=None)])
