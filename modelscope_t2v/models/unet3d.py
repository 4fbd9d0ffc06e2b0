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
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UNetConfig
from .frame_attention import frame_attention, frame_attention_in_windows
from .frame_conv import frame_conv
from .frame_windows import windowed
from .group_norm import GroupNorm
from .layers import (Attention, TransformerBlock, frames_to_video, guidance_embedding, is_plain, timestep_embedding,
                     video_to_frames)


@dataclass
class Conditioning:
    """What every layer may need beside its input.

    With k texts per video (classifier-free guidance: k = 2) the layers before
    the first cross-attention run once per video on (b f) rows; from there on
    every video runs once per text, on (k b f) rows ordered text-major like
    the context.
    """
    emb: torch.Tensor       # (k b f, embed_dim) SiLU of the timestep embedding, one row per frame
    context: torch.Tensor | None   # (k b, 77, context_dim) texts, k per video, text-major; None: remembered
    frames: int             # f, to unfold (b f) for temporal layers

    def per_text(self, x: torch.Tensor) -> torch.Tensor:
        """(b f, ...) rows shared by the k texts -> (k b f, ...); rows already per text pass unchanged."""
        k = self.emb.shape[0] // x.shape[0]
        return x if k == 1 else torch.cat([x] * k)  # cat keeps channels-last


if hasattr(pytree, 'register_dataclass'):   # a UNet block's calls told apart by kind (cuda_graphs.py)
    pytree.register_dataclass(Conditioning)


class InputConv(nn.Conv2d):
    """The first 3x3 convolution, latent channels -> dim."""

    def forward(self, x, cond):
        return super().forward(x)


def linear_as_one_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over x's last dim as one matrix product on (rows, c).

    On a permuted x (tokens taken from a NCHW or channels-last feature map)
    torch.matmul may instead run a batched product of many tiny matrices with
    the weight broadcast: measured 18 ms of a 53 ms step on an H200. Reshaping
    first costs at most one copy, which torch.compile fuses into the producer.
    """
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)


def frame_conv_as_gemm(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """conv(x) for a (3, 1, 1) Conv3d with padding (1, 0, 0), as one matrix product (frame_conv.py).

    x: (b, c, f, h, w), fastest in channels-last memory (b f h w c), where the
    product reads it without a copy.
    """
    b, c, f, h, w = x.shape
    co = conv.out_channels
    rows = x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
    out = frame_conv(rows, frame_major_weight(conv).view(3, co, c), conv.bias, h * w)   # (b, f h w, co)
    return out.view(b, f, h, w, co).permute(0, 4, 1, 2, 3)                            # (b, co, f, h, w)


def frame_major_weight(conv: nn.Conv3d) -> torch.Tensor:
    """The (co, ci, 3, 1, 1) weight as (3 co, ci): a view once `store_frame_major` has run."""
    return conv.weight.permute(2, 0, 1, 3, 4).reshape(3 * conv.out_channels, conv.in_channels)


def store_frame_major(conv: nn.Conv3d) -> None:
    """Keep the weight's shape and key but store its taps first, so the GEMM reads it in place."""
    frame_major = conv.weight.data.permute(2, 0, 1, 3, 4).contiguous()     # (3, co, ci, 1, 1)
    conv.weight.data = frame_major.permute(1, 2, 0, 3, 4)                  # (co, ci, 3, 1, 1) view


class TemporalConv(nn.Module):
    """Four (GroupNorm, SiLU, 3x1x1 conv) stages along frames, residual.

    With `as_gemm` (set by UNet3D.to_channels_last) each conv runs as one GEMM.
    """
    as_gemm = False

    def __init__(self, dim: int):
        super().__init__()

        def stage(with_dropout: bool) -> nn.Sequential:
            layers = [GroupNorm(32, dim), nn.SiLU()]
            layers += [nn.Dropout(0.0)] if with_dropout else []  # keeps the checkpoint's indices
            return nn.Sequential(*layers, nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1 = stage(False)
        self.conv2 = stage(True)
        self.conv3 = stage(True)
        self.conv4 = stage(True)

    def forward(self, x):
        # x: (b, c, f, h, w)
        stages = (self.conv1, self.conv2, self.conv3, self.conv4)
        if not self.as_gemm or not all(is_plain(stage[-1]) for stage in stages):
            return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))
        h = x
        for stage in stages:
            h = frame_conv_as_gemm(stage[:-1](h), stage[-1])
        return x + h


class ResBlock(nn.Module):
    """Residual block with timestep embedding, then a temporal convolution."""

    def __init__(self, in_dim: int, embed_dim: int, out_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm(32, in_dim), nn.SiLU(), nn.Conv2d(in_dim, out_dim, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_dim))
        self.out_layers = nn.Sequential(
            GroupNorm(32, out_dim), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_dim, out_dim, 3, padding=1))
        self.skip_connection = nn.Identity() if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, 1)
        self.temopral_conv = TemporalConv(out_dim)

    def forward(self, x, cond: Conditioning):
        # x: ((b f), c, h, w); the first b f rows of cond.emb serve the rows shared by all texts too.
        # emb_layers is SiLU then Linear; cond.emb holds the SiLU already, taken once for every block
        h = self.in_layers(x) + self.emb_layers[1](cond.emb[:x.shape[0]])[:, :, None, None].to(x.dtype)
        h = self.skip_connection(x) + self.out_layers(h)
        return video_to_frames(self.temopral_conv(frames_to_video(h, cond.frames)))


class SpatialTransformer(nn.Module):
    """Attention over the pixels of each frame, with cross-attention to the text."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, context_dim)])
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x, cond: Conditioning):
        # x: ((b f), c, h, w) -> tokens ((k b f), h w, c): the text splits shared rows per text
        x = cond.per_text(x)
        h, w = x.shape[-2:]
        tokens = self.norm(x).flatten(2).transpose(1, 2)                                # (n, h w, c)
        y = (linear_as_one_gemm(tokens, self.proj_in.weight, self.proj_in.bias) if is_plain(self.proj_in)
             else self.proj_in(tokens))
        for block in self.transformer_blocks:
            y = block(y, cond.context, cond.frames)
        return x + self.proj_out(y).transpose(1, 2).unflatten(2, (h, w))               # (n, c, h, w)


class TemporalTransformer(nn.Module):
    """Self-attention along the frames of each pixel (two self-attentions, no text)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Conv1d(dim, inner, 1)     # 1x1 convolutions: linear maps over c
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, None, frame_attention)])
        self.proj_out = nn.Conv1d(inner, dim, 1)

    def forward(self, x, cond: Conditioning):
        # x: ((b f), c, h, w); GroupNorm statistics span all frames of a video
        h, w = x.shape[-2:]
        y = self.norm(frames_to_video(x, cond.frames)).permute(0, 3, 4, 2, 1).flatten(0, 2)   # ((b h w), f, c)
        if is_plain(self.proj_in):
            y = linear_as_one_gemm(y, self.proj_in.weight[..., 0], self.proj_in.bias)
        else:   # a peft Conv1d LoRA layer: called on (n, c, f)
            y = self.proj_in(y.transpose(1, 2)).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y)
        if is_plain(self.proj_out):
            y = F.linear(y, self.proj_out.weight[..., 0], self.proj_out.bias)
        else:
            y = self.proj_out(y.transpose(1, 2)).transpose(1, 2)
        return x + y.unflatten(0, (-1, h, w)).permute(0, 3, 4, 1, 2).flatten(0, 1)      # ((b f), c, h, w)


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
    """eps = UNet3D(x_t, t, texts): (b, c, f, h, w) -> (k b, c, f, h, w) for k texts per video."""
    channels_last = False   # set by to_channels_last()
    remembered_texts = 0    # rows (k b) of the text last given to remember_text
    gradient_checkpointing = False   # training: each block's activations recomputed in the backward pass

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        dim, head_dim = config.dim, config.head_dim
        embed_dim = dim * 4
        # a guidance embedding's projection (add_guidance_embedding), else None: a registered empty slot, as a
        # class attribute None would hide the module once set
        self.register_module('time_cond_proj', None)

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

        self.out = nn.Sequential(GroupNorm(32, width), nn.SiLU(), nn.Conv2d(width, config.out_dim, 3, padding=1))

        # the layers that each generation's settings reach (remember_text, set_temporal_window), listed once:
        # walking every module takes about 2 ms of the host a call, 2 % of a 4-step generation
        self.cross_attentions = [m for m in self.modules() if isinstance(m, Attention) and m.cross]
        self.temporal_blocks = [block for m in self.modules() if isinstance(m, TemporalTransformer)
                                for block in m.transformer_blocks]
        self.temporal_window = (None, 1)

    def to_channels_last(self) -> 'UNet3D':
        """Run on channels-last activations, each temporal conv as one GEMM and each
        GroupNorm's statistics per channel first; keys and values unchanged.

        Pays under torch.compile on a GPU, where no layout conversion is left
        around the convolutions (docs/decisions.md); eager it launches more kernels.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
            if isinstance(module, GroupNorm):
                module.per_channel_stats = True
            if isinstance(module, TemporalConv):
                module.as_gemm = True
                for stage in (module.conv1, module.conv2, module.conv3, module.conv4):
                    store_frame_major(stage[-1])
        self.channels_last = True
        return self

    def set_temporal_window(self, window: int | None, stride: int = 1) -> None:
        """Temporal attention over windows of `window` frames, `stride` apart (frame_windows.py), for
        videos longer than the trained frame count; None: over all frames, as trained."""
        if (window, stride) == self.temporal_window:   # unchanged: a compiled UNet keeps its graph
            return
        attend = (frame_attention if window is None
                  else windowed(frame_attention, window, stride, frame_attention_in_windows))
        for block in self.temporal_blocks:
            block.attn1.attend = block.attn2.attend = attend
        self.temporal_window = (window, stride)

    def add_guidance_embedding(self, in_dim: int) -> nn.Linear:
        """Give the UNet a guidance embedding, as guidance-distilled UNets have (T2V-Turbo: in_dim 256): the
        sinusoidal embedding of w (layers.guidance_embedding) projected without bias onto the timestep
        embedding, diffusers' TimestepEmbedding.cond_proj. Its weight starts at zero: the caller sets it.
        Key `time_cond_proj.weight`, which no original checkpoint holds."""
        weight = self.time_embed[0].weight
        self.time_cond_proj = nn.Linear(in_dim, self.config.dim, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.time_cond_proj.weight)
        return self.time_cond_proj

    def remove_guidance_embedding(self) -> None:
        """Undo add_guidance_embedding: the UNet of the checkpoint again."""
        self.time_cond_proj = None

    def remember_text(self, context: torch.Tensor) -> None:
        """Project `context` (k b, 77, context_dim) to every cross-attention's keys and values once, for the
        calls forward(x, t) without a context that follow: a generation's text is the same at every step, so
        its 2 x 16 small GEMMs need not run at each."""
        for attention in self.cross_attentions:
            attention.remember_text(context)
        self.remembered_texts = context.shape[0]

    def compile_regions(self) -> list:
        """The blocks compiled one by one ahead of time (compile_cache.py), in parallel; between them the time
        embedding, the skips' concatenations and the output head run as they are."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def trace_state(self) -> tuple:
        """What forward reads besides its arguments and weights, which a trace freezes (compile_cache.py): the
        temporal window, the count of remembered texts, whether there is a guidance embedding."""
        return self.temporal_window, self.remembered_texts, self.time_cond_proj is not None

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b, c, f, h, w) noisy latents; t: (b,) diffusion times; context: (k b, 77, context_dim), or
        None for the text given to remember_text; guidance: (b,) guidance scales w, read by a guidance
        embedding (add_guidance_embedding) and needed by one, else ignored.

        With k texts per video (text-major: rows j b .. j b + b - 1 are text j)
        the result is (k b, c, f, h, w), one prediction per text; the layers
        before the first cross-attention run once per video for all k.
        """
        b, frames = x.shape[0], x.shape[2]
        rows = self.remembered_texts if context is None else context.shape[0]
        if rows == 0 or rows % b:
            raise ValueError(f'context holds {rows} texts for {b} videos: need a positive multiple of {b}'
                             + (' (remember_text gave none)' if context is None else ''))
        texts = rows // b
        temb = timestep_embedding(t, self.config.dim).to(x.dtype)                      # (b, dim)
        if self.time_cond_proj is not None:
            if guidance is None:
                raise ValueError('this UNet has a guidance embedding (a guidance-distilled LoRA such as T2V-Turbo '
                                 'brought it): pass guidance, the scales w, one per video')
            temb = temb + self.time_cond_proj(guidance_embedding(guidance, self.time_cond_proj.in_features).to(x.dtype))
        emb = self.time_embed(temb)                                                    # (b, embed_dim)
        cond = Conditioning(emb=F.silu(emb).repeat(texts, 1).repeat_interleave(frames, dim=0), context=context,
                            frames=frames)
        h = video_to_frames(x)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, cond)
            skips.append(h)
        h = self._run(self.middle_block, h, cond)
        for block in self.output_blocks:
            h = torch.cat([h, cond.per_text(skips.pop())], dim=1)
            h = self._run(block, h, cond, size=skips[-1].shape[-2:] if skips else None)
        return frames_to_video(self.out(h), frames).contiguous()

    def _run(self, block: nn.Module, h: torch.Tensor, cond: Conditioning, **kwargs) -> torch.Tensor:
        """block(h, cond), its activations recomputed in the backward pass under gradient_checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, cond, use_reentrant=False, **kwargs)
        return block(h, cond, **kwargs)
