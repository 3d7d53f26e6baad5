"""One pass per technique, each with typed options checked when it is built. Stack them in a recipe:

    onnxopt.run([Sparsify("2:4"), SmoothQuant(0.8), QDQ("int8"), Autocast("fp16")], "m.onnx", "out.onnx",
                data="calib.npz")

Each pass adapts its options to a technique module's keyword entry point (Sparsify: sparsity, SmoothQuant:
smoothquant, AWQ: awq, LowRank: lowrank, QDQ/Int4/BlockFP: quant.rules/calibration/writer, AutoQuant: autoquant,
Autocast: autocast); docs/ARCHITECTURE.md "Map" has the table.
"""
from .autocast import Autocast
from .autoquant import AutoQuant
from .awq import AWQ
from .blockfp import BlockFP
from .int4 import Int4
from .lowrank import LowRank
from .qdq import QDQ
from .smoothquant import SmoothQuant
from .sparsify import Sparsify

__all__ = ["AutoQuant", "Sparsify", "SmoothQuant", "AWQ", "QDQ", "Int4", "BlockFP", "LowRank", "Autocast"]
