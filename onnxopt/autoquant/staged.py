"""Staged evaluation of the gated graph, for models whose gated graph does not fit the memory budget, or whose
candidates are too many for a whole forward each (`stages_needed`: the auto rule; `--auto-stages N` forces N).

The FP32 model is cut into stages of about equal weight bytes (`calib.stages.split_stages`); every node of the
gated graph goes to a stage: the model's own nodes to theirs, a gate's If to the stage of the layer that owns
it (or later, where its input is made later), other added nodes after their inputs, and the gate-reading
Gather/Greater nodes into every stage that needs them. Stage sessions are loaded one at a time, or kept while
their weights fit the memory budget together.

- Reference: the FP32 stages (gates' Ifs replaced by what they pass through) run once over the search and
  verify batches; the tensors crossing stages wait on disk (memory-mapped).
- Sensitivity of (layer, format): the relative squared error it causes at its stage's outputs (every tensor
  the stage hands to later stages, and the model output where the stage makes it), per tensor and sample,
  averaged over both, with the stage fed the FP32 inputs; summed inside the graph, inputs bound on the device
  once per stage, and each session holding the Ifs of GROUP candidates only, and only the nodes they can change
  (a suffix fed the FP32 tensors it reads, computed once per batch). Times the stage's gain, measured
  once per stage: the stage's less sensitive half of layers quantized together (each in its least harmful
  format), the later stages in FP32, gain = model-output error (1 − cosine) / stage-output error of that mix.
  Small errors propagate about linearly, so one gain per stage puts the layers of all stages on one scale;
  the half of lower error keeps the probe in that range. (Measured on the tiny SDXL UNet, 4 stages: Spearman
  0.97 against the one-graph sensitivities, median ratio 1.00; pooling the tensors instead gave 0.81.)
- Metrics of a mix are exact: the stages chained with the mix's gates, from the first stage with a gate on
  (the stages before it are the reference); where every session of the chain stays loaded, one batch at a time
  through all stages with the tensors between them in memory, else stage by stage through disk. In the If form a
  verification or gain probe runs the mix's own fixed stages (`fixed_stage`: the gates on inlined, no If).
- Inlined gates (CUDA): one session a stage for all of these (`_unified`), split into suffix sessions for the
  candidates only where the measured forward and load times say it pays (`_groups`).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from .. import formats, metrics, modelfile, ort
from .. import progress as progress_
from ..calib import stages as cstages
from ..progress import track
from .candidates import GATES
from .evaluate import HELD_OUT, Gates, metrics_of
from .stage_data import BatchTensors, Store, onnxruntime_value, per_sample, relative, sq_lead
from . import fixed_stage
from .stage_plan import StagePlan

log = logging.getLogger(__name__)

MAX_STAGES = 32
LARGE = 1000          # candidates beyond which the model counts as large: staged for time, not only for memory
PER_STAGE = 32        # candidates per stage of a large model (a candidate costs a forward of its stage;
                      # full-size SDXL, H200, 32 stages: 0.04-0.15 s a candidate, fewer stages: longer forwards)
# bytes per parameter of a gated weight candidate (a variant such as int8-sq gates an FP32 fake weight: not counted)
QBYTES = {n: formats.get(n).bits / 8 for n in formats.auto_candidates() if not formats.get(n).base}
GROUP = 16                                          # candidates per error session (session loads vs If overhead)
# ... with inlined gates (CUDA): an off gate costs its Q/DQ (no If), so a session holds more of them. Full-size SDXL
# (32 stages of ~66 candidates): ~1 error session a stage instead of 5 (~1 s each to load on the GPU).
GROUP_INLINE = 64
# Inlined gates: one session a stage (`StagedEvaluator._unified`), every gate of the stage in it.
UNIFIED = True
# Candidate errors on suffixes of their stage (`StagedEvaluator._stage_errors`); unified stages split into at most
# MAX_SUFFIXES where the measured forward and load times say it pays.
SUFFIX = True
MAX_SUFFIXES = 4
REF = "__ref"
# Batches a stage's candidate errors and its gain are measured on (the first search batches): errors are
# relative MSEs over whole activations, steady from batch to batch; each batch costs a stage forward per candidate
# (full-size SDXL at 4096 tokens: ~0.2 s; the candidates are most of the search) and a chained forward per gain.
# Tiny SDXL UNet, 583 candidates in 8 stages, against all 6 search batches: the first 2 Spearman 0.9985 (the
# first 4: 0.9991; 2 spread over the split: 0.9921), candidate time 289 -> 102 s (BENCHMARKS.md).
ERROR_BATCHES = 2
GAIN_BATCHES = 2
# Intra-op threads of a CPU stage session (0: ORT's default, one per core). A stage forward at search batch sizes is
# ~10-50 ms of small kernels: on the 2-core dev box with other jobs running, ORT's pool waited on its descheduled
# second thread and one thread ran the same forwards ~2x faster (BENCHMARKS.md). CUDA sessions are unaffected.
CPU_THREADS = 1
# ... and that many runs at once (independent candidates, or batches of a chain), each on its own thread: the cores
# used without the pool's waits (`_map`).
CPU_STREAMS = min(2, os.cpu_count() or 1)
# Verifications and gain probes run the If form's stages with gates on as the mix's own stages (`fixed_stage`: no
# If, equal Q/DQ shared, weights dequantized once; kept while they fit the budget): a whole stage's ~250 Ifs cost
# ~80 ms a run on the dev box, the fixed stage's load ~0.1-0.3 s. Candidates spanning stages keep the whole stage.
FIXED = True


def stages_needed(model: onnx.ModelProto, layers: dict, budget_mb: int) -> int:
    """Auto rule: stages so that one stage's gated weights (FP32 + every quantized candidate) fit the budget, and,
    for a large model (over LARGE candidates), one stage per PER_STAGE candidates; at most MAX_STAGES."""
    if modelfile.has_subgraphs(model.graph):
        return 1
    fp32 = sum(modelfile.tensor_bytes(t) for t in model.graph.initializer)
    cand = sum(l.params * QBYTES[f] for l in layers.values() for f in l.formats if f in QBYTES)
    memory = math.ceil((fp32 + cand) / (max(budget_mb, 1e-6) * 2**20))
    n = sum(len(l.formats) - 1 for l in layers.values())
    speed = math.ceil(n / PER_STAGE) if n > LARGE else 1
    return int(min(MAX_STAGES, max(1, memory, speed)))


def fp32_stages(model: onnx.ModelProto, n: int, feed: dict | None = None, layers=()) -> dict:
    """Node name (or, unnamed, its first output) of the FP32 model -> its stage. With a `feed`, each cut goes
    where the fewest activation bytes cross it (they wait on disk for every batch), and the stages balance
    weight bytes, activation bytes made (a candidate's cost is a forward of its stage: attention at 4096
    tokens costs more than its weights say) and `layers` (the candidates' nodes), a third each."""
    sizes = cost = None
    if feed is not None and n > 1:
        from ..calib.collect import estimate_bytes
        sizes = estimate_bytes(model, feed, cstages.tensor_names(model))
        wsum = max(1.0, float(sum(modelfile.tensor_bytes(t) for t in model.graph.initializer)))
        asum = max(1.0, float(sum(sizes.values())))
        mine = set(layers)

        def balanced(nd, wb):
            made = sum(sizes.get(o, 0) for o in nd.output)
            return wb / wsum + made / asum + ((nd.name in mine) / len(mine) if mine else 0.0)
        cost = balanced
    where = {}
    for si, st in enumerate(cstages.split_stages(model, n, sizes, cost)):
        for nd in st.nodes:
            where[nd.name or nd.output[0]] = si
    return where


class Fixed(frozenset):
    """Gates on for good in a stage session (`StagePlan.proto(fixed=True)`), as against the gates whose Ifs stay."""


def _key(s: int, only) -> tuple:
    """Cache key of stage `s`'s session with `only` (None: every If; a set: those Ifs; a Fixed: those gates on)."""
    if isinstance(only, Fixed):
        return (s, "fixed", frozenset(only))
    return (s, None if only is None else frozenset(only))


# ---------------------------------------------------------------- the evaluator
class _Live:
    """The count of live sessions, apart from the evaluator: a session's finalizer holding the evaluator (a bound
    method) kept it, and through its cache every session it had, alive until the process ended (+250 MB peak on
    the tiny SDXL UNet's --auto)."""

    def __init__(self):
        self.n = 0

    def closed(self) -> None:
        self.n -= 1


class StagedEvaluator(Gates):
    """The Evaluator's interface (index, zeros, gates, metrics, ref, shapes, sensitivities) over the gated graph
    cut into stages, one stage's session alive at a time."""

    def __init__(self, model: onnx.ModelProto, index: dict, search: list, verify: list, provider: str,
                 shape_names: dict, where: dict, workdir=None, progress: bool = True, memory_budget_mb: int = 0,
                 inline: bool | None = None):
        self.index = index
        self.plan = StagePlan(model, where, index)
        self.plan.inline = provider == "cuda" if inline is None else inline
        self.provider, self.progress, self.shape_names = provider, progress, shape_names
        self.feeds = list(search) + list(verify)
        ns = len(search)
        self.ids = {"search": list(range(ns)), "verify": list(range(ns, len(self.feeds))),
                    "all": list(range(len(self.feeds)))}
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-staged-", dir=workdir)
        self.root = Path(self._tmp.name)
        self._live = _Live()
        self.peak_live = self.loads = 0
        # Stage sessions stay loaded while their weights fit the budget together (else one at a time).
        self.budget, self.cached = memory_budget_mb * 2**20, OrderedDict()
        self.sizes: dict = {}  # (stage, only) -> weight bytes of that session
        self.stats = {"load_s": 0.0, "stages": {}}
        self.grouped: dict = {}  # stage -> its error sessions (and whether suffixes)
        self.unified = self.plan.inline and UNIFIED
        t = time.perf_counter()
        self.types: dict = self.plan.inferred_types(self.feeds[0]) if self.unified else {}
        self.stats["types_s"] = time.perf_counter() - t
        self.refs = Store(self.root)
        self.refout: dict[int, np.ndarray] = {}
        self.shapes: dict[str, list] = {}
        t = time.perf_counter()
        self._reference()
        self.stats["reference_s"] = time.perf_counter() - t
        self.ref = {k: np.concatenate([self.refout[b] for b in v]) for k, v in self.ids.items() if k != "all"}
        log.info("staged evaluation: %d stages (one session at a time)", self.plan.n)

    # ------------------------------------------------------------ sessions and feeds
    def _session(self, s: int, errors: bool = False, only=None, built: tuple | None = None):
        """Stage `s`'s session: with the Ifs of the gates `only` (None: all; a `Fixed`: those gates on for good,
        no If); with `errors`, the variant summing squared errors. Whole, FP32 (`only` empty) and fixed stages stay
        cached while they fit the budget together. Unified (inlined gates): one session a stage, whatever is asked
        (`_unified`)."""
        if self.unified:
            return self._unified(s)
        key = _key(s, only)
        if isinstance(only, Fixed):
            if key not in self.cached:
                size = self._fixed_size(s, only)
                return self._load(None if built else self._fixed_model(s, only), key, size, built=built)
            self.cached.move_to_end(key)
            return self.cached[key][0]
        keep = not errors and (only is None or not only)
        if keep and key in self.cached:
            self.cached.move_to_end(key)
            return self.cached[key][0]
        m = self.plan.proto(s, self.types, errors, only)
        size = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(m))
        if keep:
            self.sizes[key] = size
        return self._load(m, key if keep else None, size)

    def _fixed_model(self, s: int, only: Fixed) -> onnx.ModelProto:
        """Stage `s` with the gates `only` on for good, prepared to run fast (`fixed_stage.prepared`; no bookkeeping,
        so it may run on another thread)."""
        return fixed_stage.prepared(self.plan.proto(s, self.types, only=set(only), fixed=True), self.provider,
                                    CPU_THREADS if self.provider == "cpu" else 0)

    def _fixed_size(self, s: int, only: Fixed) -> int:
        """Weight bytes of `_fixed_model(s, only)`, from its unprepared model (nothing dequantized to know it)."""
        key = _key(s, only)
        if key not in self.sizes:
            self.sizes[key] = fixed_stage.prepared_bytes(self.plan.proto(s, self.types, only=set(only), fixed=True))
        return self.sizes[key]

    def _unified(self, s: int):
        """Stage `s` with every gate inlined, its outputs and its squared errors against `t__ref` inputs (zeros
        where a run wants the outputs only): the FP32 reference (gates off), the candidates' errors, gain probes and
        verifications all run on it, so a stage loads once instead of 3-4 times (FP32, error, whole: ~1 s each on
        the GPU). Rebuilt once if its outputs' types were not known when it was made."""
        key = (s, "unified")
        sig = tuple((o, self.types[o].dtype.str, self.types[o].ndim) for o in self.plan.stages[s]["outputs"]
                    if o in self.types)
        hit = self.cached.get(key)
        if hit is not None and hit[2] == sig:
            self.cached.move_to_end(key)
            return hit[0]
        self.cached.pop(key, None)
        m = self.plan.proto(s, self.types, errors=True, outputs=True)
        self.sizes[key] = size = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(m))
        return self._load(m, key, size, sig)

    def _build(self, m) -> tuple:
        """(an ORT session of stage model `m`, seconds it took): no bookkeeping, so it may run on another thread."""
        t = time.perf_counter()
        sess = ort.session(m, provider=self.provider, level="disable", threads=CPU_THREADS if self.provider == "cpu" else 0)
        return sess, time.perf_counter() - t

    def _load(self, m, key, size: int, sig=None, built: tuple | None = None):
        """An ORT session of stage model `m` (or the one `built` from it by `_build`), cached under `key` (None: not
        kept) while the cache fits the budget."""
        while self.cached and sum(v[1] for v in self.cached.values()) + size > self.budget:
            self.cached.popitem(last=False)
        sess, seconds = built or self._build(m)
        self.stats["load_s"] += seconds
        self._live.n += 1
        self.loads += 1
        self.peak_live = max(self.peak_live, self._live.n)
        weakref.finalize(sess, self._live.closed)
        if key is not None and size <= self.budget:
            self.cached[key] = (sess, size, sig)
        return sess

    @property
    def live(self) -> int:
        """Stage sessions alive now."""
        return self._live.n

    def _feed(self, s: int, b: int, gates, store: Store | None = None, start: int = 0) -> dict:
        feed = {}
        for name in self.plan.stages[s]["inputs"]:
            if name == GATES:
                feed[name] = gates
            elif name in self.plan.graph_inputs:
                feed[name] = self.feeds[b][name]
            elif store is not None and self.plan.made_in[name] >= start:
                feed[name] = store.get(b, name)
            else:
                feed[name] = self.refs.get(b, name)
        return feed

    def _run(self, sess, s: int, feed: dict) -> dict:
        names = self.plan.stages[s]["outputs"] or [sess.get_outputs()[0].name]
        wanted = {i.name for i in sess.get_inputs()}
        feed = {k: v for k, v in feed.items() if k in wanted}
        for i in sess.get_inputs():  # a unified session's error inputs: any zeros (their sums are not fetched)
            if i.name not in feed and i.name.endswith(REF):
                feed[i.name] = np.zeros([1] * len(i.shape), np.float32)
        return dict(zip(names, ort.run(sess, names, feed, label=f"stage {s} of the gated graph",
                                       options=ort.shrinking(sess))))

    def _final(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0] if a.ndim > 1 else 1, -1).astype(np.float64)

    def _reference(self) -> None:
        """Every stage once with the gates off (the FP32 model), over all batches; its outputs kept for the others."""
        zeros, search = self.zeros(), set(self.ids["search"])
        for s in track(range(self.plan.n), total=self.plan.n, desc="FP32 reference (stages)", unit="stage",
                       enabled=self.progress):
            sess = self._session(s, only=())  # the FP32 stage: gates off are their else-branches
            times = []
            for b in range(len(self.feeds)):
                t = time.perf_counter()
                got = self._run(sess, s, self._feed(s, b, zeros))
                for n, a in got.items():  # dtype and rank only: a batch's array here stayed in RSS for good
                    self.types[n] = np.empty((0,) * a.ndim, a.dtype)
                if self.plan.out in got:
                    self.refout[b] = self._final(got[self.plan.out])
                if b in search:
                    for n in self.shape_names:
                        if n in got:
                            self.shapes.setdefault(n, []).append([int(d) for d in got[n]])
                times.append(time.perf_counter() - t)
                self.refs.save(b, got)  # every output: the later stages' inputs and the FP32 side of stage errors
            # a forward of this stage (the unified stage's: what a candidate's costs), and what its first run took
            # more (CUDA: algorithm search, arena growth): a new session's cost besides its load
            self.stats.setdefault("forward_s", {})[s] = float(np.median(times))
            self.stats.setdefault("first_run_s", {})[s] = max(0.0, times[0] - float(np.median(times)))
            del sess

    # ------------------------------------------------------------ chained runs of mixes
    def _start(self, gates) -> int:
        on = np.flatnonzero(np.asarray(gates) > 0.5)
        stages = [min(self.plan.gate_stages[int(i)]) for i in on if int(i) in self.plan.gate_stages]
        return min(stages, default=self.plan.n)

    def _chain(self, gates, batches: list, start: int, fixed: bool = False) -> tuple[dict, float]:
        """Stages `start`.. with `gates` on `batches`: (model output per batch, relative squared error at the
        outputs of stage `start` against the FP32 ones); `fixed`: the If form's stages as the mix's own (`FIXED`)."""
        on = {int(i) for i in np.flatnonzero(np.asarray(gates) > 0.5)}
        only = {}
        for s in range(start, self.plan.n):
            here = on & self.plan.stage_gates.get(s, set())
            # Few gates on: their Ifs only. Inlined gates cost a Q/DQ each, not an If: the whole stage, whose
            # session stays loaded for the next mix (the full-size CPU run spent 104 of 110 s of three
            # verifications loading per-mix sessions). Ifs too where the whole stage stays loaded: an off If costs
            # ~0.3 ms a run, a session of the few ~0.4 s to load (tiny SDXL: 3 verifications 28 s -> see BENCHMARKS).
            if here and fixed and FIXED and not self.plan.inline:
                only[s] = Fixed(here)
                continue
            few = len(here) <= GROUP and not (here and (self.plan.inline or self._whole_fits(s)))
            only[s] = here if few else None
        if len(batches) > 1 and self._fit(only):
            return self._chain_by_batch(gates, batches, start, only)
        store, out, num, den = Store(self.root), {}, {}, {}
        try:
            for s in range(start, self.plan.n):
                sess = self._session(s, only=only[s])
                floats = self.plan.float_outputs(s, self.types) if s == start else []
                for b in batches:
                    got = self._run(sess, s, self._feed(s, b, gates, store, start))
                    if self.plan.out in got:
                        out[b] = self._final(got[self.plan.out])
                    if floats:
                        k = self.refout[b].shape[0]
                        num[b] = np.stack([per_sample(sq_lead(got[n] - self.refs.get(b, n)), k) for n in floats])
                        den[b] = np.stack([per_sample(sq_lead(self.refs.get(b, n)), k) for n in floats])
                    store.save(b, {n: got[n] for n in self.plan.stages[s]["later"]})
                del sess
                store.drop_dead(self.plan, s)
        finally:
            store.close()
        return out, relative(num, den)

    def _whole_fits(self, s: int) -> bool:
        """Whether stage `s`'s whole gated session stays cached (within the budget on its own)."""
        key = (s, None)
        if key not in self.sizes:
            self.sizes[key] = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(self.plan.proto(s, self.types)))
        return self.sizes[key] <= self.budget

    def _fit(self, only: dict) -> bool:
        """Whether the sessions of stages {s: only} stay cached together within the budget (whole or FP32 stages)."""
        total = 0
        for s, o in only.items():
            if self.unified:
                if (s, "unified") not in self.sizes:
                    m = self.plan.proto(s, self.types, errors=True, outputs=True)
                    self.sizes[(s, "unified")] = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(m))
                total += self.sizes[(s, "unified")]
                continue
            if o and not isinstance(o, Fixed):  # a few gates' Ifs: a session per mix, not kept
                return False
            key = _key(s, o)
            if isinstance(o, Fixed):
                self._fixed_size(s, o)
            elif key not in self.sizes:
                m = self.plan.proto(s, self.types, False, o)
                self.sizes[key] = sum(modelfile.tensor_bytes(t) for t in modelfile.all_tensors(m))
            total += self.sizes[key]
        return total <= self.budget

    def _chain_by_batch(self, gates, batches: list, start: int, only: dict) -> tuple[dict, float]:
        """`_chain` one batch at a time through every stage, the tensors between stages kept in memory for that
        batch only, where every stage session stays loaded (`_fit`): no boundary tensor goes to disk (the full-size
        chain wrote ~1.5 GB a batch; gain probes and verifications are chains). The same runs on the same inputs."""
        # the mix's fixed stages not loaded yet are made and load CPU_STREAMS at a time
        new = [s for s in range(start, self.plan.n) if isinstance(only[s], Fixed) and _key(s, only[s]) not in self.cached]
        built = dict(zip(new, self._map(lambda s: self._build(self._fixed_model(s, only[s])), new)))
        sessions = {s: self._session(s, only=only[s], built=built.pop(s, None))  # all stay loaded (`_fit`)
                    for s in range(start, self.plan.n)}

        def one(b):
            live, out, num, den = BatchTensors(), None, None, None
            for s in range(start, self.plan.n):
                got = self._run(sessions[s], s, self._feed(s, b, gates, live, start))
                if self.plan.out in got:
                    out = self._final(got[self.plan.out])
                if s == start:
                    floats, k = self.plan.float_outputs(s, self.types), self.refout[b].shape[0]
                    if floats:
                        num = np.stack([per_sample(sq_lead(got[n] - self.refs.get(b, n)), k) for n in floats])
                        den = np.stack([per_sample(sq_lead(self.refs.get(b, n)), k) for n in floats])
                live.data.update({n: got[n] for n in self.plan.stages[s]["later"]})
                del got
                for name in [n for n in live.data if self.plan.last_use.get(n, -1) <= s]:
                    del live.data[name]
            return out, num, den
        res = dict(zip(batches, self._map(one, batches)))  # batch by batch in `batches` order, whatever ran first
        out = {b: r[0] for b, r in res.items() if r[0] is not None}
        num = {b: r[1] for b, r in res.items() if r[1] is not None}
        den = {b: r[2] for b, r in res.items() if r[2] is not None}
        return out, relative(num, den)

    def _map(self, fn, items: list) -> list:
        """[fn(x) for x in items], on CPU_STREAMS threads on the CPU (each ORT run on one intra-op thread: the runs
        of independent batches or candidates share the cores without ORT's pool waiting on a busy core)."""
        if self.provider != "cpu" or CPU_STREAMS <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(CPU_STREAMS, len(items))) as pool:
            return list(pool.map(fn, items))

    def metrics(self, gates, split: str = "search") -> dict:
        """Cosine and top-1 agreement of the mix on "search", "verify" or "all" batches: exact (the stages chained)."""
        ids = self.ids["all" if split == HELD_OUT else split]
        start = self._start(gates)
        out = self._chain(gates, ids, start, fixed=True)[0] if start < self.plan.n else {}
        ref = np.concatenate([self.refout[b] for b in ids])
        cand = np.concatenate([out.get(b, self.refout[b]) for b in ids])
        held = sum(self.refout[b].shape[0] for b in self.ids["verify"]) if split == HELD_OUT else 0
        return metrics_of(ref, cand, held)

    # ------------------------------------------------------------ sensitivities
    def sensitivities(self, todo: list, progress: bool = True):
        """Yield ((layer, format), error) for every key of `todo`, stage by stage (see the module doc)."""
        by_stage: dict[int, list] = {}
        spanning = []
        for key in todo:
            st = self.plan.gate_stages.get(self.index[key], set())
            if len(st) == 1:
                by_stage.setdefault(next(iter(st)), []).append(key)
            else:
                spanning.append(key)  # its gates in several stages (or none): measured exactly
        for s in track(sorted(by_stage), total=len(by_stage), desc="sensitivity (stages)", unit="stage",
                       enabled=progress):
            t0 = time.perf_counter()
            rse = self._stage_errors(s, by_stage[s], progress)
            t1 = time.perf_counter()
            gain = self._gain(s, rse)
            t2 = time.perf_counter()
            grp = self.grouped.get(s, {"sessions": 0, "suffixes": False})
            self.stats["stages"][s] = {"candidates": len(by_stage[s]), "candidates_s": t1 - t0, "gain_s": t2 - t1,
                                       "gain": gain, "forward_s": self.stats.get("forward_s", {}).get(s, 0.0),
                                       "error_sessions": grp["sessions"], "suffixes": grp["suffixes"]}
            log.info("stage %d/%d: %d candidates in %.1f s (%.3f s each; %d error session(s)%s; stage forward %.3f s), "
                     "gain probe %.1f s; sessions: %d loaded, %d alive", s + 1, self.plan.n, len(by_stage[s]), t1 - t0,
                     (t1 - t0) / max(1, len(by_stage[s])), grp["sessions"], ", suffixes" if grp["suffixes"] else "",
                     self.stats.get("forward_s", {}).get(s, 0.0), t2 - t1, self.loads, self.live)
            for key in by_stage[s]:
                yield key, gain * rse[key]
        ids = self.ids["search"][:ERROR_BATCHES]  # the batches every other candidate is measured on
        for key in spanning:  # the model-output error of the chain (a whole search split: 3x the forwards)
            g = self.gates({key[0]: key[1]})
            start = self._start(g)
            out = self._chain(g, ids, start)[0] if start < self.plan.n else {}
            ref = np.concatenate([self.refout[b] for b in ids])
            cand = np.concatenate([out.get(b, self.refout[b]) for b in ids])
            yield key, max(0.0, 1.0 - metrics.mean_cosine_score(ref, cand))

    def _stage_errors(self, s: int, keys: list, progress: bool) -> dict:
        """Relative squared error of each candidate at the outputs of stage `s`, fed the FP32 inputs. The squared
        differences are summed inside the graph; the inputs stay bound on the device across candidates. The
        candidates, in the order their layers run, go in groups (`_groups`); a group's session holds only what its
        gates can change (`StagePlan.nodes`' suffix), the FP32 tensors it reads from the rest computed once per
        batch by one prefix run, so a candidate late in the stage no longer runs the stage's FP32 prefix."""
        floats = self.plan.float_outputs(s, self.types)
        batches = self.ids["search"][:ERROR_BATCHES]
        den = {b: np.stack([per_sample(sq_lead(self.refs.get(b, n)), self.refout[b].shape[0]) for n in floats])
               for b in batches}
        pos = self.plan.gate_positions(s)
        keys = sorted(keys, key=lambda k: (pos.get(self.index[k], 0), self.index[k]))
        groups, suffix = self._groups(s, keys)
        self.grouped[s] = {"sessions": len(groups), "suffixes": suffix}
        picked = {}  # group -> its suffix's (nodes, frontier)
        if suffix:
            # unified: the first group runs on the stage's own (loaded) session, the later ones on suffixes
            picked = {g: self.plan.nodes(s, self._group_gates(s, group), self._group_gates(s, group))
                      for g, group in enumerate(groups) if g or not self.unified}
        frontier = {g: p[1] for g, p in picked.items()}
        prefix = self._prefix(s, batches, sorted(set().union(*frontier.values()))) if frontier else None
        bar = progress_.bar(total=len(keys), desc=f"stage {s + 1}/{self.plan.n} candidates", unit="candidate",
                            enabled=progress)
        out, device = {}, None
        protos = []  # each group's error session: a suffix, the stage's unified session (None), or the whole stage
        for g, group in enumerate(groups):
            gates_here = self._group_gates(s, group)
            protos.append(self.plan.proto(s, self.types, errors=True, only=gates_here, suffix=gates_here,
                                          picked=picked[g]) if g in frontier
                          else None if self.unified else self.plan.proto(s, self.types, errors=True, only=gates_here))
        # On the CPU the next group's session loads on a thread while this group's candidates run (~0.1-0.3 s a load).
        ahead, loading = ThreadPoolExecutor(1) if self.provider == "cpu" else None, {}

        def load_ahead(g):
            if ahead is not None and g < len(groups) and protos[g] is not None:
                loading[g] = ahead.submit(self._build, protos[g])
        load_ahead(0)
        for g, group in enumerate(groups):
            load_ahead(g + 1)
            if protos[g] is None:
                sess = self._session(s, errors=True, only=self._group_gates(s, group))
            else:
                sess = self._load(protos[g], None, 0, built=loading.pop(g).result() if g in loading else None)
                protos[g] = None
            device = device or ("cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu")
            names = {i.name for i in sess.get_inputs()}
            have = {o.name for o in sess.get_outputs()}
            errs = [(i, f"{n}__err") for i, n in enumerate(floats) if f"{n}__err" in have]
            bound = []
            for b in batches:
                feed = {k: v for k, v in self._feed(s, b, self.zeros()).items() if k != GATES and k in names}
                feed.update({f"{n}__ref": self.refs.get(b, n) for n in floats if f"{n}__ref" in names})
                if prefix is not None:
                    feed.update({n: prefix[b][n] for n in frontier.get(g, ()) if n in names})
                bound.append({k: onnxruntime_value(v, device) for k, v in feed.items()})

            def one(key, sess=sess, bound=bound, names=names, errs=errs):
                gates, num = self.gates({key[0]: key[1]}), {}
                for b, vals in zip(batches, bound):
                    io_ = sess.io_binding()
                    for k, v in vals.items():
                        io_.bind_ortvalue_input(k, v)
                    if GATES in names:
                        io_.bind_cpu_input(GATES, gates)
                    for _, e in errs:
                        io_.bind_output(e, "cpu")
                    sess.run_with_iobinding(io_, ort.shrinking(sess))
                    k = self.refout[b].shape[0]
                    rows = np.zeros((len(floats), k))  # outputs the suffix leaves out are FP32: no error
                    for (i, _), x in zip(errs, io_.copy_outputs_to_cpu()):
                        rows[i] = per_sample(np.asarray(x, np.float64), k)
                    num[b] = rows
                return relative(num, den)
            out.update(zip(group, self._map(one, group)))
            bar.update(len(group))
            del sess, bound
        if ahead is not None:
            ahead.shutdown()
        bar.close()
        return out

    def _group_gates(self, s: int, group: list) -> set:
        return {self.index[k] for k in group}

    def _groups(self, s: int, keys: list) -> tuple[list, bool]:
        """(the candidates in groups, one error session each; whether the groups run as suffixes). The If form:
        GROUP a session, suffixes where there are several groups (their sessions exist anyway; one prefix load
        more). Unified: the whole stage in one group, unless splitting it into m suffixes saves more candidate
        forward time (the stage's measured forward, by where the groups start) than m session loads cost."""
        if not keys:
            return [], False
        if not self.unified:
            step = GROUP
            if self.plan.inline:  # as few sessions, of equal size
                step = max(1, -(-len(keys) // -(-len(keys) // GROUP_INLINE)))
            groups = [keys[i:i + step] for i in range(0, len(keys), step)]
            return groups, SUFFIX and len(groups) > 1
        first = self.stats.get("first_run_s", {})
        load = self.stats["load_s"] / max(1, self.loads) + sum(first.values()) / max(1, len(first))
        forward = self.stats.get("forward_s", {}).get(s, 0.0) * ERROR_BATCHES
        best, m_best = len(keys) * forward, 1
        for m in range(2, MAX_SUFFIXES + 1) if SUFFIX else ():
            # group j of m starts about j/m into the stage: it runs (1 - j/m) of it; m loads (m - 1 suffixes, prefix)
            cost = sum(len(keys[j * len(keys) // m:(j + 1) * len(keys) // m]) * (1 - j / m) for j in range(m)) \
                * forward + m * load
            if cost < best:
                best, m_best = cost, m
        groups = [keys[j * len(keys) // m_best:(j + 1) * len(keys) // m_best] for j in range(m_best)]
        return [g for g in groups if g], m_best > 1

    def _prefix(self, s: int, batches: list, names: list) -> dict:
        """Batch -> {name: FP32 value} of the tensors `names` inside stage `s` (one run of its FP32 nodes a batch)."""
        m = self.plan.proto(s, self.types, only=set(), extra=tuple(names))
        sess = self._load(m, None, 0)
        out = {}
        for b in batches:
            feed = self._feed(s, b, self.zeros())
            wanted = {i.name for i in sess.get_inputs()}
            got = ort.run(sess, names, {k: v for k, v in feed.items() if k in wanted},
                          label=f"stage {s} FP32 prefix", options=ort.shrinking(sess))
            out[b] = dict(zip(names, got))
            for n, a in out[b].items():
                self.types.setdefault(n, np.empty((0,) * a.ndim, a.dtype))
        return out

    def _gain(self, s: int, rse: dict) -> float:
        """Model-output error per unit of stage-output error: the less sensitive half of the stage's layers (each
        in its least harmful measured format) quantized together, the later stages in FP32."""
        best: dict[str, tuple] = {}
        for (layer, f), e in rse.items():
            if np.isfinite(e) and (layer not in best or e < best[layer][1]):
                best[layer] = (f, e)
        if not best:
            return 1.0
        cut = float(np.median([e for _, e in best.values()]))
        mix = {layer: f for layer, (f, e) in best.items() if e <= cut}
        ids = self.ids["search"][:GAIN_BATCHES]
        out, stage_err = self._chain(self.gates(mix), ids, s, fixed=True)
        ref = np.concatenate([self.refout[b] for b in ids])
        model_err = max(0.0, 1.0 - metrics.mean_cosine_score(ref, np.concatenate([out.get(b, self.refout[b]) for b in ids])))
        gain = model_err / stage_err if stage_err > 0 else 1.0
        log.info("stage %d: gain %.3g (model error %.3g over stage error %.3g, %d layers)", s, gain, model_err,
                 stage_err, len(mix))
        return gain

    def close(self) -> None:
        self.cached.clear()
        self.refs.close()
        self._tmp.cleanup()
