"""Generate a small example model with calibration and evaluation data, for the README's first command.

    python tools/make_example.py example/
writes example/model.onnx (a pre-LN transformer block with token ids), calib.npz and eval.npz.
"""
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402  (the in-code test models, built with onnx.helper)


def main(out: str) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny.transformer(d=256, heads=4, seq=64), str(d / "model.onnx"))
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", ids=rng.integers(0, 50, (32, 1, 64)).astype(np.int64))
    np.savez(d / "eval.npz", ids=rng.integers(0, 50, (16, 1, 64)).astype(np.int64))
    print(f"wrote {d / 'model.onnx'}, {d / 'calib.npz'} (32 samples), {d / 'eval.npz'} (16 samples)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "example")
