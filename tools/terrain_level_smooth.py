"""SmoothQuant at a fixed alpha on the terrain UNet's full-resolution level only (the convs with 32 output channels
and more than one input channel), before `quantize --fp8`: the experiment of BENCHMARKS.md "Terrain UNet:
SmoothQuant for FP8" (issue 21). Not a shipped setting.

    PYTHONPATH=$PWD python tools/terrain_level_smooth.py 1.0 --calib /tmp/bs/calib.npz -o lvl.onnx
    PYTHONPATH=$PWD python -m onnxopt quantize lvl.onnx --fp8 --calib /tmp/bs/calib.npz -o q.onnx
    PYTHONPATH=$PWD python -m onnxopt compare $TERRAIN q.onnx --sampler consistency --steps 1 --seeds 1000-1007
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxopt.rewrite import smoothquant
from onnxopt.calib.data import CalibData, input_specs

LEVEL_CHANNELS = 32  # output channels of the 128x128 level's convs


def terrain_unet() -> str:
    """Path of the bundled consistency UNet (package adaptive-terrain-diffusion)."""
    import terrain_diffusion
    return str(Path(terrain_diffusion.__file__).parent / "weights" / "terrain_consistency_unet_difficulty100.onnx")


def at_level(n: gs.Node) -> bool:
    """A Conv of the full-resolution level (32 output channels, not the 1-channel stem)."""
    return (n.op == "Conv" and isinstance(n.inputs[1], gs.Constant)
            and n.inputs[1].values.shape[0] == LEVEL_CHANNELS and n.inputs[1].values.shape[1] > 1)


def main() -> None:
    """Smooth the level's convs and write the FP32 model."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("alpha", type=float)
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", required=True)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    model = onnx.load(a.model or terrain_unet())
    graph = gs.import_onnx(model)
    others = [n for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "MatMul", "Gemm") and not at_level(n)]
    data = CalibData.from_path(a.calib, input_specs(model))
    report = smoothquant.smooth(graph, data, None, alpha=a.alpha, op_types=("Conv",), progress=False,
                                exclude=tuple("^" + re.escape(n.name) + "$" for n in others))
    print(f"{len(report['groups'])} activations smoothed, {report['inserted_muls']} inserted Mul(s)")
    graph.cleanup().toposort()
    onnx.save(gs.export_onnx(graph), a.output)


if __name__ == "__main__":
    main()
