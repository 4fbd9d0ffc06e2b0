"""KL autoencoder: frames <-> latents, 8x smaller per side in the real model.

Parameter names equal the keys of ModelScope's `VQGAN_autoencoder.pth`
(latent-diffusion's AutoencoderKL): encoder.*, decoder.*, quant_conv.*,
post_quant_conv.*. The checkpoint has no attention inside the levels, only in
the middle block, and no timestep embedding, so neither is built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import AutoencoderConfig
from .group_norm import GroupNorm


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(32, channels, eps=1e-6)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResnetBlock(nn.Module):
    """Two norm-SiLU-conv layers with a residual; a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, 'nin_shortcut'):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, channels as the head dim."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        # (n, 1, h*w, c): one head of c channels
        q, k, v = (rearrange(proj(h), 'n c h w -> n 1 (h w) c')
                   for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, 'n 1 (h w) c -> n c h w', h=height, w=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (the checkpoint's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


def _level(blocks: list[ResnetBlock], resample: nn.Module | None) -> nn.Module:
    """One resolution level, named as in the checkpoint: block.i, (down|up)sample."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        name = 'downsample' if isinstance(resample, Downsample) else 'upsample'
        level.add_module(name, resample)
    return level


def _mid(channels: int) -> nn.Module:
    """Middle block: resnet, attention, resnet."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Pixels (n, in, H, W) -> moments (n, 2 z, H/d, W/d), d = 2**(levels-1)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv3x3(config.in_channels, config.ch)
        self.down = nn.ModuleList()
        width = config.ch
        for i, out in enumerate(widths):
            blocks = [ResnetBlock(width if j == 0 else out, out) for j in range(config.res_blocks)]
            width = out
            self.down.append(_level(blocks, Downsample(width) if i != last else None))
        self.mid = _mid(width)
        self.norm_out = _norm(width)
        self.conv_out = _conv3x3(width, 2 * config.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, 'downsample'):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (n, z, h, w) -> pixels (n, in, h d, w d); one block more per level than Encoder."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        width = widths[-1]
        self.conv_in = _conv3x3(config.z_channels, width)
        self.mid = _mid(width)
        # built deepest first, stored shallowest first as in the checkpoint (up.0 is full size)
        levels = []
        for i in reversed(range(len(widths))):
            out = widths[i]
            blocks = [ResnetBlock(width if j == 0 else out, out)
                      for j in range(config.res_blocks + 1)]
            width = out
            levels.insert(0, _level(blocks, Upsample(width) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = _conv3x3(width, config.in_channels)

    def compile_regions(self) -> list:
        """The blocks compiled one by one ahead of time (compile_cache.py), in parallel."""
        return [self.mid.block_1, self.mid.attn_1, self.mid.block_2,
                *(module for level in self.up for module in [*level.block, *level.children()]
                  if not isinstance(module, nn.ModuleList))]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, 'upsample'):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL autoencoder of latent diffusion, used to encode and decode video frames."""
    copies_decoder_output = False   # set by compile_decoder with CUDA graphs, whose next replay reuses the output

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        z = config.z_channels  # the checkpoint's embed_dim equals z_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (n, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (n, z, H/d, W/d)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (n, 3, H, W) -> posterior mean (n, z, H/d, W/d), unscaled."""
        return self.encode_moments(x)[0]

    def encode_video(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                     chunk_frames: int | None = None) -> torch.Tensor:
        """Pixels (b, 3, f, H, W) in [-1, 1] -> scaled latents (b, z, f, h, w): the posterior mean, or a sample
        with noise from `generator`, drawn over all frames at once as diffusers draws it, `(b f) z h w`."""
        b = pixels.shape[0]
        x = rearrange(pixels, 'b c f h w -> (b f) c h w')
        moments = [self.encode_moments(part) for part in x.split(chunk_frames or x.shape[0])]
        mean, logvar = torch.cat([m for m, _ in moments]), torch.cat([v for _, v in moments])
        z = mean
        if generator is not None:
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps.to(mean.device)
        return rearrange(z * self.config.scale_factor, '(b f) c h w -> b c f h w', b=b)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (n, z, h, w) -> pixels (n, 3, h d, w d)."""
        frames = self.decoder(self.post_quant_conv(z))
        return frames.clone() if self.copies_decoder_output else frames

    def compile_decoder(self, options: dict | None = None, compile=None) -> 'AutoencoderKL':
        """Decode through torch.compile (with these inductor options) on channels-last weights; keys and
        values unchanged. `compile(decoder, options)` compiles in place instead of nn.Module.compile
        (compile_cache.CompileCache.compile).

        On an H200 a 16-frame decode in 4-frame chunks takes 27.9 ms, against 52.2 ms
        eager, for a compile once per process. With CUDA graphs (the options of mode
        'reduce-overhead') each GroupNorm also takes its statistics per channel first
        (group_norm.py), and each decode's output is copied out of the graph: 23.9 ms
        against 28.1 without those statistics. Without graphs they do not pay: 30.3 ms,
        the host's kernel launches then taking longer (docs/decisions.md).
        """
        graphs = bool((options or {}).get('triton.cudagraphs'))
        self.decoder.to(memory_format=torch.channels_last)
        for module in self.decoder.modules():
            if isinstance(module, GroupNorm):
                module.per_channel_stats = graphs
        if compile is None:
            self.decoder.compile(dynamic=False, options=options)
        else:
            compile(self.decoder, options or {})
        self.copies_decoder_output = graphs
        return self

    def replay_decoder(self, capture) -> 'AutoencoderKL':
        """Decode through the CUDA graphs that `capture(decoder)` installs in place (cuda_graphs.capture_calls):
        the eager kernels, layout and values; each decode's output is copied out of its graph."""
        capture(self.decoder)
        self.copies_decoder_output = True
        return self

    def decode_video(self, latents: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Scaled latents (b, c, f, h, w) -> pixels (b, 3, f, H, W), `chunk_frames` per pass."""
        if chunk_frames is not None and chunk_frames < 1:
            raise ValueError(f'chunk_frames={chunk_frames!r} must be a positive int or None')
        b = latents.shape[0]
        z = rearrange(latents / self.config.scale_factor, 'b c f h w -> (b f) c h w')
        chunk = chunk_frames or z.shape[0]
        frames = torch.cat([self.decode(part) for part in z.split(chunk)])
        return rearrange(frames, '(b f) c h w -> b c f h w', b=b)
