"""SDXL-base UNet (UNet2DConditionModel) export recipe: real weights or seeded random ones, FP32 ONNX.

    python -m models.sdxl_unet --scale tiny -o unet.onnx            # random weights, small channels
    python -m models.sdxl_unet --checkpoint ./sdxl-base/unet -o unet.onnx   # the user's real weights

The config is SDXL-base's, embedded here so that no download is needed. Export is FP32 (the dynamo
exporter's FP16 graph is invalid; convert afterwards) with the legacy TorchScript exporter, opset 17,
dynamic batch and latent size, and all weights in one external-data file `<name>.onnx.data`.
Attention runs through `ExportAttnProcessor` (diffusers' SDPA processor with the head count, head
size and softmax scale as constants), which the legacy exporter decomposes into
Mul(q, sqrt(scale)) / Transpose(k) -> Mul(k, sqrt(scale)) -> MatMul -> Softmax -> MatMul on 4-D
[batch, heads, tokens, head_dim] tensors: the pattern TensorRT's fused MHA (and its FP8 variant) matches,
with a head size that shape inference can read.
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
OUTPUT_NAME = "latent"

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json. `attention_head_dim` is diffusers'
# historical misnomer: it holds the number of heads (5/10/20), so every head is 64 wide.
SDXL_BASE_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# Smaller variants keep the block structure and the input signature (2048-wide text tokens, 1280-wide
# pooled embeds, 6 time ids), so calibration data and presets apply unchanged.
SCALES = {
    "full": {},
    # head dim 32 (a size TensorRT's fused MHA supports), same depth: ~0.65B parameters
    "half": {"block_out_channels": [160, 320, 640]},
    # head dim 32, one or two transformer layers per block, 32x32 latents: seconds on a CPU. 8 norm
    # groups keep 4-16 channels per GroupNorm group (SDXL has 10-40); single-channel groups make a
    # random-weight UNet far more sensitive to quantization noise than the real one.
    "tiny": {"block_out_channels": [32, 64, 128], "attention_head_dim": [1, 2, 4],
             "transformer_layers_per_block": [1, 1, 2], "sample_size": 32, "norm_num_groups": 8},
}
FULL_PARAMETERS = 2_567_463_684  # SDXL-base UNet, as diffusers builds it


class ExportAttnProcessor:
    """SDPA attention for export: like diffusers' AttnProcessor2_0 on SDXL's path (3-D tokens, no mask,
    no norms), but head size and softmax scale are Python constants, not traced from tensor shapes, so
    the graph carries a static head dimension and a constant scale."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch.nn.functional as F
        if (attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.norm_cross or attn.residual_connection or hidden_states.ndim != 3
                or attn.norm_q is not None or attn.norm_k is not None):
            raise NotImplementedError("ExportAttnProcessor covers SDXL's attention only (3-D tokens, no mask or norms)")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads
        head_dim = attn.to_q.out_features // heads
        batch = hidden_states.shape[0]  # traced (dynamic); tokens are -1; heads and head_dim constants
        q = attn.to_q(hidden_states).view(batch, -1, heads, head_dim).transpose(1, 2)
        k = attn.to_k(context).view(batch, -1, heads, head_dim).transpose(1, 2)
        v = attn.to_v(context).view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def unet_config(scale: str = "full") -> dict:
    """SDXL-base's UNet config, with the channel/depth overrides of `scale` (full | half | tiny)."""
    from onnxopt.errors import OnnxoptError
    if scale not in SCALES:
        raise OnnxoptError(f"unknown scale '{scale}'; use one of {', '.join(SCALES)}")
    cfg = copy.deepcopy(SDXL_BASE_CONFIG)
    cfg.update(copy.deepcopy(SCALES[scale]))
    return cfg


def head_dims(config: dict) -> list[int]:
    """Width of one attention head in each block (channels / heads)."""
    return [c // h for c, h in zip(config["block_out_channels"], config["attention_head_dim"])]


def count_parameters(scale: str = "full") -> int:
    """Parameters of the UNet at `scale`, counted on the meta device (no memory for weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(scale))
    return sum(p.numel() for p in unet.parameters())


def build_unet(scale: str = "full", *, checkpoint: str | os.PathLike | None = None, seed: int = 0):
    """An FP32 UNet2DConditionModel in eval mode with the SDPA attention processor.

    `checkpoint` is a local diffusers UNet folder (config.json + weights; a pipeline folder's `unet/`
    subfolder is found too); without it the weights are seeded random (torch's default init).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from onnxopt.errors import OnnxoptError

    if checkpoint is not None:
        path = Path(checkpoint)
        if (path / "unet" / "config.json").is_file():
            path = path / "unet"
        if not (path / "config.json").is_file():
            raise OnnxoptError(f"{checkpoint}: no diffusers UNet here (config.json missing); pass the pipeline's unet/ folder")
        try:
            unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError) as e:
            raise OnnxoptError(f"{checkpoint}: cannot load the UNet weights ({str(e).splitlines()[0][:200]}); check the folder") from None
    else:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config(scale))
    unet = unet.to(torch.float32).eval()
    # Plain MatMul/Softmax/MatMul on 4-D heads, with a static head size: the pattern TensorRT fuses.
    unet.set_attn_processor(ExportAttnProcessor())
    return unet


def example_inputs(config: dict, batch: int = 2, latent_size: int | None = None, seq_len: int = 77, seed: int = 0):
    """Export-time inputs: (sample, timestep, encoder_hidden_states, text_embeds, time_ids), FP32."""
    import torch
    g = torch.Generator().manual_seed(seed)
    size = latent_size or config["sample_size"]
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return (
        torch.randn(batch, config["in_channels"], size, size, generator=g),
        torch.tensor([999.0]),
        torch.randn(batch, seq_len, config["cross_attention_dim"], generator=g),
        torch.randn(batch, text_dim, generator=g),
        torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch),
    )


def export_unet(unet, output: str | os.PathLike, *, opset: int = 17, batch: int = 2,
                latent_size: int | None = None) -> Path:
    """Export `unet` to FP32 ONNX at `output` with its weights in one `<output>.data` file."""
    import torch
    from onnxopt import modelfile

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    config = dict(unet.config)
    sample, timestep, ehs, text_embeds, time_ids = example_inputs(config, batch, latent_size)
    dynamic_axes = {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "encoder_hidden_states": {0: "batch"},
        "text_embeds": {0: "batch"},
        "time_ids": {0: "batch"},
        OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"},
    }
    # The trailing dict is passed as keyword arguments, so node names carry no wrapper prefix
    # (/time_embedding/linear_1/Gemm, /down_blocks.1/attentions.0/...).
    args = (sample, timestep, ehs, {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids},
                                    "return_dict": False})
    with tempfile.TemporaryDirectory(prefix=".sdxl-export-", dir=output.parent) as tmp:
        raw = Path(tmp) / "unet.onnx"
        t0 = time.perf_counter()
        with torch.inference_mode():
            torch.onnx.export(unet, args, str(raw), dynamo=False, opset_version=opset,
                              input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        log.info("torch export took %.1f s", time.perf_counter() - t0)
        # The legacy exporter writes one file per tensor above 2 GB; gather them into one data file,
        # streaming one tensor at a time.
        model = modelfile.load(raw)
        modelfile.save(model, output, external_data=True)
    return output


def plant_outliers(unet, factor: float, channels: int = 16, seed: int = 0) -> int:
    """Massive activations, as trained diffusion transformers and LLMs show them, planted without changing the
    function: in every transformer block a few hidden channels of the feed-forward (GEGLU value half) and of the
    attention values are multiplied by `factor` and the weights that read them divided by it (GEGLU and
    softmax·V are linear in those channels). FP32 outputs stay the same up to rounding; a per-tensor INT8 scale
    of the layers reading them does not. Returns the number of tensors given outliers."""
    import torch
    from diffusers.models.attention import BasicTransformerBlock

    g = torch.Generator().manual_seed(seed)
    planted = 0
    with torch.no_grad():
        for block in (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)):
            proj, out = block.ff.net[0].proj, block.ff.net[2]
            inner = out.in_features
            for k in torch.randperm(inner, generator=g)[:channels].tolist():
                proj.weight[k] *= factor
                proj.bias[k] *= factor
                out.weight[:, k] /= factor
            for attn in (block.attn1, block.attn2):
                heads = attn.to_out[0].in_features
                for k in torch.randperm(heads, generator=g)[:channels].tolist():
                    attn.to_v.weight[k] *= factor
                    if attn.to_v.bias is not None:
                        attn.to_v.bias[k] *= factor
                    attn.to_out[0].weight[:, k] /= factor
            planted += 3
    return planted


def export(output: str | os.PathLike, *, scale: str = "full", checkpoint: str | os.PathLike | None = None,
           seed: int = 0, opset: int = 17, batch: int = 2, latent_size: int | None = None,
           outliers: float = 0.0) -> Path:
    """Build (random weights at `scale`, or the checkpoint's) and export the SDXL UNet to `output`
    (`outliers` > 1: `plant_outliers` with that factor first)."""
    from onnxopt.errors import OnnxoptError
    if opset < 17:
        raise OnnxoptError(f"opset {opset} is too old for the SDXL UNet (LayerNormalization); use --opset 17 or newer")
    if outliers and outliers <= 1:
        raise OnnxoptError(f"--outliers {outliers}: use a factor above 1 (e.g. 100), or leave it out")
    unet = build_unet(scale, checkpoint=checkpoint, seed=seed)
    if outliers:
        log.info("planted outlier channels in %d tensors (factor %g)", plant_outliers(unet, outliers, seed=seed), outliers)
    try:
        return export_unet(unet, output, opset=opset, batch=batch, latent_size=latent_size)
    finally:
        del unet


def _main():
    import click

    from onnxopt.cli.common import handle_errors

    @click.command()
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx (weights go to <output>.data).")
    @click.option("--scale", type=click.Choice(list(SCALES)), default="full", show_default=True, help="Random-weight size (ignored with --checkpoint).")
    @click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), help="Local diffusers UNet (or pipeline) folder with real weights.")
    @click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
    @click.option("--opset", default=17, show_default=True)
    @click.option("--latent-size", type=int, help="Latent side of the example input (default: the config's sample_size).")
    @click.option("--outliers", type=float, default=0.0, help="Plant massive activations (function-preserving) with this factor, e.g. 100: per-tensor INT8 then breaks as on trained UNets.")
    @click.option("--count", is_flag=True, help="Only print the parameter count (meta device) and exit.")
    @handle_errors
    def cli(output, scale, checkpoint, seed, opset, latent_size, outliers, count):
        """Export SDXL-base's UNet to FP32 ONNX."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if count:
            click.echo(f"{scale}: {count_parameters(scale):,} parameters")
            return
        t0 = time.perf_counter()
        path = export(output, scale=scale, checkpoint=checkpoint, seed=seed, opset=opset, latent_size=latent_size,
                      outliers=outliers)
        size = path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size
        click.echo(f"wrote {path} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")

    cli()


if __name__ == "__main__":
    _main()
