"""Final-sample PSNR of terrain UNet candidates at 1 and 3 consistency steps on held-out seeds 1000-1007, the FP32
trajectories sampled once and cached in --work (what `onnxopt compare $T q.onnx --sampler consistency --steps N
--seeds 1000-1007` computes, without sampling the reference again for every candidate).

    python tools/terrain_defaults.py --work /tmp/dflt q1.onnx q2.onnx ... [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's onnxopt

from onnxopt import sampler as S  # noqa: E402

SEEDS = tuple(range(1000, 1008))


def terrain_model() -> Path:
    import terrain_diffusion
    return Path(terrain_diffusion.__file__).parent / "weights" / "terrain_consistency_unet_difficulty100.onnx"


def reference(work: Path, opts: S.SamplerOptions) -> S.Trajectory:
    """The FP32 trajectory of `opts`, from the cache or sampled and cached."""
    path = work / f"ref_{opts.n_steps}.npz"
    if path.is_file():
        z = np.load(path)
        return S.Trajectory([z[f"s{i}"] for i in range(len(z["levels"]))], [float(v) for v in z["levels"]])
    m = S.load_model(str(terrain_model()))
    t = S.run_all(m, S.roles(m, opts), opts, None, "cpu", "the reference")
    np.savez(path, levels=np.asarray(t.levels), **{f"s{i}": s for i, s in enumerate(t.steps)})
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", default="1,3")
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in a.models:
        row = {"model": path}
        for n in (int(v) for v in a.steps.split(",")):
            opts = S.SamplerOptions("consistency", n, None, SEEDS)
            t = time.perf_counter()
            res = S.compare_sampled(str(terrain_model()), path, opts, reference_run=reference(work, opts))
            f = res.final
            row[f"{n}"] = {"psnr": round(f.psnr_mean, 2), "worst": round(f.psnr_worst, 2), "ssim": round(f.ssim_mean, 4),
                           "s": round(time.perf_counter() - t, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
