"""UNet3D of the ModelScope text-to-video model (VideoFusion, Luo et al. 2023).

A Stable-Diffusion 2D UNet on every frame, with a temporal convolution after
each ResBlock and a temporal transformer after each spatial transformer.
Between layers a video is folded as `(b f) c h w`; temporal layers unfold it.
Parameter names equal the original checkpoint keys (including its spelling
`temopral_conv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import UNetConfig
from .layers import TransformerBlock, timestep_embedding


@dataclass
class Conditioning:
    """What every layer may need beside its input."""
    emb: torch.Tensor       # (b f, embed_dim) timestep embedding, one row per frame
    context: torch.Tensor   # (b f, 77, context_dim) text embedding, one per frame
    frames: int             # f, to unfold (b f) for temporal layers


class InputConv(nn.Conv2d):
    """The first 3x3 convolution, latent channels -> dim."""

    def forward(self, x, cond):
        return super().forward(x)


class TemporalConv(nn.Module):
    """Four (GroupNorm, SiLU, 3x1x1 conv) stages along frames, residual."""

    def __init__(self, dim: int):
        super().__init__()

        def stage(with_dropout: bool) -> nn.Sequential:
            layers = [nn.GroupNorm(32, dim), nn.SiLU()]
            layers += [nn.Dropout(0.0)] if with_dropout else []  # keeps the checkpoint's indices
            return nn.Sequential(*layers, nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1 = stage(False)
        self.conv2 = stage(True)
        self.conv3 = stage(True)
        self.conv4 = stage(True)

    def forward(self, x):
        # x: (b, c, f, h, w)
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """Residual block with timestep embedding, then a temporal convolution."""

    def __init__(self, in_dim: int, embed_dim: int, out_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, in_dim), nn.SiLU(), nn.Conv2d(in_dim, out_dim, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_dim))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_dim), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_dim, out_dim, 3, padding=1))
        self.skip_connection = nn.Identity() if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, 1)
        self.temopral_conv = TemporalConv(out_dim)

    def forward(self, x, cond: Conditioning):
        # x: ((b f), c, h, w)
        h = self.in_layers(x) + self.emb_layers(cond.emb)[:, :, None, None].to(x.dtype)
        h = self.skip_connection(x) + self.out_layers(h)
        h = rearrange(h, '(b f) c h w -> b c f h w', f=cond.frames)
        h = self.temopral_conv(h)
        return rearrange(h, 'b c f h w -> (b f) c h w')


class SpatialTransformer(nn.Module):
    """Attention over the pixels of each frame, with cross-attention to the text."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, context_dim)])
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x, cond: Conditioning):
        # x: ((b f), c, h, w) -> tokens ((b f), h w, c)
        h, w = x.shape[-2:]
        y = self.proj_in(rearrange(self.norm(x), 'n c h w -> n (h w) c'))
        for block in self.transformer_blocks:
            y = block(y, cond.context)
        return x + rearrange(self.proj_out(y), 'n (h w) c -> n c h w', h=h, w=w)


class TemporalTransformer(nn.Module):
    """Self-attention along the frames of each pixel (two self-attentions, no text)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Conv1d(dim, inner, 1)     # 1x1 convolutions: linear maps over c
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, None)])
        self.proj_out = nn.Conv1d(inner, dim, 1)

    def forward(self, x, cond: Conditioning):
        # x: ((b f), c, h, w); GroupNorm statistics span all frames of a video
        h, w = x.shape[-2:]
        video = rearrange(x, '(b f) c h w -> b c f h w', f=cond.frames)
        y = rearrange(self.norm(video), 'b c f h w -> (b h w) f c')
        y = F.linear(y, self.proj_in.weight[..., 0], self.proj_in.bias)
        for block in self.transformer_blocks:
            y = block(y)
        y = F.linear(y, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + rearrange(y, '(b h w) f c -> (b f) c h w', h=h, w=w)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.op = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x, cond):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the size of the next skip, then a 3x3 conv.

    The original doubles the size, which is the same for sizes that divide
    evenly; following the skip also serves latents whose side is not a multiple
    of 2**levels (the original fails on those).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode='nearest'))


class UNetBlock(nn.ModuleList):
    """Layers applied in order; an Upsample takes the target size."""

    def forward(self, x, cond: Conditioning, size=None):
        for layer in self:
            x = layer(x, size) if isinstance(layer, Upsample) else layer(x, cond)
        return x


class UNet3D(nn.Module):
    """eps = UNet3D(x_t, t, text): (b, c, f, h, w) -> (b, c, f, h, w)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        dim, head_dim = config.dim, config.head_dim
        embed_dim = dim * 4

        def attention_layers(width: int) -> list:
            heads = width // head_dim
            layers = [SpatialTransformer(width, heads, head_dim, config.context_dim)]
            if config.temporal_attention:
                layers.append(TemporalTransformer(width, heads, head_dim))
            return layers

        self.time_embed = nn.Sequential(nn.Linear(dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

        # encoder: input conv, then per level res_blocks (ResBlock [+ attention]) and a Downsample
        first = [InputConv(config.in_dim, dim, 3, padding=1)]
        if config.temporal_attention:
            first.append(TemporalTransformer(dim, config.num_heads, head_dim))
        self.input_blocks = nn.ModuleList([UNetBlock(first)])
        skip_dims, width, scale = [dim], dim, 1.0
        levels = len(config.dim_mult)
        for level, mult in enumerate(config.dim_mult):
            for _ in range(config.res_blocks):
                block = [ResBlock(width, embed_dim, dim * mult)]
                width = dim * mult
                if scale in config.attn_scales:
                    block += attention_layers(width)
                self.input_blocks.append(UNetBlock(block))
                skip_dims.append(width)
            if level != levels - 1:
                self.input_blocks.append(Downsample(width))
                skip_dims.append(width)
                scale /= 2

        self.middle_block = UNetBlock([ResBlock(width, embed_dim, width), *attention_layers(width),
                                       ResBlock(width, embed_dim, width)])

        # decoder: per level res_blocks + 1 blocks, each eating one skip, and an Upsample
        self.output_blocks = nn.ModuleList()
        for level, mult in enumerate(reversed(config.dim_mult)):
            for j in range(config.res_blocks + 1):
                block = [ResBlock(width + skip_dims.pop(), embed_dim, dim * mult)]
                width = dim * mult
                if scale in config.attn_scales:
                    block += attention_layers(width)
                if level != levels - 1 and j == config.res_blocks:
                    block.append(Upsample(width))
                    scale *= 2
                self.output_blocks.append(UNetBlock(block))

        self.out = nn.Sequential(nn.GroupNorm(32, width), nn.SiLU(), nn.Conv2d(width, config.out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (b, c, f, h, w) noisy latents; t: (b,) diffusion times; context: (b, 77, context_dim)
        frames = x.shape[2]
        emb = self.time_embed(timestep_embedding(t, self.config.dim).to(x.dtype))
        cond = Conditioning(emb=emb.repeat_interleave(frames, dim=0),
                            context=context.repeat_interleave(frames, dim=0), frames=frames)
        h = rearrange(x, 'b c f h w -> (b f) c h w')
        skips = []
        for block in self.input_blocks:
            h = block(h, cond)
            skips.append(h)
        h = self.middle_block(h, cond)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, cond, size=skips[-1].shape[-2:] if skips else None)
        return rearrange(self.out(h), '(b f) c h w -> b c f h w', f=frames)
