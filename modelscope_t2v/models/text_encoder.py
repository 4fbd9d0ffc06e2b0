"""OpenCLIP ViT-H-14 text tower, read at the penultimate layer: tokens (b, 77) -> (b, 77, 1024).

ModelScope's FrozenOpenCLIPEmbedder wraps open_clip's CLIP and runs every
transformer block but the last; this module holds only those blocks, under the
parameter names of open_clip_pytorch_model.bin, so the checkpoint's text keys
load strictly. Attention is causal, as open_clip's -inf upper-triangle mask.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig


class CausalSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (keys in_proj_*, out_proj.*) run through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f'text width={width} is not divisible by heads={heads}')
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, n, c) -> q, k, v: (b, h, n, d); view ops, not einops, as in the UNet (layers.py says why)
        q, k, v = (p.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).flatten(2))                           # (b, n, h d)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); exact GELU as ViT-H-14."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = nn.Sequential(OrderedDict([
            ('c_fc', nn.Linear(width, hidden)),
            ('gelu', nn.GELU()),
            ('c_proj', nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The stack of blocks; a module of its own only for the key prefix `transformer.resblocks`."""

    def __init__(self, width: int, heads: int, layers: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class OpenCLIPTextEncoder(nn.Module):
    """Token ids (b, context_length) -> per-token embeddings (b, context_length, width)."""

    def __init__(self, config: TextEncoderConfig, layers: int | None = None):
        super().__init__()
        layers = config.used_layers if layers is None else layers
        if not 0 <= layers <= config.layers:
            raise ValueError(f'layers={layers} is outside 0..{config.layers} '
                             f'(the checkpoint holds {config.layers} blocks)')
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = TextTransformer(config.width, config.heads, layers, config.mlp_ratio)
        self.ln_final = nn.LayerNorm(config.width, eps=1e-5)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Set every parameter: open_clip's initial scales, so random checkpoints stay of order one."""
        width, depth = self.config.width, self.config.layers
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        stds = {'token_embedding.weight': 0.02, 'positional_embedding': 0.01,
                'attn.in_proj_weight': attn_std, 'attn.out_proj.weight': proj_std,
                'mlp.c_fc.weight': (2 * width) ** -0.5, 'mlp.c_proj.weight': proj_std}
        for name, p in self.named_parameters():
            std = next((v for k, v in stds.items() if name.endswith(k)), None)
            if std is not None:
                p.normal_(0.0, std, generator=generator)
            elif name.endswith('bias'):
                p.zero_()
            else:                                   # LayerNorm weights
                p.fill_(1.0)

    def compile_regions(self) -> list:
        """The blocks compiled ahead of time (compile_cache.py): all alike, so one is built and each loads it."""
        return list(self.transformer.resblocks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.config.context_length
        if tokens.ndim != 2 or tokens.shape[1] != n:
            raise ValueError(f'tokens have shape {tuple(tokens.shape)}; expected (batch, {n})')
        x = self.token_embedding(tokens) + self.positional_embedding  # (b, n, c)
        x = self.transformer(x)
        return self.ln_final(x)


_TOP_LEVEL_KEYS = ('token_embedding.weight', 'positional_embedding',
                   'ln_final.weight', 'ln_final.bias')


def is_text_tower_key(key: str, config: TextEncoderConfig, layers: int | None = None) -> bool:
    """Whether checkpoint `key` is a parameter of OpenCLIPTextEncoder(config, layers).

    The CLIP checkpoint also holds visual.*, text_projection, logit_scale and the
    last block, which the penultimate-layer encoder never runs.
    """
    layers = config.used_layers if layers is None else layers
    if key in _TOP_LEVEL_KEYS:
        return True
    parts = key.split('.')
    return (len(parts) > 3 and parts[:2] == ['transformer', 'resblocks']
            and parts[2].isdigit() and int(parts[2]) < layers)

