"""ONNX Runtime sessions over lazily loaded models (external data stays on disk)."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper

from . import modelfile
from .errors import OnnxoptError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
_PROTO_LIMIT = 1_800_000_000
_EP = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_INSTALL = "install onnxruntime-gpu with a CUDA 13 stack (CUDA 13 runtime, cuBLAS, cuDNN 9)"
log = logging.getLogger(__name__)
_fallen_back: set[str] = set()  # providers the user allowed to fall back to the CPU


def check_provider(name: str, allow_fallback: bool = False) -> list[str]:
    """ORT providers for `name` ("cpu" | "cuda"), after checking that ORT really runs on it: with
    onnxruntime-gpu but no CUDA libraries, ORT prints an error and silently uses the CPU. An unavailable
    provider is an OnnxoptError naming what to install, or with `allow_fallback` one warning and the CPU."""
    if name not in PROVIDERS:
        raise OnnxoptError(f"unknown provider '{name}'; use one of {', '.join(PROVIDERS)}")
    reason = _unavailable(name)
    if reason is None:
        return list(PROVIDERS[name])
    if not allow_fallback:
        raise OnnxoptError(f"ONNX Runtime cannot use {name.upper()} here ({reason}); {_INSTALL}, "
                           f"or pass --allow-cpu-fallback to run on the CPU")
    if name not in _fallen_back:
        log.warning("ONNX Runtime cannot use %s here (%s); running on the CPU", name.upper(), reason)
        _fallen_back.add(name)
    return list(PROVIDERS["cpu"])


@functools.lru_cache(maxsize=None)
def _unavailable(name: str) -> str | None:
    """Why ORT cannot run on `name` (None: it can), found by creating a session on a one-node model."""
    ep = _EP[name]
    if ep not in ort.get_available_providers():
        return f"this onnxruntime build has no {ep}"
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    err = []
    with _captured_stderr(err):
        try:
            got = ort.InferenceSession(m.SerializeToString(), providers=PROVIDERS[name]).get_providers()
        except Exception as e:  # noqa: BLE001 - any failure means the provider is unusable
            return _first_line(e)
    if ep in got:
        return None
    found = re.search(r"with error: ([^\n\x1b]+)", "".join(err))
    return found.group(1).strip()[:200] if found else f"{ep} failed to start"


@contextlib.contextmanager
def _captured_stderr(into: list):
    """ORT's C++ logger writes to file descriptor 2: keep its red lines for the one-line error instead."""
    with tempfile.TemporaryFile("w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            into.append(f.read())


# cuDNN's exhaustive search benchmarks every algorithm of each Conv node on its first run in each session:
# onnxopt's sessions are many and short (a staged search loads ~150 on the full SDXL UNet, each run a few
# batches), so the search would cost more than the fastest algorithm saves. The heuristic pick is immediate.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def _providers(provider: str) -> list:
    names = list(PROVIDERS["cpu"]) if provider in _fallen_back else check_provider(provider)
    return [(n, dict(CUDA_OPTIONS)) if n == "CUDAExecutionProvider" else n for n in names]


def session(model: onnx.ModelProto, *, provider: str = "cpu", level: str = "disable",
            threads: int = 0, lean: bool = False, shared: bool = False) -> ort.InferenceSession:
    """An InferenceSession for a model whose external tensors carry absolute locations (see modelfile.load).

    ORT refuses absolute external-data paths, so locations are made relative to their folder, which the
    session is told about. ORT_DISABLE_ALL (the default) simulates Q/DQ exactly; higher levels fuse them
    into integer kernels. `shared`: inside `device_weights`, big external weights come from its one device copy.
    """
    providers = _providers(provider)
    so = _options(level, threads, lean)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    modelfile.stamp_ir_version(m)
    weights = _SHARED.get()
    kept = []
    if shared and weights is not None:
        try:
            kept = weights.add_to(m, so)
        except _NotShared:
            so = _options(level, threads, lean)  # some were given before it failed: start over without them
    folders = set()
    for t in modelfile.all_tensors(m):
        if external_data_helper.uses_external_data(t):
            folders.add(os.path.dirname(external_data_helper.ExternalDataInfo(t).location))
    try:
        if m.ByteSize() > _PROTO_LIMIT:
            return _keeping(_session_via_file(m, so, providers), kept)
        if folders:
            base = os.path.commonpath(list(folders))
            for t in modelfile.all_tensors(m):
                if external_data_helper.uses_external_data(t):
                    modelfile.set_location(t, os.path.relpath(external_data_helper.ExternalDataInfo(t).location, base))
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", base)
        return _keeping(ort.InferenceSession(m.SerializeToString(), so, providers=providers), kept)
    except OnnxoptError:
        raise
    except Exception as e:
        raise OnnxoptError(f"ONNX Runtime cannot load the model: {_first_line(e)}") from None


SHARE_BYTES = 1 << 20   # external weights from this size on are shared on the device inside `device_weights`
UPLOAD_THREADS = 4      # weights read and copied to the device at once (each holds one weight on the host meanwhile)
_SHARED: contextvars.ContextVar = contextvars.ContextVar("onnxopt_device_weights", default=None)


@contextlib.contextmanager
def device_weights(provider: str, device: str | None = None):
    """Within this block, calibration sessions (`session(..., shared=True)`) on CUDA take their big external weights
    from one copy on the device, read and copied once (on threads) and given to ORT as user initializers, which ORT
    uses in place: SmoothQuant's statistics pass and the Q/DQ calibration read the same bytes of the same file (the
    fold's products are multiplied in the graph, `lazyscale`), so the second session copies no weight. `device`
    forces a device ("cpu": tests). Released at the end of the block."""
    device = device or ("cuda" if runs_on_cuda(provider) else None)
    if device is None:
        yield None
        return
    cache = _DeviceWeights(device)
    token = _SHARED.set(cache)
    try:
        yield cache
    finally:
        _SHARED.reset(token)
        cache.values.clear()


class _DeviceWeights:
    """{(file, offset, length, type, dims): (the OrtValue owning the device copy, a non-owning view for ORT)}."""

    def __init__(self, device: str):
        self.device = device
        self.values: dict = {}
        self.uploads = 0
        self.broken = False
        self.lock = threading.Lock()  # sessions built on several threads (calib.collect's sessions ahead)

    def add_to(self, m: onnx.ModelProto, so) -> list:
        """Give `so` the device copies of `m`'s big external weights (read and copied now where missing); returns
        them, for the session to keep alive."""
        with self.lock:
            return self._add_to(m, so)

    def _add_to(self, m: onnx.ModelProto, so) -> list:
        if self.broken:
            return []
        wanted = []
        for t in m.graph.initializer:
            if (external_data_helper.uses_external_data(t) and t.data_type in _SHAREABLE
                    and modelfile.tensor_bytes(t) >= SHARE_BYTES):
                info = external_data_helper.ExternalDataInfo(t)
                wanted.append((t.name, (os.path.abspath(info.location), info.offset or 0, info.length or 0, t.data_type,
                                        tuple(t.dims)), t))
        missing = {k: t for _, k, t in wanted if k not in self.values}
        try:
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="onnxopt-upload") as pool:
                for k, v in zip(missing, pool.map(self._upload, missing.values())):
                    self.values[k] = v
            for name, k, _ in wanted:
                so.add_initializer(name, self.values[k][1])
        except Exception as e:  # noqa: BLE001 - an ORT build without DLPack or user initializers: ORT loads them itself
            log.info("weights not shared on the device (%s); each session copies its own", _first_line(e))
            self.broken = True
            self.values.clear()
            raise _NotShared from None
        return [self.values[k] for _, k, _ in wanted]

    def _upload(self, t: onnx.TensorProto):
        owner = ort.OrtValue.ortvalue_from_numpy(modelfile.to_array(t), self.device, 0)
        self.uploads += 1
        # ORT takes user initializers only if it does not own their buffer: a DLPack view of the same memory
        return owner, ort.OrtValue(ort.capi._pybind_state.OrtValue.from_dlpack(owner._ortvalue.to_dlpack(), False))


class _NotShared(Exception):
    """Sharing failed after some user initializers were given: the session must be built without them."""


_SHAREABLE = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _keeping(sess: ort.InferenceSession, kept: list) -> ort.InferenceSession:
    if kept:
        sess.onnxopt_shared_weights = kept  # ORT uses them in place: they live as long as the session
    return sess


def _options(level: str, threads: int, lean: bool) -> ort.SessionOptions:
    """Session options for `session` (a fresh object each call: user initializers are added to it)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 4  # failures come back as exceptions, which become one error line; no red log lines
    # ORT's buffer-reuse planner scales with tensors x free buffers and compares symbolic shapes as strings: 11 of
    # the 12 s a quantized tiny SDXL UNet's session took (5100 nodes), 0.3 s without it. Tensors are still freed
    # after their last reader, so peak memory stayed the same (tools/session_load.py).
    so.enable_mem_reuse = False
    if threads:
        so.intra_op_num_threads = threads
    if level == "disable":
        # Graph order: a weight's DequantizeLinear runs just before its layer. The default order runs
        # every DQ first (they have no activation inputs) and holds all the dequantized weights at once.
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if lean:  # memory over speed (calibration of big models)
        so.add_session_config_entry("session.disable_prepacking", "1")  # packed GEMM weights: a 2nd copy
        so.enable_cpu_mem_arena = False  # the arena keeps its high-water mark for the session's life
        so.enable_mem_pattern = False    # planned buffers are sized for the largest shapes seen
        # Run nodes in graph order, so that a reduction placed after its producer frees that tensor early.
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return so


def _session_via_file(m: onnx.ModelProto, so, providers: list) -> ort.InferenceSession:
    # Weights changed in memory beyond protobuf's 2 GB: stream them to a temporary external-data file.
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as d:
        path = Path(d) / "model.onnx"
        modelfile.save(m, path, external_data=True)
        return ort.InferenceSession(str(path), so, providers=providers)


def _first_line(e: Exception) -> str:
    s = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    # ORT puts the detail on the following lines ("... for the following indices\n index: 0 Got: 4 Expected: 2")
    return " ".join(s)[:400] if s else type(e).__name__


_NODE_FAILED = re.compile(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.S)
_PASS_INDEX = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Slice", "Transpose")


def run(sess: ort.InferenceSession, outputs, feed: dict, *, model: onnx.ModelProto | None = None,
        label: str = "the model", options: ort.RunOptions | None = None) -> list:
    """`sess.run`, with an ORT failure turned into one OnnxoptError line that says which input to fix."""
    try:
        return sess.run(outputs, feed, options)
    except Exception as e:  # noqa: BLE001 - ORT's pybind exceptions share no useful base class
        raise run_error(e, model, feed, label) from None


def run_fetched(sess: ort.InferenceSession, outputs: list[str], feed: dict, *, model: onnx.ModelProto | None = None,
                label: str = "the model", bind: bool | None = None) -> list:
    """`run` whose outputs come back as numpy arrays; through I/O binding (inputs bound once, outputs allocated by
    ORT and copied to the host once) where `bind` (default: on CUDA), else `run`."""
    if not (bind if bind is not None else "CUDAExecutionProvider" in sess.get_providers()):
        return run(sess, outputs, feed, model=model, label=label)
    try:
        io = sess.io_binding()
        for k, v in feed.items():
            io.bind_cpu_input(k, np.asarray(v, order="C"))  # (ascontiguousarray would make a 0-d input 1-d)
        for o in outputs:
            io.bind_output(o)
        sess.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()
    except Exception as e:  # noqa: BLE001 - ORT's pybind exceptions share no useful base class
        raise run_error(e, model, feed, label) from None


def device_memory_bytes() -> int | None:
    """Total memory of the GPU that ORT's CUDA provider uses (the first visible one), from nvidia-smi; None where
    that cannot be read."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return None
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        r = subprocess.run(["nvidia-smi", "-i", first, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return int(r.stdout.split()[0]) * 2**20 if r.returncode == 0 and r.stdout.split() else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def fit_together(models: list, provider: str, host_budget_mb: int) -> bool:
    """Whether sessions of all `models` may live at once: their weights within a third of the GPU's memory on
    CUDA (activations and the arena take the rest), within `host_budget_mb` on the CPU."""
    need = sum(modelfile.model_bytes(m) for m in models)
    if runs_on_cuda(provider):
        total = device_memory_bytes()
        return total is not None and 3 * need <= total
    return need <= host_budget_mb * 2**20


def runs_on_cuda(provider: str) -> bool:
    """Whether sessions for `provider` run on CUDA (not a CUDA request that fell back to the CPU)."""
    return "CUDAExecutionProvider" in _providers_of(provider)


def _providers_of(provider: str) -> list[str]:
    return list(PROVIDERS["cpu"]) if provider in _fallen_back else list(PROVIDERS.get(provider, PROVIDERS["cpu"]))


def shrinking(sess: ort.InferenceSession) -> ort.RunOptions | None:
    """Run options that hand a CUDA session's unused arena memory back after each run (None on the CPU): many
    sessions alive at once (staged evaluation) would otherwise each keep their peak activations on the GPU."""
    if "CUDAExecutionProvider" not in sess.get_providers():
        return None
    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
    return ro


def run_error(e: Exception, model: onnx.ModelProto | None, feed: dict | list[dict], label: str) -> OnnxoptError:
    """One line for an ORT failure while running `model` on `feed` (or on one of several feeds)."""
    msg = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e)).strip()
    found = _NODE_FAILED.search(msg)
    if found and model is not None and found.group(1) == "Gather":
        hint = _gather_hint(model, found.group(2), feed)
        if hint:
            return OnnxoptError(f"ONNX Runtime failed running {label}: {hint}")
    msg = " ".join(msg.split())
    return OnnxoptError(f"ONNX Runtime failed running {label}: {msg[:400]}; check the input data against what the model expects")


def _gather_hint(model: onnx.ModelProto, node_name: str, feed: dict | list[dict]) -> str | None:
    """'input X indexes the N-row table of Gather G ...' when the failing Gather reads a constant table
    with indices that come from a graph input (possibly through Cast/Reshape/...)."""
    nodes = {n.name: n for n in model.graph.node}
    node = nodes.get(node_name)
    if node is None or len(node.input) < 2:
        return None
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    table = inits.get(node.input[0])
    if table is None or not table.dims:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    rows = int(table.dims[axis])
    t = node.input[1]
    while t in producer and producer[t].op_type in _PASS_INDEX:
        t = producer[t].input[0]
    feeds = [feed] if isinstance(feed, dict) else list(feed)
    vals = [np.asarray(f[t]) for f in feeds if t in f]
    if not vals:
        return None
    got = ""
    if all(v.size and v.dtype.kind in "iu" for v in vals):
        got = f" (got {min(v.min() for v in vals)}..{max(v.max() for v in vals)}"
        bad = [i + 1 for i, v in enumerate(vals) if v.min() < 0 or v.max() >= rows]
        got += f" in sample(s) {', '.join(map(str, bad[:5]))})" if len(vals) > 1 and bad else ")"
    return (f"input '{t}' indexes the {rows}-row table '{table.name}' of Gather '{node_name}', which accepts "
            f"values in [0, {rows - 1}]{got}; give '{t}' values in that range (e.g. token ids of this model's vocabulary)")
