"""The pass protocol: what a recipe step is (`Pass`), the defaults and option checks every pass shares
(`PassBase`, `check_*`), the typed hand-offs between passes (`AwqChoice`), and the kinds of quantizing pass a
rewrite before one may ask for (`StaticQuantizer`, `BlockQuantizer`, `WeightOnlyQuantizer`), so a technique module
(rewrite/, cast/) names the pass after it without importing passes/."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence, runtime_checkable

from .errors import OnnxoptError


@runtime_checkable
class Pass(Protocol):
    """A graph rewrite. Options are dataclass fields checked in __post_init__ (raising OnnxoptError)."""
    name: ClassVar[str]          # report section and timing key
    min_opset: ClassVar[int]     # default-domain opset the rewritten graph needs (0: any)

    @property
    def needs_data(self) -> bool: ...

    def check_recipe(self, recipe: Sequence["Pass"], index: int) -> None:
        """Raise OnnxoptError when this pass cannot run at `index` of `recipe` (e.g. AWQ without Int4 after it)."""

    def run(self, ctx) -> dict:
        """Rewrite `ctx.graph` (an `onnxopt.pipeline.Context`) in place; return the report section."""


class PassBase:
    """Defaults for `onnxopt.pipeline.Pass`; subclasses are dataclasses whose fields are the options."""
    name: ClassVar[str] = "pass"
    min_opset: ClassVar[int] = 0
    quantizes: ClassVar[bool] = False   # a recipe holds at most one quantizing pass

    @property
    def needs_data(self) -> bool:
        return False

    def check_recipe(self, recipe, index: int) -> None:
        return None


def check_regexes(patterns, option: str) -> tuple:
    """Compile each regex now, so a bad one is an error before any model is read."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns or ())
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise OnnxoptError(f"bad {option} regex '{p}': {e}; escape special characters (e.g. '\\[')") from None
    return patterns


def check_choice(value, choices, option: str) -> None:
    """An option's value among its choices, or a one-line error naming them."""
    if value not in choices:
        raise OnnxoptError(f"unknown {option} '{value}'; use one of {', '.join(map(str, choices))}")


def after(recipe, index: int, kinds: tuple) -> list:
    """Passes of `kinds` after position `index`."""
    return [p for p in recipe[index + 1:] if isinstance(p, kinds)]


def one_quantizer(recipe) -> None:
    """A recipe holds at most one quantizing pass."""
    if sum(getattr(p, "quantizes", False) for p in recipe) > 1:
        raise OnnxoptError("a recipe quantizes once: use one QDQ or Int4 pass")


@dataclass
class AwqChoice:
    """The AWQ pass's result for the Int4 pass: per layer, clip ratios or error-feedback rounded (codes, scales)."""
    clips: dict
    method: str


class StaticQuantizer(PassBase):
    """A static Q/DQ pass (passes.static_qdq.QDQ): `mode` names its format, `plan(graph)` its layers."""
    quantizes: ClassVar[bool] = True

    def plan(self, graph):
        """The quant.rules Plan of the layers this pass will quantize in `graph` as it is now."""
        raise NotImplementedError

    def smoothing_plan(self, graph):
        """The layers SmoothQuant before this pass smooths: by default those it will quantize."""
        return self.plan(graph)


class BlockQuantizer(StaticQuantizer):
    """A block-format pass (passes.blockfp.BlockFP): `fmt`, `weight_only` and `block_nodes(graph)` besides."""


class WeightOnlyQuantizer(PassBase):
    """A weight-only block pass (passes.weight_only.Int4): `format`, `block_size` and `select(graph)`."""
    quantizes: ClassVar[bool] = True
