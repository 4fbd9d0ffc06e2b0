"""Builders for ModelScope's own networks, the reference every parity test runs against."""

import torch

from modelscope_t2v.config import AutoencoderConfig, TextEncoderConfig, UNetConfig


def reference_unet(config: UNetConfig):
    """ModelScope's UNetSD built as its TextToVideoSynthesis model builds it."""
    from modelscope.models.multi_modal.video_synthesis.unet_sd import UNetSD
    return UNetSD(in_dim=config.in_dim, dim=config.dim, y_dim=config.y_dim,
                  context_dim=config.context_dim, out_dim=config.out_dim,
                  dim_mult=list(config.dim_mult), num_heads=config.num_heads,
                  head_dim=config.head_dim, num_res_blocks=config.res_blocks,
                  attn_scales=list(config.attn_scales), dropout=config.dropout,
                  temporal_attention=config.temporal_attention).eval()


def reference_autoencoder(config: AutoencoderConfig, ckpt_path=None):
    """ModelScope's AutoencoderKL with the ddconfig our config describes (it hard-codes the real one)."""
    from modelscope.models.multi_modal.video_synthesis.autoencoder import AutoencoderKL
    ddconfig = dict(double_z=True, z_channels=config.z_channels, resolution=256,
                    in_channels=config.in_channels, out_ch=config.in_channels, ch=config.ch,
                    ch_mult=list(config.ch_mult), num_res_blocks=config.res_blocks,
                    attn_resolutions=[], dropout=0.0)
    return AutoencoderKL(ddconfig, embed_dim=config.z_channels, ckpt_path=ckpt_path).eval()


def reference_clip(config: TextEncoderConfig):
    """open_clip's CLIP with our text tower and a one-block 32-pixel vision tower, uninitialised.

    Built on the meta device (open_clip's initialisation of 350M parameters is slow) and
    materialised empty: callers fill it. The causal mask, a buffer, is taken from the
    same CLIP built for real at one block.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    def build(layers: int):
        text_cfg = CLIPTextCfg(context_length=config.context_length, vocab_size=config.vocab_size,
                               width=config.width, heads=config.heads, layers=layers,
                               mlp_ratio=config.mlp_ratio)
        vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, image_size=32, patch_size=16)
        return CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()

    with torch.device('meta'):
        clip = build(config.layers)
    clip.to_empty(device='cpu')
    clip.attn_mask = build(1).attn_mask       # (n, n): 0 on and below the diagonal, -inf above
    assert clip.attn_mask.shape == (config.context_length,) * 2 and clip.attn_mask[0, 1] == -float('inf')
    return clip


def reference_penultimate(clip, tokens: torch.Tensor) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder(layer='penultimate') as meant, in open_clip's layout."""
    x = clip.token_embedding(tokens) + clip.positional_embedding   # (b, n, c)
    seq_first = not clip.transformer.batch_first
    if seq_first:
        x = x.permute(1, 0, 2)
    for block in clip.transformer.resblocks[:-1]:
        x = block(x, attn_mask=clip.attn_mask)
    if seq_first:
        x = x.permute(1, 0, 2)
    return clip.ln_final(x)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter, zero-initialised ones included, with seeded noise.

    Norm weights are drawn around 1 so activations stay of order one.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            is_norm_weight = name.endswith('weight') and p.ndim == 1
            p.copy_(noise + 1.0 if is_norm_weight else noise)
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst element error relative to the largest reference magnitude."""
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
