"""Attention over the frames of each pixel: one small Triton kernel on CUDA, SDPA elsewhere.

The temporal transformers attend over a few frames (16 by default) at each of
thousands of pixels. SDPA's kernels are built for long sequences: on an H200
its fastest one spends 2.5 ms per guided UNet step on these calls, this
kernel 1.0 ms (docs/decisions.md). In it one
program takes one (pixel, head) sequence whole: scores, softmax and the
weighted sum stay in registers, and q, k, v are read in the projections' own
layout, without a transpose copy.

A second kernel attends over sliding windows of frames (frame_windows.py,
FreeNoise's long videos): one program takes all windows of one (pixel, head)
in turn and adds each window's scaled output to its frames, so a temporal
attention is one call at any length, not a call and a blend per window.

The kernels serve float16 CUDA tensors (the dtype they were measured and checked
in) of up to MAX_FRAMES frames (a window's, for the second) and a power-of-two
head size from 16 to 128, with gradients off (they have no backward); everything
else (the CPU, bfloat16, float32, long sequences, training) runs SDPA, so the
CPU path is unchanged. Each kernel is a custom op, opaque to torch.compile and
captured by CUDA graphs: not a triton_op, whose registration would import
inductor with the package (docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .frame_windows import window_scales
from .kernel_probe import kernel_runs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None

MAX_FRAMES = 128
HEAD_SIZES = (16, 32, 64, 128)
KERNEL_WARPS = 1   # per program: the fastest over the model's calls on an H200 (docs/decisions.md)


def multi_head_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of each head: (n, l, heads, d) -> (n, l, heads, d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention along frames: (n pixels, l frames, heads, d) -> the same shape."""
    if kernel_serves(q):
        return torch.ops.modelscope_t2v.frame_attention(q, k, v)
    with efficient_sdpa() if q.is_cuda else contextlib.nullcontext():
        return multi_head_sdpa(q, k, v)


def frame_attention_in_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                               stride: int) -> torch.Tensor | None:
    """Self-attention along frames within windows of `window` frames, `stride` apart, blended as
    frame_windows.windowed blends them: one kernel call where the kernel serves q (n, l frames, heads, d);
    None elsewhere."""
    if not kernel_serves(q, window):
        return None
    scales = window_scales(q.shape[1], window, stride, q.device)
    return torch.ops.modelscope_t2v.frame_attention_in_windows(q, k, v, scales, stride)


def kernel_serves(q: torch.Tensor, length: int | None = None) -> bool:
    """Whether the kernels serve q (n, l, heads, d) for sequences of `length` frames (l when None)."""
    return (triton is not None and q.is_cuda and q.dtype == torch.float16
            and not torch.is_grad_enabled()   # inference only: the kernels have no backward
            and (q.shape[1] if length is None else length) <= MAX_FRAMES and q.shape[3] in HEAD_SIZES
            and (torch.compiler.is_compiling() or kernel_works(q.device)))


@functools.cache
def kernel_works(device: torch.device) -> bool:
    """Whether the kernel runs on `device`; else warn once, and SDPA serves."""
    def probe(device):
        x = torch.zeros(1, 1, 1, HEAD_SIZES[0], device=device, dtype=torch.float16)
        torch.ops.modelscope_t2v.frame_attention(x, x, x)
    return kernel_runs(probe, device, 'temporal attention runs on SDPA')


def efficient_sdpa():
    """Of SDPA's kernels, the memory-efficient one suits short sequences best: 2.49 ms a guided step on an H200
    against cuDNN's 3.62 (docs/decisions.md)."""
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


if triton is not None:

    @triton.jit
    def _load_sequence(ptr, n, h, sn, sl, sh, frames, channels, valid):
        # (BLOCK_L, D) of one (pixel, head) sequence, zeros past the last frame
        offsets = n * sn + h * sh + frames[:, None] * sl + channels[None, :]
        return tl.load(ptr + offsets, mask=valid[:, None], other=0.0)

    @triton.jit
    def _attention(q, k, v, valid, scale):
        # (BLOCK_L, D) queries, keys and values of one sequence -> (BLOCK_L, D) float32 output; keys past
        # the sequence's end (not valid) get no weight
        scores = tl.dot(q, tl.trans(k)) * scale                       # (BLOCK_L, BLOCK_L), float32
        scores = tl.where(valid[None, :], scores, float('-inf'))
        weights = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        weights = weights / tl.sum(weights, axis=1)[:, None]
        return tl.dot(weights.to(v.dtype), v)

    @triton.jit
    def _frame_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, length, heads, scale,
                                q_sn, q_sl, q_sh, k_sn, k_sl, k_sh, v_sn, v_sl, v_sh, o_sn, o_sl, o_sh,
                                BLOCK_L: tl.constexpr, D: tl.constexpr):
        # one program: the sequence of pixel n, head h; rows are frames, columns channels
        n = (tl.program_id(0) // heads).to(tl.int64)
        h = tl.program_id(0) % heads
        frames = tl.arange(0, BLOCK_L)
        channels = tl.arange(0, D)
        valid = frames < length
        q = _load_sequence(q_ptr, n, h, q_sn, q_sl, q_sh, frames, channels, valid)
        k = _load_sequence(k_ptr, n, h, k_sn, k_sl, k_sh, frames, channels, valid)
        v = _load_sequence(v_ptr, n, h, v_sn, v_sl, v_sh, frames, channels, valid)
        out = _attention(q, k, v, valid, scale)
        offsets = n * o_sn + h * o_sh + frames[:, None] * o_sl + channels[None, :]
        tl.store(o_ptr + offsets, out.to(o_ptr.dtype.element_ty), mask=valid[:, None])

    @torch.library.custom_op('modelscope_t2v::frame_attention', mutates_args=())
    def _frame_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: (n, l, heads, d), each with unit stride along d; out: contiguous (n, l, heads, d)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        n, length, heads, d = q.shape
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        _frame_attention_kernel[(n * heads,)](
            q, k, v, out, length, heads, d ** -0.5,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            BLOCK_L=max(16, triton.next_power_of_2(length)), D=d, num_warps=KERNEL_WARPS)
        return out

    @_frame_attention_op.register_fake
    def _(q, k, v):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @triton.jit
    def _frame_attention_in_windows_kernel(q_ptr, k_ptr, v_ptr, o_ptr, scales_ptr, length, heads, windows, window,
                                           stride, scale, q_sn, q_sl, q_sh, k_sn, k_sl, k_sh, v_sn, v_sl, v_sh,
                                           o_sn, o_sl, o_sh, BLOCK_L: tl.constexpr, D: tl.constexpr):
        # one program: every window of the sequence of pixel n, head h, in order; rows are a window's frames
        n = (tl.program_id(0) // heads).to(tl.int64)
        h = tl.program_id(0) % heads
        rows = tl.arange(0, BLOCK_L)
        channels = tl.arange(0, D)
        valid = rows < window
        written = 0   # frames below it hold the sum of the windows before
        for w in range(windows):
            start = tl.minimum(w * stride, length - window)
            frames = start + rows
            q = _load_sequence(q_ptr, n, h, q_sn, q_sl, q_sh, frames, channels, valid)
            k = _load_sequence(k_ptr, n, h, k_sn, k_sl, k_sh, frames, channels, valid)
            v = _load_sequence(v_ptr, n, h, v_sn, v_sl, v_sh, frames, channels, valid)
            out = _attention(q, k, v, valid, scale) * tl.load(scales_ptr + w * window + rows, mask=valid)[:, None]
            offsets = n * o_sn + h * o_sh + frames[:, None] * o_sl + channels[None, :]
            out += tl.load(o_ptr + offsets, mask=(valid & (frames < written))[:, None], other=0.0).to(tl.float32)
            tl.store(o_ptr + offsets, out.to(o_ptr.dtype.element_ty), mask=valid[:, None])
            tl.debug_barrier()   # the next window reads what this one stored
            written = start + window

    @torch.library.custom_op('modelscope_t2v::frame_attention_in_windows', mutates_args=())
    def _frame_attention_in_windows_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor,
                                       stride: int) -> torch.Tensor:
        # q, k, v: (n, l, heads, d), each with unit stride along d; scales: contiguous (windows, window) float32,
        # frame_windows.window_scales; window w starts at frame min(w stride, l - window); out: contiguous
        # (n, l, heads, d), out[frame] the sum over the windows w that hold it of scales[w, its place in w] x
        # the attention within w
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        n, length, heads, d = q.shape
        windows, window = scales.shape
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        _frame_attention_in_windows_kernel[(n * heads,)](
            q, k, v, out, scales, length, heads, windows, window, stride, d ** -0.5,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            BLOCK_L=max(16, triton.next_power_of_2(window)), D=d, num_warps=KERNEL_WARPS)
        return out

    @_frame_attention_in_windows_op.register_fake
    def _(q, k, v, scales, stride):
        return torch.empty_like(q, memory_format=torch.contiguous_format)
