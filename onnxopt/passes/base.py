"""What every pass shares: defaults of the Pass protocol and option checks."""
from __future__ import annotations

import re
from typing import ClassVar

from ..errors import OnnxoptError


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
    if value not in choices:
        raise OnnxoptError(f"unknown {option} '{value}'; use one of {', '.join(map(str, choices))}")


def after(recipe, index: int, kinds: tuple) -> list:
    """Passes of `kinds` after position `index`."""
    return [p for p in recipe[index + 1:] if isinstance(p, kinds)]


def one_quantizer(recipe) -> None:
    if sum(getattr(p, "quantizes", False) for p in recipe) > 1:
        raise OnnxoptError("a recipe quantizes once: use one QDQ or Int4 pass")
