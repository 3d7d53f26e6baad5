"""im2col: a Conv input seen as rows of patches, so that a Conv is a MatMul of rows and the reshaped weight.

Rows are [output positions, prod(kernel) * C] with the channel fastest (the weight as [K, *kernel, C]); the
Hessian XᵀX of these rows is what SparseGPT needs for a Conv layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_BYTES = 64 * 2**20  # rows are materialised in chunks of this size


@dataclass(frozen=True)
class ConvView:
    kernel: tuple
    strides: tuple
    pads: tuple
    dilations: tuple
    auto_pad: str

    @classmethod
    def of(cls, node, kernel) -> "ConvView":
        """The view of an onnx-graphsurgeon Conv node with this kernel shape."""
        nd = len(kernel)
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        return cls(tuple(int(k) for k in kernel), tuple(node.attrs.get("strides") or [1] * nd),
                   tuple(node.attrs.get("pads") or [0] * 2 * nd), tuple(node.attrs.get("dilations") or [1] * nd),
                   str(auto_pad))

    def padding(self, spatial) -> tuple[list[int], list[int]]:
        """(pads at the beginning, pads at the end) of each spatial axis, auto_pad resolved."""
        nd = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(nd):
                ext = (self.kernel[i] - 1) * self.dilations[i] + 1
                out = -(-spatial[i] // self.strides[i])
                total = max((out - 1) * self.strides[i] + ext - spatial[i], 0)
                small, big = total // 2, total - total // 2
                begin.append(big if self.auto_pad == "SAME_LOWER" else small)
                end.append(small if self.auto_pad == "SAME_LOWER" else big)
            return begin, end
        if self.auto_pad == "VALID":
            return [0] * nd, [0] * nd
        return list(self.pads[:nd]), list(self.pads[nd:])


def im2col(x: np.ndarray, c: ConvView, dim: int):
    """Rows [positions, prod(kernel) * C] of a Conv input x [N, C, *spatial], in chunks of about CHUNK_BYTES."""
    nd = len(c.kernel)
    ext = [(k - 1) * d + 1 for k, d in zip(c.kernel, c.dilations)]
    pads_b, pads_e = c.padding(x.shape[2:])
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads_b, pads_e)))
    win = np.lib.stride_tricks.sliding_window_view(xp, ext, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in c.strides)
              + tuple(slice(None, None, d) for d in c.dilations)]  # [N, C, *out, *kernel]
    perm = (0,) + tuple(range(2, 2 + 2 * nd)) + (1,)                # [N, *out, *kernel, C]
    win = win.transpose(perm)
    per_row = dim * 4
    first = win.shape[1] if nd else 1
    rows_per_slice = int(np.prod(win.shape[2:2 + nd - 1])) if nd > 1 else 1
    step = max(1, CHUNK_BYTES // max(per_row * rows_per_slice, 1))
    for b in range(win.shape[0]):
        for i in range(0, first, step):
            yield win[b, i:i + step].reshape(-1, dim)
