"""Builders for ModelScope's own networks, the reference every parity test runs against."""

import torch

from modelscope_t2v.config import UNetConfig


def reference_unet(config: UNetConfig):
    """ModelScope's UNetSD built as its TextToVideoSynthesis model builds it."""
    from modelscope.models.multi_modal.video_synthesis.unet_sd import UNetSD
    return UNetSD(in_dim=config.in_dim, dim=config.dim, y_dim=config.y_dim,
                  context_dim=config.context_dim, out_dim=config.out_dim,
                  dim_mult=list(config.dim_mult), num_heads=config.num_heads,
                  head_dim=config.head_dim, num_res_blocks=config.res_blocks,
                  attn_scales=list(config.attn_scales), dropout=config.dropout,
                  temporal_attention=config.temporal_attention).eval()


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
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
