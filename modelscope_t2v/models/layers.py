"""Pieces shared by the UNet3D blocks: attention, feed-forward, timestep and guidance embeddings.

Some layers read a projection's weight and run their own fast arithmetic (GEGLU's kernel, the feed-forward's
in-place GEMM, the transformers' one-GEMM projections). A projection that peft has wrapped for training (its
LoRA adds a branch the weight does not hold) is called as a module instead: `is_plain` tells them apart. A
LoRA loaded for inference is a delta on the weight itself (lora/apply.py), which every path reads.

The UNet's tensors change shape with torch's view ops (flatten, unflatten, transpose, permute), not einops:
torch.compile traces einops' pattern parsing at every rearrange, 425 of them in a UNet forward: tracing the
UNet's real structure (at width 32) took 38.9 s with them on the project's CPU, 14.5 s without.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .frame_attention import multi_head_sdpa
from .geglu import geglu

# attend(q, k, v): (n, l, heads, d) queries, (n, m, heads, d) keys and values -> (n, l, heads, d)
AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion times, cosines first: (b,) -> (b, dim)."""
    half = dim // 2
    t = t.float()
    # 10000 ** (-i / half) in float32, the exact operations of the original: at
    # t ~ 1000 the angles amplify any rounding difference a thousandfold.
    freqs = torch.pow(10000, -torch.arange(half, device=t.device).to(t) / half)
    angles = t[:, None] * freqs[None]                   # (b, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales, sines first: (b,) -> (b, dim), as latent consistency models
    (LCM, T2V-Turbo) condition their UNet on w: 1000 w times frequencies 10000 ** (-i / (half - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None]          # (b, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def frames_to_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """((b f), c, h, w) -> (b, c, f, h, w), a view."""
    return x.unflatten(0, (-1, frames)).transpose(1, 2)


def video_to_frames(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> ((b f), c, h, w), a copy unless x's frames lie next to each other."""
    return x.transpose(1, 2).flatten(0, 1)


def is_plain(module: nn.Module) -> bool:
    """Whether `module` is a torch Linear/Conv layer whose weight says all it computes (a parametrized one
    included), not a wrapper such as peft's LoRA layers, whose extra branch only its forward adds."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv3d))


@torch.library.custom_op('modelscope_t2v::addmm_', mutates_args=('acc',))
def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place: (m, n) += (m, k) @ (k, n). cuBLAS adds into acc itself, where torch.addmm on
    the GPU first copies acc to its output; torch.compile keeps the op in place when acc is used no more."""
    torch.addmm(acc, a, b, out=acc)


@addmm_.register_fake
def _(acc, a, b):
    return None


class Attention(nn.Module):
    """Multi-head attention; cross-attention when `context_dim` is given.

    A cross-attention can keep the keys and values of a text (remember_text) and
    then run without a context: a generation's text is the same at every step.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 attend: AttentionCore = multi_head_sdpa):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.attend = attend
        self.cross = context_dim is not None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))  # key to_out.0
        if self.cross:   # (n, m, inner) keys and values of the remembered text: buffers (they follow .to()), not saved
            self.register_buffer('text_k', None, persistent=False)
            self.register_buffer('text_v', None, persistent=False)

    def remember_text(self, context: torch.Tensor) -> None:
        """Keep the keys and values of `context` (n, m, context_dim) for calls without a context. They are
        written in place while their shape holds, so a CUDA graph that reads them stays valid."""
        k, v = self.to_k(context), self.to_v(context)
        kept = self.text_k
        if kept is None or (kept.shape, kept.dtype, kept.device) != (k.shape, k.dtype, k.device):
            self.text_k, self.text_v = k, v
            return
        kept.copy_(k)
        self.text_v.copy_(v)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (n, l, dim); context: (n, m, context_dim); without it a cross-attention uses its remembered text
        if not self.cross:
            k, v = self.to_k(x), self.to_v(x)
        elif context is not None:
            k, v = self.to_k(context), self.to_v(context)
        elif self.text_k is not None:
            k, v = self.text_k, self.text_v
        else:
            raise ValueError('cross-attention without a context: pass one, or remember_text(context) first')
        q, k, v = (p.unflatten(-1, (self.heads, -1)) for p in (self.to_q(x), k, v))   # (n, l, heads, d)
        return self.to_out(self.attend(q, k, v).flatten(2))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): x * gelu(gate); one kernel on Hopper GPUs (geglu.py)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_plain(self.proj):   # a peft LoRA layer: its forward adds the LoRA branch
            a, gate = self.proj(x).chunk(2, dim=-1)
            return a * F.gelu(gate)
        return geglu(x, self.proj.weight, self.proj.bias)   # (..., dim) -> (..., inner)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x expansion; keys net.0.proj and net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """net(x) + residual, the residual added by the second GEMM (into residual + bias, in place): on the GPU
        no pass of its own reads the GEMM's output back (-0.2 ms a guided step, bench/step_timing.py)."""
        h, out = self.net[0](x), self.net[2]                                        # h: (..., mult dim)
        if not is_plain(out):   # a peft LoRA layer: called, not read
            return out(h) + residual
        acc = residual + out.bias
        if torch.is_grad_enabled():   # addmm_ has no gradient: out of place, as autograd needs
            return torch.addmm(acc.view(-1, acc.shape[-1]), h.flatten(0, -2), out.weight.T).view(acc.shape)
        addmm_(acc.view(-1, acc.shape[-1]), h.flatten(0, -2), out.weight.T)
        return acc


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, (cross-)attention and feed-forward, each residual.

    With `context_dim=None` the second attention is a second self-attention,
    as in the temporal transformers of the original.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None,
                 attend: AttentionCore = multi_head_sdpa):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim, attend=attend)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, attend=attend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, frames: int = 1) -> torch.Tensor:
        # x: ((b f), l, dim); context: (b, m, context_dim), one text per video of `frames` frames, or None
        # for the text attn2 remembers
        x = self.attn1(self.norm1(x)) + x
        if not self.attn2.cross:
            x = self.attn2(self.norm2(x)) + x
        else:  # the queries of all frames of a video meet its text at once: keys and values once per video
            q = self.norm2(x).unflatten(0, (-1, frames)).flatten(1, 2)                  # (b, f l, c)
            x = self.attn2(q, context).unflatten(1, (frames, -1)).flatten(0, 1) + x
        return self.ff(self.norm3(x), residual=x)
