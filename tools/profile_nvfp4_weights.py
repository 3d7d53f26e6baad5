"""NVFP4 weight path at full SDXL size without the 10 GB export: every nn.Linear of the full-size SDXL UNet
(diffusers' config on the meta device, no weights held), one seeded random weight per distinct shape run through
the writer's quantizer (`NVFP4.quantize_parts`: tensor scale, per-block clip search, E2M1 codes), timed, and the
total extrapolated by how often each shape occurs. Peak RSS is this process's.

    python tools/profile_nvfp4_weights.py [--scale full] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt import formats  # noqa: E402


def linear_shapes(scale: str) -> Counter:
    """(K, N) of every nn.Linear of the UNet at `scale`, counted."""
    import torch
    from diffusers import UNet2DConditionModel

    from models.sdxl_unet import unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(scale))
    return Counter((m.in_features, m.out_features) for m in unet.modules() if isinstance(m, torch.nn.Linear))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    shapes = linear_shapes(a.scale)
    rng = np.random.default_rng(0)
    rows, total_s, total_p = [], 0.0, 0
    for (k, n), count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[1]):
        if k % formats.NVFP4.block_size:
            continue  # the rules keep it FP8
        w = rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.02)
        t = time.perf_counter()
        formats.NVFP4.quantize_parts(w)
        dt = time.perf_counter() - t
        rows.append({"k": k, "n": n, "count": count, "s_each": round(dt, 3), "ns_per_param": round(dt / (k * n) * 1e9, 1)})
        total_s += dt * count
        total_p += k * n * count
        print(json.dumps(rows[-1]), flush=True)
    out = {"scale": a.scale, "linear_params": total_p, "weight_path_s": round(total_s, 1),
           "ns_per_param": round(total_s / max(total_p, 1) * 1e9, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "shapes": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "shapes"}))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
