"""Quantize the example and tests/tiny.py models in the uniform and --auto modes and print a fingerprint of
each output (op counts, bytes, a hash of the graph's nodes and initializers), to show a refactor wrote the
same graphs.

    python tools/fingerprint.py OUT_DIR > before.txt     (run with PYTHONPATH at each checkout)
"""
import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402

MODES = {"fp8": ["--fp8"], "int8": ["--int8"], "int4-awq": ["--int4", "--awq", "full"],
         "auto": ["--auto", "--target-cosine", "0.995", "--formats", "fp8,int8,int4,int8-sq"]}


def models(d: Path) -> dict:
    """name -> (model path, calibration npz)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    onnx.save(tiny.transformer(d=256, heads=4, seq=64), d / "example.onnx")
    np.savez(d / "example.npz", ids=rng.integers(0, 50, (32, 1, 64)).astype(np.int64))
    out = {"example": (d / "example.onnx", d / "example.npz")}
    (d / "cnn").mkdir(exist_ok=True)
    out["cnn"] = tiny.model_and_calib(d / "cnn", tiny.cnn(), (16, 3, 16, 16))
    (d / "tr").mkdir(exist_ok=True)
    onnx.save(tiny.transformer(), d / "tr" / "tr.onnx")
    np.savez(d / "tr" / "calib.npz", ids=rng.integers(0, 50, (16, 1, 16)).astype(np.int64))
    out["transformer"] = (d / "tr" / "tr.onnx", d / "tr" / "calib.npz")
    return out


def fingerprint(path: Path) -> str:
    m = onnx.load(str(path))
    ops = Counter(n.op_type for n in m.graph.node)
    h = hashlib.sha256()
    for n in m.graph.node:
        h.update(n.SerializeToString())
    for t in sorted(m.graph.initializer, key=lambda t: t.name):
        h.update(t.SerializeToString())
    size = path.stat().st_size
    return f"{size} bytes, {sum(ops.values())} nodes {dict(sorted(ops.items()))}, sha {h.hexdigest()[:16]}"


def main(out: str) -> None:
    d = Path(out)
    for name, (model, calib) in models(d).items():
        for mode, flags in MODES.items():
            if name == "cnn" and mode == "int4-awq":
                continue
            o = d / f"{name}.{mode}.onnx"
            r = subprocess.run([sys.executable, "-m", "onnxopt", "quantize", str(model), "--calib", str(calib), "-o", str(o),
                                "-q", *flags], capture_output=True, text=True)
            print(f"{name} {mode}: " + (fingerprint(o) if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip()[-200:]}"),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fingerprint")
