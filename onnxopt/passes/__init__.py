"""Every pass of a recipe, by name. Stack them:

    onnxopt.run([Sparsify("2:4"), SmoothQuant(0.8), QDQ("int8"), Autocast("fp16")], "m.onnx", "out.onnx",
                data="calib.npz")

A rewrite's pass lives in its technique module (`rewrite/`: Sparsify, SmoothQuant, AWQ, LowRank; `cast/`:
Autocast); the quantizing passes live here (QDQ, Int4, BlockFP, AutoQuant over `quant/` and `autoquant/`).
The protocol they share is `onnxopt.pass_protocol`; docs/ARCHITECTURE.md "Map" has the table.
"""
from ..cast.autocast import Autocast
from ..rewrite.awq import AWQ
from ..rewrite.lowrank import LowRank
from ..rewrite.smoothquant import SmoothQuant
from ..rewrite.sparsity import Sparsify
from .autoquant import AutoQuant
from .blockfp import BlockFP
from .weight_only import Int4
from .static_qdq import QDQ

__all__ = ["AutoQuant", "Sparsify", "SmoothQuant", "AWQ", "QDQ", "Int4", "BlockFP", "LowRank", "Autocast"]
