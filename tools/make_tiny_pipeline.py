"""A tiny Stable-Diffusion-style diffusers pipeline folder with seeded random weights, built offline, and its
UNet exported to ONNX: the test asset of `compare --pipeline` and `calib-data trajectory --pipeline`.

    python tools/make_tiny_pipeline.py tiny-sd          # tiny-sd/{model_index.json, unet/, vae/, ...},
                                                        # tiny-sd/unet.onnx, tiny-sd/prompts.txt
    python tools/make_tiny_pipeline.py tiny-sdxl --sdxl # StableDiffusionXLPipeline: two text encoders, the UNet
                                                        # takes text_embeds and time_ids (models/sdxl_unet's export)

Nothing is downloaded: the UNet (UNet2DConditionModel), text encoder (CLIPTextModel), VAE (AutoencoderKL) come
from small configs with seeded random weights; the CLIP tokenizer is built from a byte-level vocabulary and a
handful of merges written here. Images are 32x32 pixels (16x16 latents, the VAE downsamples by 2).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of lemons")
IMAGE = 32
MERGES = ("t h", "th e</w>", "i n", "o n", "e r", "s t", "r e")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP's reversible byte -> printable character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: Path) -> None:
    """A CLIPTokenizer (vocab.json, merges.txt) with every byte, every byte + </w>, a few merges, BOS/EOS."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))


def build(out: str | Path, seed: int = 0, sdxl: bool = False) -> Path:
    """Write the pipeline folder at `out` (save_pretrained), `out/unet.onnx` and `out/prompts.txt`; `sdxl`: an SDXL
    pipeline (two text encoders, 64-wide tokens, 32-wide pooled embeds, text_time added conditioning)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out)
    write_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    text = CLIPTextModel(cfg).eval()
    extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 6 * 8 + 32} if sdxl else {}
    unet = UNet2DConditionModel(sample_size=IMAGE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64 if sdxl else 32,
                                attention_head_dim=8, norm_num_groups=8, **extra).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=IMAGE).eval()
    # SD 1.x's scheduler config (scheduler/scheduler_config.json of stable-diffusion-v1-5), as Euler.
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=CLIPTextModelWithProjection(cfg).eval(),
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    if sdxl:  # the project's SDXL export recipe: inputs sample, timestep, encoder_hidden_states, text_embeds, time_ids
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from models.sdxl_unet import export_unet as export_sdxl
        export_sdxl(unet, out / "unet.onnx")
    else:
        export_unet(unet, out / "unet.onnx")
    return out


def export_unet(unet, path: Path) -> Path:
    """The UNet as FP32 ONNX (inputs sample, timestep, encoder_hidden_states; dynamic batch; output out_sample)."""
    import torch

    class Plain(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.u(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    c = unet.config
    args = (torch.randn(2, c.in_channels, c.sample_size, c.sample_size), torch.tensor([999.0]),
            torch.randn(2, 77, c.cross_attention_dim))
    with torch.inference_mode():
        torch.onnx.export(Plain(unet), args, str(path), dynamo=False, opset_version=17,
                          input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
                          dynamic_axes={"sample": {0: "batch"}, "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch"}})
    return path


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sdxl"]
    if len(args) != 1:
        sys.exit("usage: python tools/make_tiny_pipeline.py OUT_DIR [--sdxl]")
    print(f"wrote {build(args[0], sdxl='--sdxl' in sys.argv)}")
