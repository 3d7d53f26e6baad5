"""ALBERT-style weight sharing (one set of layer weights serving all 12 layers) from transformers, exported
to ONNX with random initial weights (no download), with calibration and evaluation ids.

    python tools/albert_shared.py OUT_DIR
    python -m onnxopt quantize OUT_DIR/albert.onnx --fp8 --calib OUT_DIR/calib.npz -o OUT_DIR/fp8.onnx
    python -m onnxopt compare OUT_DIR/albert.onnx OUT_DIR/fp8.onnx --calib OUT_DIR/eval.npz
"""
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AlbertConfig, AlbertModel


def main(out: str, seq: int = 64) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072)  # albert-base-v2 sizes
    model = AlbertModel(cfg).eval()   # 12 layers sharing one layer's weights
    ids = torch.randint(5, 30000, (1, seq))
    mask = torch.ones_like(ids)
    torch.onnx.export(model, (ids, mask), d / "albert.onnx", input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "b"}, "attention_mask": {0: "b"}, "last_hidden_state": {0: "b"}})
    rng = np.random.default_rng(0)
    for name, n in (("calib", 32), ("eval", 16)):
        np.savez(d / f"{name}.npz", input_ids=rng.integers(5, 30000, (n, 1, seq)).astype(np.int64),
                 attention_mask=np.ones((n, 1, seq), np.int64))
    print(f"wrote {d / 'albert.onnx'}, calib.npz, eval.npz")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "albert")
