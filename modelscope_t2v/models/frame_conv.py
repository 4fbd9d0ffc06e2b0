"""The temporal convolution, a (3, 1, 1) Conv3d along frames, as one implicit GEMM: a Triton kernel on Hopper.

Frame t of the output sums tap 0 applied to frame t - 1, tap 1 to frame t
and tap 2 to frame t + 1, zeros past a video's ends. On channels-last rows
(b, frames x pixels, c) the pixel one frame earlier lies `pixels` rows back,
so the conv is one GEMM with K = 3 c whose input tile for tap k starts
(k - 1) x pixels rows off. A TMA descriptor over (b, rows, c) zero-fills the
rows before a video's first frame and after its last, the conv's padding.

The plain path (plain_frame_conv) runs one GEMM into 3 co columns, one per
tap, and sums them frame-shifted; under torch.compile the GroupNorm after the
conv reads those 3 co columns back, twice. The kernel writes co columns once:
0.56 ms less a guided UNet step on an H200. It pays where it has at least
MIN_TILES_PER_SM output tiles per SM, at the 32x32 and 16x16 levels of the
UNet (bench/step_timing.py, docs/decisions.md). With fewer tiles, at 8x8 and
4x4, its one program per SM idles where cuBLAS splits the work finer.

The kernel serves float16 CUDA tensors on Hopper and newer (TMA), with
gradients off (it has no backward); everything else runs the plain path, so
the CPU path is unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .kernel_probe import kernel_runs

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only torch builds come without Triton; older Triton has no TensorDescriptor
    triton = None

# Tile: BLOCK_M rows, up to MAX_N output channels; its K loop is in k_loop. The fastest over the model's calls
# on an H200 (docs/decisions.md).
BLOCK_M, MAX_N, WARPS = 128, 128, 4
MIN_TILES_PER_SM = 2


def k_loop(c: int) -> tuple:
    """(BLOCK_K input channels per load, STAGES of loads in flight) for c input channels: loads of 128 where
    128 divides c, else 64. At c = 640: 37.3 us against 40.3 with loads of 64; at c = 320, loads of 128 would
    be half zeros every third step (72.4 us against 46.9)."""
    return (128, 3) if c % 128 == 0 else (64, 4)


def plain_frame_conv(rows: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, pixels: int) -> torch.Tensor:
    """rows (b, f pixels, c), taps (3, co, c), bias (co,) -> (b, f pixels, co): one GEMM into the 3 co
    columns of the taps, then their frame-shifted sum."""
    b, n, c = rows.shape
    co = taps.shape[1]
    per_tap = F.linear(rows.reshape(-1, c), taps.reshape(3 * co, c)).view(b, n, 3, co)
    out = per_tap[..., 1, :] + bias
    out = out + F.pad(per_tap[:, :-pixels, 0], (0, 0, pixels, 0))   # from frame t - 1, zeros at t = 0
    out = out + F.pad(per_tap[:, pixels:, 2], (0, 0, 0, pixels))    # from frame t + 1, zeros at the end
    return out


def frame_conv(rows: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, pixels: int) -> torch.Tensor:
    """plain_frame_conv's result, from the kernel where it serves."""
    if kernel_serves(rows, taps):
        return torch.ops.modelscope_t2v.frame_conv(rows, taps, bias, pixels)
    return plain_frame_conv(rows, taps, bias, pixels)


def kernel_serves(rows: torch.Tensor, taps: torch.Tensor) -> bool:
    c, co = rows.shape[-1], taps.shape[1]
    if not (triton is not None and rows.is_cuda and rows.dtype == torch.float16 and taps.dtype == torch.float16):
        return False
    gpu = torch.cuda.get_device_properties(rows.device)   # torch.compile folds this call
    return (not torch.is_grad_enabled()   # inference only: the kernel has no backward
            and gpu.major >= 9   # TMA
            and rows.numel() > 0 and c % 8 == 0 and co % 8 == 0   # TMA: 16-byte rows
            and tiles(rows.shape[0], rows.shape[1], co) >= MIN_TILES_PER_SM * gpu.multi_processor_count
            and (torch.compiler.is_compiling() or kernel_works(rows.device)))


@functools.cache
def kernel_works(device: torch.device) -> bool:
    """Whether the kernel runs on `device`; else warn once, and the plain path serves."""
    def probe(device):
        rows, taps, bias = (torch.zeros(shape, device=device, dtype=torch.float16)
                            for shape in [(1, 32, 16), (3, 16, 16), 16])
        torch.ops.modelscope_t2v.frame_conv(rows, taps, bias, 8)
    return kernel_runs(probe, device, 'the temporal conv runs as a GEMM and a shifted sum')


def output_columns_per_tile(co: int) -> int:
    """MAX_N, or the least power of two from 16 up that holds co. Where MAX_N does not divide co the last
    tile is cut short: at co = 320, 3 tiles of 128 took 52 us where 5 of 64 took 66 (H200, 11-30)."""
    return min(MAX_N, max(16, 1 << (co - 1).bit_length()))


def tiles(videos: int, rows: int, co: int) -> int:
    """Output tiles of a call on (videos, rows, c) -> (videos, rows, co)."""
    return videos * -(-rows // BLOCK_M) * -(-co // output_columns_per_tile(co))


@functools.cache
def processors(device: torch.device) -> int:
    """SMs of `device` (a few under Triton's CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 4


if triton is not None:

    @triton.jit
    def _tile_origin(tile, tiles_m, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # tiles in order (video, row tile, column tile), columns fastest: the programs at work at once share
        # input rows in the L2 cache
        row_tile = tile // tiles_n
        return row_tile // tiles_m, (row_tile % tiles_m) * BLOCK_M, (tile % tiles_n) * BLOCK_N

    @triton.jit
    def _frame_conv_kernel(x_desc, w_desc, b_ptr, o_desc, videos, rows, N, K, pixels, PROGRAMS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # tile: output rows [row, +BLOCK_M) of one video, channels [col, +BLOCK_N); its K loop runs over the
        # three taps, each over the input channels
        tiles_m = tl.cdiv(rows, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles = videos * tiles_m * tiles_n
        k_steps = tl.cdiv(K, BLOCK_K)
        stored = tl.program_id(0) - PROGRAMS   # the epilogue's own tile counter: the loads run a tile ahead
        for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
            video, row, col = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for step in range(3 * k_steps):
                tap = step // k_steps
                k = (step - tap * k_steps) * BLOCK_K
                x = x_desc.load([video, row + (tap - 1) * pixels, k])   # (1, BLOCK_M, BLOCK_K), zeros off the video
                w = w_desc.load([tap, col, k])                            # (1, BLOCK_N, BLOCK_K)
                acc = tl.dot(tl.reshape(x, (BLOCK_M, BLOCK_K)), tl.reshape(w, (BLOCK_N, BLOCK_K)).T, acc)
            stored += PROGRAMS
            video, row, col = _tile_origin(stored, tiles_m, tiles_n, BLOCK_M, BLOCK_N)
            cols = col + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            o_desc.store([video, row, col], tl.reshape(acc.to(o_desc.dtype), (1, BLOCK_M, BLOCK_N)))

    def frame_conv_rows(rows: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, pixels: int) -> torch.Tensor:
        """The kernel on rows (b, f pixels, c), taps (3, co, c), bias (co,) -> (b, f pixels, co)."""
        # TMA reads from 16-byte aligned addresses: a view that starts elsewhere is copied
        rows, taps = (t.contiguous() if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)
                      for t in (rows, taps))
        (b, n, c), co = rows.shape, taps.shape[1]
        block_n = output_columns_per_tile(co)
        block_k, stages = k_loop(c)
        out = torch.empty(b, n, co, device=rows.device, dtype=rows.dtype)
        programs = min(processors(rows.device), tiles(b, n, co))
        _frame_conv_kernel[(programs,)](
            TensorDescriptor.from_tensor(rows, [1, BLOCK_M, block_k]),
            TensorDescriptor.from_tensor(taps, [1, block_n, block_k]), bias,
            TensorDescriptor.from_tensor(out, [1, BLOCK_M, block_n]), b, n, co, c, pixels, PROGRAMS=programs,
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=WARPS, num_stages=stages)
        return out

    @torch.library.custom_op('modelscope_t2v::frame_conv', mutates_args=())
    def _frame_conv_op(rows: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, pixels: int) -> torch.Tensor:
        # frame_conv_rows, opaque to torch.compile and captured by CUDA graphs
        return frame_conv_rows(rows, taps, bias, pixels)

    @_frame_conv_op.register_fake
    def _(rows, taps, bias, pixels):
        return rows.new_empty(*rows.shape[:2], taps.shape[1])
