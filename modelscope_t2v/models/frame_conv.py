"""One temporal-conv stage (GroupNorm, SiLU, (3, 1, 1) conv) as one Triton kernel on CUDA.

Each ResBlock of the UNet ends in four such stages over the frames of a video.
As separate ops a stage normalises and activates the whole tensor, then a GEMM
writes every frame's three taps (3x the output) and a third pass sums them
across neighbouring frames. Here one kernel does it all: a GEMM over the
channels of frames t-1, t and t+1 (K = 3 c_in) whose A tiles are normalised
and activated as they are loaded, so the activations are read once and the
output written once. Only the GroupNorm statistics (one reduction) run apart.

Rows are the pixels of channels-last activations, (b f h w, c): frame t of
video b starts at row (b f + t) h w, so frame t +- 1 is `pixels` rows away.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None
if not hasattr(torch.library, 'triton_op'):  # torch < 2.6
    triton = None

# Tile shape and launch parameters, chosen on an H200 over the model's four widths (bench/frame_conv.py)
BLOCK_M, BLOCK_N, WARPS, STAGES = 128, 64, 4, 3
NORM_IN_KERNEL = True


def kernel_serves(x: torch.Tensor) -> bool:
    """Whether the fused kernel takes activations x (b, c, f, h, w); else the stage runs op by op."""
    return (triton is not None and x.is_cuda and x.dtype == torch.float16 and x.shape[1] % 16 == 0
            and (torch.compiler.is_compiling() or kernel_works(x.device)))


@functools.cache
def kernel_works(device: torch.device) -> bool:
    """Whether the kernel runs on `device` (Triton needs a C compiler for its launcher); else warn once."""
    try:
        x = torch.zeros(1, 1, 16, device=device, dtype=torch.float16)
        scale = torch.zeros(1, 16, device=device)
        weight = torch.zeros(3, 16, 16, device=device, dtype=torch.float16)
        torch.ops.modelscope_t2v.frame_conv(x, scale, scale, weight, weight[0, 0], 1)
        return True
    except Exception as error:  # whatever Triton raises, the op-by-op stage gives the same result
        warnings.warn(f'temporal convs run op by op: the Triton kernel failed on {device} ({error})')
        return False


def norm_scale_shift(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm as a per-video affine map: norm(x) = x * scale + shift, each (b, c) in float32.

    x: (b, c, f, h, w); the statistics span each group's channels over all frames and pixels.
    """
    b, c = x.shape[:2]
    groups = norm.num_groups
    grouped = x.permute(0, 2, 3, 4, 1).reshape(b, -1, groups, c // groups).float()   # (b, f h w, g, c/g)
    var, mean = torch.var_mean(grouped, dim=(1, 3), correction=0)                     # (b, g)
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(c // groups, dim=1)         # (b, c)
    scale = norm.weight.float() * rstd
    shift = norm.bias.float() - mean.repeat_interleave(c // groups, dim=1) * scale
    return scale, shift


def fused_stage(x: torch.Tensor, norm: nn.GroupNorm, taps_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """conv(silu(norm(x))) for a (3, 1, 1) conv with frame padding 1: (b, c, f, h, w) -> (b, co, f, h, w).

    taps_weight: (3, co, c), tap k applied to frame t + k - 1. Returns channels-last memory.
    """
    b, c, f, h, w = x.shape
    if NORM_IN_KERNEL:
        scale, shift = norm_scale_shift(x, norm)
    else:
        x = torch.nn.functional.silu(norm(x))
        scale = shift = x.new_zeros(b, c, dtype=torch.float32)
    rows = x.permute(0, 2, 3, 4, 1).reshape(-1, c)                                    # (b f h w, c)
    out = torch.ops.modelscope_t2v.frame_conv(rows, scale, shift, taps_weight, bias, h * w)
    return out.view(b, f, h, w, -1).permute(0, 4, 1, 2, 3)


if triton is not None:

    @triton.jit
    def _frame_conv_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, out_ptr,
                           rows, frames, pixels, c_in, c_out,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           TILE_IN_ONE_VIDEO: tl.constexpr, NORM: tl.constexpr):
        # one program: output rows [m0, m0 + BLOCK_M) x channels [n0, n0 + BLOCK_N)
        n_tiles = tl.cdiv(c_out, BLOCK_N)
        m0 = (tl.program_id(0) // n_tiles) * BLOCK_M
        n0 = (tl.program_id(0) % n_tiles) * BLOCK_N
        r = m0 + tl.arange(0, BLOCK_M)
        n = n0 + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        row_ok = r < rows
        frame = (r // pixels) % frames
        video = r // (frames * pixels)
        first_video = m0 // (frames * pixels)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, 3 * c_in, BLOCK_K):
            tap = k0 // c_in                     # BLOCK_K divides c_in: a K block lies in one tap
            i = k0 - tap * c_in + kk             # input channels of this block
            source_ok = row_ok & (frame + tap - 1 >= 0) & (frame + tap - 1 < frames)
            source = r + (tap - 1) * pixels
            a = tl.load(x_ptr + source[:, None].to(tl.int64) * c_in + i[None, :],
                        mask=source_ok[:, None], other=0.0)
            if NORM:
                a = a.to(tl.float32)
            if NORM:
                if TILE_IN_ONE_VIDEO:   # one video's norm affine for the whole tile: a row vector
                    scale = tl.load(scale_ptr + first_video * c_in + i)[None, :]
                    shift = tl.load(shift_ptr + first_video * c_in + i)[None, :]
                else:
                    affine = video[:, None] * c_in + i[None, :]
                    scale = tl.load(scale_ptr + affine, mask=row_ok[:, None], other=0.0)
                    shift = tl.load(shift_ptr + affine, mask=row_ok[:, None], other=0.0)
                a = a * scale + shift
                a = a * tl.sigmoid(a)                                          # SiLU
            w = tl.load(w_ptr + tap * c_out * c_in + n[None, :] * c_in + i[:, None],
                        mask=(n < c_out)[None, :], other=0.0)             # (BLOCK_K, BLOCK_N)
            a = tl.where(source_ok[:, None], a, 0.0).to(w.dtype)          # zero padding past the ends
            acc = tl.dot(a, w, acc)
        acc += tl.load(bias_ptr + n, mask=n < c_out, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + r[:, None].to(tl.int64) * c_out + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (n < c_out)[None, :])

    @torch.library.triton_op('modelscope_t2v::frame_conv', mutates_args=())
    def _frame_conv_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, pixels: int) -> torch.Tensor:
        # x: (rows, c_in) float16, rows = b f pixels; scale, shift: (b, c_in) float32;
        # weight: (3, c_out, c_in); bias: (c_out,) -> (rows, c_out)
        x, weight = x.contiguous(), weight.contiguous()
        scale, shift = scale.contiguous(), shift.contiguous()
        rows, c_in = x.shape
        c_out = weight.shape[1]
        frames = rows // (scale.shape[0] * pixels)
        block_k = next(k for k in (64, 32, 16) if c_in % k == 0)
        out = torch.empty(rows, c_out, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(rows, BLOCK_M) * triton.cdiv(c_out, BLOCK_N),)
        torch.library.wrap_triton(_frame_conv_kernel)[grid](
            x, scale, shift, weight, bias, out, rows, frames, pixels, c_in, c_out,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
            TILE_IN_ONE_VIDEO=(frames * pixels) % BLOCK_M == 0, NORM=NORM_IN_KERNEL, num_warps=WARPS, num_stages=STAGES)
        return out
