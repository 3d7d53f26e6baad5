"""AutoQuant pass: per-layer format search to a target (onnxopt.autoquant); the chosen QuantPlan is written by
the one writer (onnxopt.quant.writer): FP8 / INT8 W8A8 and INT4 weight-only layers side by side, the rest left
to Autocast."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import attention_guard, autoquant, einsum, modelfile
from ..rewrite import awq, lowrank
from ..cast import precision
from .. import formats as registry
from .. import sampler as smp
from ..sampler import SamplerOptions
from ..autoquant import branch as aq_branch
from ..autoquant import engine as aq_engine
from ..autoquant.candidates import base_format, has_branch
from ..autoquant.groups import tie
from ..errors import OnnxoptError
from ..quant import int4_weights, writer
from ..pass_protocol import PassBase, check_regexes, one_quantizer
from .static_qdq import QDQ, WEIGHT_OPS

log = logging.getLogger(__name__)

WRITTEN_REPAIRS = 2  # searches again when the written graph misses what the gated one met (each: one more write)



@dataclass
class AutoQuant(PassBase):
    formats: tuple = registry.auto_defaults()  # candidates besides "none" (FP16): some of registry.auto_candidates()
    target_cosine: float | None = None  # mean cosine of the output vs FP32 on held-out batches
    target_top1: float | None = None    # argmax agreement (classifiers) on held-out batches
    bits: float | None = None           # weight bits averaged over the parameters of the weighted layers
    target_psnr: float | None = None    # mean PSNR (dB) of the sampler's final samples vs FP32 on held-out seeds
    sampler: SamplerOptions | None = None  # with target_psnr: the denoising loop (and its held-out seeds)
    psnr_of: str = "mean"               # with target_psnr: the held-out seeds' "mean" PSNR or the "worst" seed's
    sensitivity: str | None = None      # JSON of measured sensitivities: read if there, written as measured
    verify_fraction: float = 0.25       # share of the calibration batches held out to verify the mix
    confidence_k: float = 1.64          # a cosine target is verified with k standard errors of the held-out mean
                                        # per-sample cosine to spare (1.64: one-sided 95%)
    cosine_margin: float | None = None  # override: a fixed share of 1 - target to spare instead (k ignored)
    verify_held_out: bool = False       # verify on the held-out batches only (default: every calibration batch)
    merge_batch: int = 16               # samples run together in the gated graph (where inputs allow)
    block_size: int = 128               # INT4 blocks along K
    awq_clip: bool = True               # INT4 candidates with AWQ's per-block clip search (no scale folding)
    block_awq: bool = True              # W4A4 block candidates (NVFP4) with AWQ's clip search and error-feedback
                                        # rounding on the search split (no scale folding)
    block_smooth: bool = False          # ... and their own SmoothQuant-style input scaling where it helps on sampled
                                        # rows (opt-in: on MiniLM its held-out errors added up worse, BENCHMARKS)
    exclude: tuple = ()
    op_types: tuple = WEIGHT_OPS
    quantize_mha: bool = True
    cost_model: str = "bits"            # "bits", or "rtx": TensorRT-RTX engine reports drop formats that save nothing
    engine_shapes: tuple | dict = ()    # rtx: deployment shapes, "name:1x31" or "name:MIN/OPT/MAX" (or {name: (min, opt, max)});
                                        # empty: one calibration sample's shapes
    stages: int = 0                     # staged evaluation: 0 = auto (autoquant.staged.stages_needed), 1 = one graph
    lowrank: int | str | None = None    # low-rank branch candidates ("<format>+lr"): a rank, "auto", or None (none)
    lowrank_budget: float = 0.1         # lowrank "auto": the data-free rank choice's bytes / quantized weight bytes
    lowrank_smooth: bool = True         # W4A4 branch candidates in SVDQuant's order: x ⊘ s, the branch from s ⊙ W
    variants: bool = True               # also offer the registered variants of the asked formats (formats.auto_with_variants:
                                        # int8 alone brings int8-sq, SmoothQuant's INT8 as uniform --int8 --smoothquant auto;
                                        # the search keeps whichever of the two costs less error per layer)
    name = "autoquant"
    quantizes = True

    def __post_init__(self):
        self.formats = tuple(self.formats)
        bad = [f for f in self.formats if f not in autoquant.FORMATS]
        if bad or not self.formats:
            raise OnnxoptError(f"--formats {','.join(self.formats) or '(empty)'}: use some of {','.join(autoquant.FORMATS)}")
        if self.variants:
            self.formats = registry.auto_with_variants(self.formats)
        targets = [t for t in (self.target_cosine, self.target_top1, self.bits, self.target_psnr) if t is not None]
        if len(targets) != 1:
            raise OnnxoptError("--auto needs exactly one target: --target-cosine X, --target-top1 X, --target-psnr DB or --bits B"
                               + (f" (got {len(targets)})" if targets else ""))
        for opt, v in (("--target-cosine", self.target_cosine), ("--target-top1", self.target_top1)):
            if v is not None and not 0.0 < v <= 1.0:
                raise OnnxoptError(f"{opt} {v} is out of range; use a value in (0, 1], e.g. 0.999")
        if (self.target_psnr is None) != (self.sampler is None):
            raise OnnxoptError("--target-psnr DB judges the sampler's final samples: give it with --sampler "
                               "euler|ddim|dpmpp|consistency (and --steps), and --sampler only with --target-psnr")
        if self.psnr_of not in ("mean", "worst"):
            raise OnnxoptError(f"--psnr-of {self.psnr_of}: use mean or worst")
        if self.psnr_of != "mean" and self.target_psnr is None:
            raise OnnxoptError("--psnr-of judges --target-psnr's held-out seeds; add --target-psnr DB --sampler ... or drop it")
        if self.target_psnr is not None and not 0 < self.target_psnr < 200:
            raise OnnxoptError(f"--target-psnr {self.target_psnr}: give a PSNR in dB within (0, 200), e.g. 30")
        if self.bits is not None:
            low = min(autoquant.WBITS[f] for f in self.formats)
            cheapest = min(autoquant.FORMATS, key=autoquant.WBITS.get)
            if not low <= self.bits <= 16:
                raise OnnxoptError(f"--bits {self.bits} cannot be met with --formats {','.join(self.formats)}: "
                                   f"use {low:g} to 16" + ("" if cheapest in self.formats else f", or add {cheapest} to --formats"))
        if self.cosine_margin is not None and not 0.0 <= self.cosine_margin < 1.0:
            raise OnnxoptError(f"cosine margin {self.cosine_margin} must be in [0, 1)")
        if not 0.0 <= self.confidence_k <= 10.0:
            raise OnnxoptError(f"confidence k {self.confidence_k} must be in [0, 10], e.g. 1.64 (one-sided 95%)")
        if not 0.0 < self.verify_fraction < 1.0:
            raise OnnxoptError(f"verify fraction {self.verify_fraction} must be in (0, 1)")
        if self.sensitivity is not None:
            parent = Path(self.sensitivity).resolve().parent
            if not parent.is_dir():
                raise OnnxoptError(f"--sensitivity {self.sensitivity}: folder {parent} does not exist; create it first")
        if not 0 <= self.stages <= autoquant.staged.MAX_STAGES:
            raise OnnxoptError(f"--auto-stages {self.stages}: use 0 (auto: as memory and candidates need) to "
                               f"{autoquant.staged.MAX_STAGES}")
        int4_weights.check_options("none", self.block_size)
        if self.lowrank is not None:
            self.lowrank = lowrank.parse_rank(self.lowrank)
            lowrank.check_rank(self.lowrank, self.lowrank_budget)
            if self.cost_model == "rtx" or self.stages > 1:
                raise OnnxoptError("--lowrank with --auto is measured in one gated graph with the bits cost model; "
                                   "drop --cost-model rtx / --auto-stages, or drop --lowrank")
        self._check_cost_model()
        self._parse_engine_shapes()
        self.exclude = check_regexes(self.exclude, "--exclude")
        self.op_types = tuple(self.op_types)

    @property
    def min_opset(self) -> int:
        return max([QDQ.min_opset] + [registry.get(f).min_opset for f in self.formats])

    @property
    def needs_data(self) -> bool:
        return True

    @property
    def metric(self) -> str:
        return "top1" if self.target_top1 is not None else "psnr" if self.target_psnr is not None else "cosine"

    def check_recipe(self, recipe, index: int) -> None:
        one_quantizer(recipe)

    def configs(self) -> dict:
        block = any(registry.get(g).block_weight for g in self.formats)  # placed by FP8's rules
        return {f: QDQ(f, exclude=self.exclude, op_types=self.op_types, quantize_mha=self.quantize_mha)
                for f in autoquant.PLANNED if f in self.formats or any(registry.get(g).base == f for g in self.formats)
                or (block and f == registry.FP8.name)}

    def run(self, ctx) -> dict:
        data = ctx.require_data("--auto")
        graph, t0 = ctx.graph, time.perf_counter()
        roles = self._sampler_roles(graph)  # before any work: the model must fit the sampler
        aq_engine.check_shapes(graph, self.engine_shapes)
        einsum.rewrite(graph)  # Einsum attention as MatMul, as in the QDQ pass
        guards = attention_guard.remove(graph) if self.quantize_mha else 0
        configs = self.configs()
        cands = autoquant.candidates(graph, self.formats, configs, self.block_size)
        groups = tie(graph, cands.layers)
        no_branch = {} if self.lowrank is None else aq_branch.add_candidates(
            graph, cands, rank=self.lowrank, budget=self.lowrank_budget, high_precision=ctx.high_precision,
            progress=ctx.progress)
        if not any(len(l.formats) > 1 for l in cands.layers.values()):
            raise OnnxoptError("nothing to quantize: no layer has a candidate format under the TensorRT rules; "
                               "nothing was written")
        search, verify = split_feeds(data, self.verify_fraction, self.merge_batch)
        # Range-aware autocast's max |x| of every float tensor, in the same pass (on the search samples: the
        # held-out ones stay unseen; SAFE_FRACTION is the headroom for inputs calibration did not see).
        ranges = precision.range_reducers(graph) if ctx.measure_ranges else None
        amax, means = autoquant.calibrate(graph, search, cands, provider=ctx.provider, extra=ranges,
                                          memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress)
        awq_formats = [registry.get(f) for f in self.formats if registry.get(f).awq and registry.get(f).weight_only]
        if cands.int4 and self.awq_clip and awq_formats:
            nodes = [(n, awq_formats[0]) for n in graph.nodes if n.name in cands.int4]
            _, cands.clips = awq.apply(graph, search, nodes, method="clip", block_size=self.block_size,
                                       high_precision=ctx.high_precision, provider=ctx.provider,
                                       memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress)
        if self.block_awq:
            autoquant.block_awq(graph, search, cands, self.formats, high_precision=ctx.high_precision,
                                provider=ctx.provider, memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress,
                                smooth=self.block_smooth)
            aq_branch.block_awq(graph, search, cands, high_precision=ctx.high_precision, provider=ctx.provider,
                                memory_budget_mb=ctx.memory_budget_mb, progress=ctx.progress, smooth=self.lowrank_smooth)
        t1 = time.perf_counter()
        codes: dict = {}  # the gated graph's per-channel codes: the final write takes the chosen ones as they are
        ev = autoquant.Memo(self._evaluator(ctx, cands, amax, means, search, verify, codes))  # the final mix was verified
        key = self._key(ctx, graph, search)
        measured = autoquant.measure(ev, cands.layers, path=self.sensitivity, key=key, progress=ctx.progress)
        t2 = time.perf_counter()
        if roles is not None:  # verification and repair on the sampler's final samples, held-out seeds
            ev = autoquant.Memo(autoquant.SampledEvaluator(ev, roles, self.sampler, ctx.progress,
                                                                worst=self.psnr_of == "worst"))
        mix, trials = self._choose(ev, cands, ctx)
        rounds = []
        if self.cost_model == "rtx":
            mix, trials, rounds = self._engine_rounds(ctx, ev, cands, mix, trials, amax, means, search)
        final = ev.metrics(ev.gates(mix), self._split())
        staged = getattr(ev, "stats", None)  # staged evaluation: stages, session loads, per-stage seconds
        if staged is not None:
            staged = {**staged, "stages": {str(k): v for k, v in staged["stages"].items()}, "n": ev.plan.n,
                      "loads": ev.loads, "peak_live": ev.peak_live}
        t3 = time.perf_counter()
        fp32 = modelfile.export_graph(graph) if staged is None and self.bits is None else None
        written, repairs, inserted = None, [], None
        for _ in range(WRITTEN_REPAIRS + 1):  # verify what ships: the written graph, on the same data or seeds
            plan = self._plan(mix, cands, configs, amax, means)
            if fp32 is None:
                break
            graph = modelfile.import_graph(fp32)
            aq_branch.split(graph, mix, cands)  # the chosen branches, with the factors the search measured
            inserted = writer.write(graph, plan, high_precision=ctx.high_precision, block_dtype=np.float32,  # checked before Autocast
                                    quantized=_chosen_codes(codes, mix))
            written = ev.written_metrics(modelfile.export_graph(graph, opset=self.min_opset), self._split())
            gap = final[self.metric] - written[self.metric]
            repairs.append({"gated": final[self.metric], "written": written[self.metric], **autoquant.bits_of(mix, cands.layers)})
            if _met(self, written) or len(repairs) > WRITTEN_REPAIRS or gap <= 0:
                break
            log.warning("auto: the written graph gives %s %.5g, the gated graph %.5g: searching again with %.3g to spare",
                        self.metric, written[self.metric], final[self.metric], gap)
            mix, trials = self._choose(ev, cands, ctx, extra=sum(r["gated"] - r["written"] for r in repairs))
            final = ev.metrics(ev.gates(mix), self._split())
            inserted = None
        del ev
        # Block formats (dynamic activations) were checked with FP32 dequantizer outputs; every other layer is
        # written as it ships.
        blocks = any(registry.get(f).block_weight for f in set(plan.mix().values()) if f != "none")
        if inserted is not None and not blocks:
            # The verified graph is the output: the same writer on a copy of the same graph, so the same bytes,
            # without quantizing and spilling every weight a second time.
            ctx.graph = graph
        else:  # no written verification (staged evaluation, --bits) or block formats: the one write as shipped
            aq_branch.split(ctx.graph, mix, cands)
            inserted = writer.write(ctx.graph, plan, high_precision=ctx.high_precision, quantized=_chosen_codes(codes, mix))
        del fp32, codes
        ctx.fp32_nodes.extend(n for n, info in inserted.items() if "fp32_scale" in info)  # as the QDQ pass does
        ctx.fp32_nodes.extend(n for info in inserted.values() for n in info.pop("fp32_nodes", ()))  # NVFP4 scales
        if ranges is not None and autoquant.SQ not in mix.values():
            ctx.range_reducers = ranges  # SmoothQuant's folded scales would change the ranges it measured
        rep = self._report(cands, mix, trials, final, inserted, measured, guards,
                            {"calibrate": t1 - t0, "sensitivity": t2 - t1, "choose_verify": t3 - t2,
                             "write_verify": time.perf_counter() - t3}, written)
        rep["written_repairs"] = repairs
        if self.lowrank is not None:
            rep["lowrank"] = _branch_report(self, cands, mix, no_branch)
        rep["groups"] = groups
        rep["kept_wide"] = sorted(n for n, f in mix.items() if f == "none")
        rep["kept_wide_why"] = {n: rep["layers"][n]["reason"] for n in rep["kept_wide"] if n in rep["layers"]}
        if self.sampler is not None:
            o = self.sampler
            rep["sampler"] = {"sampler": o.sampler, "steps": o.n_steps, "guidance": o.cfg, "held_out_seeds": list(o.seeds),
                              "psnr_of": self.psnr_of}
        if staged is not None:
            rep["staged"] = staged
        for name, g in groups.items():
            for m in g["members"]:
                rep["layers"][m]["group"] = name
        rep["cost_model"] = {"name": self.cost_model, "rounds": rounds}
        if rounds:
            rep["cost_model"]["engine_shapes"] = {k: [list(s) for s in v] for k, v in self._engine_profiles(search).items()}
        for r in rounds:
            for x in r["no_savings"]:
                rep["layers"][x["layer"]].setdefault("engine_no_savings", {})[x["format"]] = x["reason"]
        return rep

    def _sampler_roles(self, graph):
        """The sampler roles of the model's inputs (--target-psnr), checked before any work; None otherwise."""
        if self.sampler is None:
            return None
        io_only = smp.io_model([(t.name, t.dtype, t.shape) for t in graph.inputs], [t.name for t in graph.outputs])
        return smp.roles(io_only, self.sampler)

    # ---------------------------------------------------------------- cost model (engineer A)
    def _check_cost_model(self) -> None:
        if self.cost_model not in ("bits", "rtx"):
            raise OnnxoptError(f"--cost-model {self.cost_model}: use bits (weight and activation bits) or rtx "
                               "(TensorRT-RTX engine reports)")
        if self.cost_model == "rtx":
            from ..trt import MISSING_RTX, rtx_available
            if not rtx_available():
                raise OnnxoptError(f"--cost-model rtx builds engines: {MISSING_RTX}, or use --cost-model bits")

    def _parse_engine_shapes(self) -> None:
        from ..trt.build import parse_profiles
        if isinstance(self.engine_shapes, dict):
            self.engine_shapes = {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in self.engine_shapes.items()}
        else:
            self.engine_shapes = parse_profiles(tuple(self.engine_shapes), option="--engine-shapes")
        if self.engine_shapes and self.cost_model != "rtx":
            raise OnnxoptError("--engine-shapes sets the shapes of the engine check; add --cost-model rtx (or drop it)")

    def _engine_profiles(self, search) -> dict:
        """{input: (min, opt, max)} of the engine check: --engine-shapes, else one calibration sample's shapes."""
        return self.engine_shapes or {k: (s, s, s) for k, s in aq_engine.build_shapes(search[0]).items()}

    def _choose(self, ev, cands, ctx, extra: float = 0.0) -> tuple[dict, list]:
        """(mix, trials) to the target; `extra`: more to spare (what the written graph fell short of the gated one)."""
        if self.bits is not None:
            return autoquant.mix_for_bits(cands.layers, self.bits), []
        target = {"cosine": self.target_cosine, "top1": self.target_top1, "psnr": self.target_psnr}[self.metric]
        margin, k = self._margin()
        return autoquant.search_target(ev, cands.layers, self.metric, target, progress=ctx.progress,
                                       margin=margin + extra, split=self._split(), k=k)

    def _plan(self, mix, cands, configs, amax, means) -> writer.QuantPlan:
        """The QuantPlan of a mix, with each layer's reason."""
        return writer.QuantPlan({n: writer.Choice(base_format(f), _reason(cands.layers[n], f)) if n in cands.layers
                                 else writer.Choice(f)
                                 for n, f in mix.items()}, configs=configs, amax=amax, means=means,
                                block_size=self.block_size, smooth=cands.smooth,
                                clips={n: c for n, f in mix.items() if (c := cands.clip_of(n, f)) is not None},
                                block_smooth={n: sm for n, f in mix.items() if (sm := cands.smooth_of(n, f)) is not None})

    def _split(self) -> str:
        """Batches a mix is verified on. A cosine target is judged on the held-out samples (the calibrated ones
        score higher), with the standard error from the spread of every sample; top-1, which moves in steps of
        1/n over a few samples, on every calibration sample. `verify_held_out`: the held-out batches alone."""
        if self.verify_held_out:
            return "verify"
        return autoquant.evaluate.HELD_OUT if self.metric == "cosine" else "all"

    def _margin(self) -> tuple[float, float]:
        """(fixed margin, k standard errors) a cosine target is verified with; top-1 has none."""
        if self.metric == "psnr":
            return 0.0, self.confidence_k
        if self.metric != "cosine":
            return 0.0, 0.0
        if self.cosine_margin is not None:
            return self.cosine_margin * (1.0 - self.target_cosine), 0.0
        return 0.0, self.confidence_k

    def _engine_rounds(self, ctx, ev, cands, mix, trials, amax, means, search) -> tuple[dict, list, list]:
        """Rounds of build -> drop what saved nothing -> choose and verify again: (mix, its trials, rounds)."""
        from ..cast.autocast import Autocast
        ac = ctx.following(Autocast, self)
        keep_ops, keep_nodes = (ac.keep_fp32_ops, ac.keep_fp32_nodes) if ac is not None else ((), ())
        writer = aq_engine.Writer(ctx.graph, self.configs(), amax, means, ctx.high_precision, keep_ops, keep_nodes,
                                  self.block_size, cands.clips, self.min_opset, self._engine_profiles(search),
                                  str(ctx.workdir), smooth=cands.smooth, clip_of=cands.clip_of,
                                  smooth_of=cands.smooth_of)
        last = {"trials": trials}

        def choose():
            m, last["trials"] = self._choose(ev, cands, ctx)
            return m
        split = self._split()
        mix, rounds = aq_engine.refine(mix, choose, writer, cands.layers, lambda m: ev.metrics(ev.gates(m), split))
        return mix, last["trials"], rounds

    def _evaluator(self, ctx, cands, amax, means, search, verify, codes: dict):
        fp32 = modelfile.export_graph(ctx.graph)
        n = self.stages or autoquant.staged.stages_needed(fp32, cands.layers, ctx.memory_budget_mb)
        if n > 1 and self.target_psnr is not None:
            raise OnnxoptError(f"--target-psnr runs the sampler on one gated graph, but this model needs {n} stages "
                               "within --memory-budget; raise --memory-budget (or use --target-cosine)")
        if n > 1 and self.lowrank is not None:
            raise OnnxoptError(f"--lowrank with --auto runs one gated graph, but this model needs {n} stages within "
                               "--memory-budget; raise --memory-budget (or drop --lowrank)")
        if n > 1 and modelfile.has_subgraphs(fp32.graph):
            log.warning("auto: the model has subgraphs (If/Loop); evaluating it in one gated graph, not %d stages", n)
            n = 1
        where = autoquant.staged.fp32_stages(fp32, n, search[0], cands.layers) if n > 1 else {}
        gated = modelfile.import_graph(fp32)
        del fp32
        index = autoquant.build_gated(gated, cands, amax, means, ctx.high_precision, self.block_size, ctx.progress,
                                      threads=ctx.threads, codes=codes)
        shapes = autoquant.shape_outputs(gated, list(cands.layers))
        model = modelfile.export_graph(gated, opset=self.min_opset)
        del gated
        if n > 1:
            ev = autoquant.staged.StagedEvaluator(model, index, search, verify, ctx.provider, shapes, where,
                                                  workdir=ctx.workdir, progress=ctx.progress,
                                                  memory_budget_mb=ctx.memory_budget_mb)
        else:
            ev = autoquant.Evaluator(model, index, search, verify, ctx.provider, shapes)
        self._stages_used = n  # staged sensitivities differ from one-graph ones: part of their key
        seen: dict = {}
        for out, (layer, tag) in shapes.items():
            seen.setdefault(layer, {})[tag] = ev.shapes[out]
        for name, l in cands.layers.items():  # MACs over all search feeds
            l.macs = sum(autoquant.macs_of(l, i, o) for i, o in zip(seen[name]["in"], seen[name]["out"]))
        return ev

    def _key(self, ctx, graph, feeds) -> str:
        """What the sensitivities depend on: the layers, their candidates and the data."""
        h = hashlib.sha1()
        h.update(str(len(feeds)).encode())
        for f in (feeds[0], feeds[-1]):
            for k in sorted(f):
                h.update(k.encode() + np.ascontiguousarray(f[k]).tobytes()[:1 << 20])
        h.update(repr((self.formats, self.block_size, self.awq_clip, self.block_awq, self.block_smooth, self.exclude, self.op_types, self.quantize_mha,
                       self.verify_fraction, self.merge_batch, ctx.high_precision)).encode())
        if self.lowrank is not None:  # branch candidates: their ranks decide their sensitivities
            h.update(f"lowrank={self.lowrank},{self.lowrank_budget},{self.lowrank_smooth}".encode())
        if getattr(self, "_stages_used", 1) > 1:
            h.update(f"stages={self._stages_used},{autoquant.staged.ERROR_BATCHES},{autoquant.staged.GAIN_BATCHES}".encode())
        for n in graph.nodes:
            h.update(f"{n.op}:{n.name};".encode())
        return h.hexdigest()

    def _report(self, cands, mix, trials, final, inserted, measured, guards, timings, written=None) -> dict:
        bits = autoquant.bits_of(mix, cands.layers)
        layers = {}
        for n, l in cands.layers.items():
            f = mix[n]
            layers[n] = {"op": l.op, "candidates": l.formats, "not_candidates": l.reasons,
                         "sensitivity": {k: float(v) for k, v in l.error.items()}, "choice": f,
                         "reason": _reason(l, f), "params": l.params, "macs": l.macs, **inserted.get(n, {})}
            if l.branch:  # what its branch candidates add
                b = next(iter(l.branch.values()))
                layers[n]["branch"] = {"rank": b.rank, "bytes": b.params * lowrank.BRANCH_BYTES,
                                       "macs": l.branch_macs(next(iter(l.branch))), "chosen": has_branch(f),
                                       "smoothed": [c for c in l.branch if cands.smooth_of(n, c) is not None]}
        units, _ = autoquant.collapse(cands.layers)
        for n, l in cands.layers.items():  # a tied layer is kept wide by its group's summed error, not its own
            u = units.get(l.group)
            if u is not None and mix[n] == "none" and not l.follows and len(u.formats) > 1:
                layers[n]["reason"] = (f"kept FP16 with its group {l.group} ({len(u.parts)} layers): every format costs "
                                       f"more error than the target allows (the group's least "
                                       f"{min(v for k, v in u.error.items() if k != 'none'):.2e})")
        cands_all = list(dict.fromkeys(c for l in cands.layers.values() for c in l.formats if c != "none"))
        counts = {f: sum(v == f for v in mix.values()) for f in (*autoquant.FORMATS, *cands_all, "none")}
        target = {"cosine": self.target_cosine, "top1": self.target_top1, "bits": self.bits, "psnr": self.target_psnr}
        broken = int8_broken(cands.layers, mix)
        if broken:
            log.info("INT8 breaks %d layer(s) (10x the median INT8 error, 3x their FP8 error): %s", len(broken),
                     ", ".join(b["layer"] for b in broken[:8]) + (" ..." if len(broken) > 8 else ""))
        log.info("auto: %s; cosine %.5f (+-%.1e stderr, n %d, margin %.1e), top-1 %.4f; weight bits %.2f, activation "
                 "bits %.2f, 8-bit MACs %.0f%%", ", ".join(f"{k} {v}" for k, v in counts.items() if v), final["cosine"],
                 final["cosine_se"], final["n"], _margin_used(self, final), final["top1"],
                 bits["weight_bits"], bits["activation_bits"], 100 * bits["macs_8bit"])
        return {"method": "lagrangian knapsack over per-layer sensitivities (1 - cosine, one layer quantized at a time, "
                          "gated fake-quant graph; int8-sq: SmoothQuant alpha and INT8 clip per activation by simulated "
                          "error); error budget bisected (to 1.15x) against the metric on every calibration sample, a "
                          "cosine with k standard errors of the mean per-sample cosine to spare",
                "target": {k: v for k, v in target.items() if v is not None}, "metric": self.metric,
                "verified": final, "verified_written": written, "met": _met(self, written or final),
                "met_on": "written graph" if written is not None else "gated graph",
                "margin": _margin_used(self, final), **bits, "counts": counts, "layers": layers,
                "int8_broken": broken, "trials": trials, "measured_now": measured, "attention_guards_removed": guards,
                "coverage": {"quantized": sum(v != "none" for v in mix.values()),
                             "skipped": sum(v == "none" for v in mix.values()), **counts},
                "timings_s": timings}


def _branch_report(p: AutoQuant, cands, mix: dict, no_branch: dict) -> dict:
    """The low-rank branch candidates: ranks offered, chosen, their bytes and MACs, and why layers had none."""
    with_branch = {n: l for n, l in cands.layers.items() if l.branch}
    chosen = {n: {"choice": mix[n], "rank": l.branch[mix[n]].rank, "bytes": l.branch[mix[n]].params * lowrank.BRANCH_BYTES,
                  "macs": l.branch_macs(mix[n]), "smoothed": cands.smooth_of(n, mix[n]) is not None}
              for n, l in with_branch.items() if has_branch(mix[n])}
    return {"rank": p.lowrank or "auto", "budget": p.lowrank_budget, "smooth": p.lowrank_smooth,
            "candidate_layers": len(with_branch),
            "ranks": {n: next(iter(l.branch.values())).rank for n, l in with_branch.items()}, "chosen": chosen,
            "bytes": int(sum(c["bytes"] for c in chosen.values())), "macs": float(sum(c["macs"] for c in chosen.values())),
            "no_branch": no_branch}


def int8_broken(layers: dict, mix: dict) -> list:
    """Layers where INT8 W8A8 breaks, worst first: alone in INT8 they cost more than 10x the median layer's INT8
    error and more than 3x their own FP8 error (where FP8 was measured): the signature of outlier channels that a
    per-tensor INT8 scale cannot hold while FP8's exponent can."""
    fmt, ref = registry.INT8.name, registry.FP8.name   # the format that breaks, the one whose exponent holds
    errs = {n: l.error[fmt] for n, l in layers.items() if fmt in l.error}
    if not errs:
        return []
    limit = 10 * float(np.median(list(errs.values())))
    out = [{"layer": n, f"{fmt}_error": e, f"{ref}_error": layers[n].error.get(ref), "choice": mix[n]}
           for n, e in errs.items() if e > limit and e > 3 * (layers[n].error.get(ref) or 0.0)]
    return sorted(out, key=lambda b: -b["int8_error"])


def _margin_used(p: AutoQuant, final: dict) -> float:
    """What the held-out metric had to clear the target by: fixed, or k standard errors of the final mix's mean."""
    margin, k = p._margin()
    return float(margin + k * final.get(f"{p.metric}_se", 0.0))


def _met(p: AutoQuant, final: dict):
    """The target met with the verification margin to spare (what the search asked of every mix)."""
    if p.bits is not None:
        return None
    target = {"cosine": p.target_cosine, "top1": p.target_top1, "psnr": p.target_psnr}[p.metric]
    return bool(final[p.metric] >= target + _margin_used(p, final))


def _reason(l, f: str) -> str:
    if l.follows and len(l.formats) > 1:
        return f"{f}: follows the reader of its block ({l.group}: autoquant/groups.py)"
    if len(l.formats) == 1:
        return "no candidate format: " + "; ".join(f"{k}: {v}" for k, v in l.reasons.items())
    if f == "none":
        return "kept FP16: every format costs more error than the target allows " + \
               f"(least {min(v for k, v in l.error.items() if k != 'none'):.2e})"
    cheaper = [k for k in l.formats if l.weight_bits(k) < l.weight_bits(f)]
    if cheaper:
        return f"{f}: {','.join(cheaper)} cost more error ({', '.join(f'{l.error[k]:.2e}' for k in cheaper)})"
    return f"{f}: error {l.error[f]:.2e} within the budget"


# ---------------------------------------------------------------- data
def _chosen_codes(codes: dict, mix: dict) -> dict:
    """`writer.write(quantized=)` of the layers whose chosen format the gated graph quantized per channel: the same
    codes, scales and bias shift the writer would compute (a smoothed or branch candidate is another format)."""
    return {(c.const, f): c.written() for (layer, f), c in codes.items() if mix.get(layer) == f}


def split_feeds(data, verify_fraction: float, merge: int) -> tuple[list, list]:
    """Calibration feeds merged into batches of up to `merge` samples (where every input carries the batch),
    split into (search, verify): the last `verify_fraction` of the samples are held out."""
    feeds = list(data)
    if len(feeds) < 2:
        raise OnnxoptError(f"--auto needs at least 2 calibration samples (one to search, one to verify); got {len(feeds)}")
    n_verify = max(1, int(round(len(feeds) * verify_fraction)))
    if any(s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 for s in getattr(data, "specs", ())):
        merge = 1  # a static batch dimension (the usual TensorRT export): ORT takes no stacked feed
    return Feeds(_merge(feeds[:-n_verify], merge)), Feeds(_merge(feeds[-n_verify:], merge))


class Feeds(list):
    """Feed dicts in memory, usable wherever calibration reads a CalibData."""
    describe = "the calibration data (--auto search split)"


def _merge(feeds: list, merge: int) -> list:
    def key(f):
        lead = {v.shape[0] for v in f.values() if v.ndim}
        if len(lead) != 1 or any(v.ndim == 0 for v in f.values()):
            return None
        return tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(f.items()))
    out, group = [], []
    for f in feeds:
        k = key(f)
        if group and (k is None or k != key(group[0]) or len(group) >= merge):
            out.append(_cat(group))
            group = []
        if k is None:
            out.append(f)
        else:
            group.append(f)
    if group:
        out.append(_cat(group))
    return out


def _cat(group: list) -> dict:
    return group[0] if len(group) == 1 else {k: np.concatenate([g[k] for g in group]) for k in group[0]}
