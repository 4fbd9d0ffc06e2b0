"""GEGLU, x @ W.T + b split in halves (a, g) -> a * gelu(g): one Triton GEMM on Hopper, F.linear elsewhere.

On the GPU the plain path writes the projection's 2 n columns and reads them back for the
gelu-multiply. Here one persistent kernel (one program per SM, each looping over output tiles,
TMA loads of the next tile issued while the current one finishes) computes a tile's a and g
columns in one accumulator and writes only a * gelu(g), its erf a branch-free polynomial
(_gelu; 3.15 ms of GPU time a guided UNet step against 3.80 with libdevice's erff): the step
takes 26.54 ms on an H200 against 27.01 with F.linear and inductor's gelu-multiply
(docs/decisions.md; bench/step_timing.py).

The kernel serves float16 CUDA tensors on Hopper and newer (TMA), the dtype
and GPUs it was measured and checked on, with gradients off (it has no
backward); everything else runs F.linear and F.gelu, so the CPU path is
unchanged.
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

# Tile: BLOCK_M rows, up to MAX_HALF output columns (MAX_HALF a and MAX_HALF g columns of the projection),
# BLOCK_K of the input width per load; PER_SM programs per SM. The fastest over the model's calls on an
# H200 (docs/decisions.md).
BLOCK_M, MAX_HALF, BLOCK_K, WARPS, STAGES, PER_SM = 128, 128, 64, 8, 4, 1


def plain_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(..., k) -> (..., n) with weight (2 n, k), bias (2 n,): the original's arithmetic."""
    a, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return a * F.gelu(gate)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """plain_geglu's result, from the kernel where it serves."""
    if kernel_serves(x, weight):
        rows = x.reshape(-1, x.shape[-1])                                       # (m, k)
        return torch.ops.modelscope_t2v.geglu(rows, weight, bias).view(*x.shape[:-1], -1)
    return plain_geglu(x, weight, bias)


def kernel_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n, k = weight.shape[0] // 2, weight.shape[1]
    return (triton is not None and x.is_cuda and x.dtype == torch.float16 and weight.dtype == torch.float16
            and not torch.is_grad_enabled()   # inference only: the kernel has no backward
            and torch.cuda.get_device_properties(x.device).major >= 9   # TMA; torch.compile folds this call
            and x.numel() > 0 and k % 8 == 0 and n % 16 == 0   # TMA: 16-byte rows; whole tiles of columns
            and (torch.compiler.is_compiling() or kernel_works(x.device)))


@functools.cache
def kernel_works(device: torch.device) -> bool:
    """Whether the kernel runs on `device`; else warn once, and F.linear serves."""
    def probe(device):
        x, weight, bias = (torch.zeros(shape, device=device, dtype=torch.float16) for shape in [(1, 16), (32, 16), 32])
        torch.ops.modelscope_t2v.geglu(x, weight, bias)
    return kernel_runs(probe, device, 'GEGLU runs on F.linear')


def output_columns_per_tile(n: int) -> int:
    """The largest power of two up to MAX_HALF that divides n (n a multiple of 16)."""
    return min(MAX_HALF, n & -n)


@functools.cache
def processors(device: torch.device) -> int:
    """SMs of `device` (a few under Triton's CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 4


if triton is not None:

    @triton.jit
    def _gelu(g):
        # 0.5 g (1 + erf(g / sqrt 2)) = max(g, 0) - |g| q with q = 0.5 erfc(|g| / sqrt 2), erfc by Abramowitz &
        # Stegun 7.1.26 (|error| <= 1.5e-7; relative error of the result <= 1.7e-4 where |gelu| > 1e-3, under
        # float16's 4.9e-4). Branch-free, one exp2 and one reciprocal: half the instructions of libdevice's erf,
        # which held the epilogue back (docs/decisions.md). Constants are the book's, times 1 / sqrt 2 or 0.5.
        ag = tl.abs(g)
        t = tl.fdiv(1.0, 1.0 + 0.23164189 * ag)
        q = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))))
        q = q * tl.exp2(-0.7213475204444817 * ag * ag)   # e^(-x^2) with x = |g| / sqrt 2
        return tl.maximum(g, 0.0) - ag * q

    @triton.jit
    def _geglu_kernel(x_desc, w_desc, b_ptr, o_desc, M, N, K, PROGRAMS: tl.constexpr,
                      BLOCK_M: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr):
        # tile (i, j): output rows [i BLOCK_M, +BLOCK_M), columns [j HALF, +HALF), from the weight's a rows
        # [j HALF, +HALF) and g rows [N + j HALF, +HALF), loaded as one (2 HALF, BLOCK_K) operand, so that
        # one product fills one (BLOCK_M, 2 HALF) accumulator; j runs fastest, so the programs at work at
        # once share rows of x in the L2 cache
        tiles_n = N // HALF
        tiles = tl.cdiv(M, BLOCK_M) * tiles_n
        k_steps = tl.cdiv(K, BLOCK_K)
        halves = tl.arange(0, 2 * HALF)
        stored = tl.program_id(0) - PROGRAMS   # the epilogue's own tile counter: the loads run a tile ahead
        for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
            row, col = (tile // tiles_n) * BLOCK_M, (tile % tiles_n) * HALF
            acc = tl.zeros((BLOCK_M, 2 * HALF), dtype=tl.float32)
            for step in range(k_steps):
                x = x_desc.load([row, step * BLOCK_K])                                # (BLOCK_M, BLOCK_K)
                w = w_desc.load([0, col, step * BLOCK_K])                             # (2, HALF, BLOCK_K)
                acc = tl.dot(x, tl.reshape(w, (2 * HALF, BLOCK_K)).T, acc)
            stored += PROGRAMS
            row, col = (stored // tiles_n) * BLOCK_M, (stored % tiles_n) * HALF
            acc += tl.load(b_ptr + (halves // HALF) * N + col + halves % HALF).to(tl.float32)[None, :]
            a, gate = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))  # (BLOCK_M, HALF)
            out = a * _gelu(gate)
            o_desc.store([row, col], out.to(o_desc.dtype))

    def geglu_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The kernel on x (m, k), weight (2 n, k), bias (2 n,) -> (m, n)."""
        # TMA reads from 16-byte aligned addresses: a view that starts elsewhere is copied
        x, weight = (t.contiguous() if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)
                     for t in (x, weight))
        (m, k), n = x.shape, weight.shape[0] // 2
        half = output_columns_per_tile(n)
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        programs = min(PER_SM * processors(x.device), triton.cdiv(m, BLOCK_M) * (n // half))
        _geglu_kernel[(programs,)](
            TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K]),
            TensorDescriptor.from_tensor(weight.view(2, n, k), [2, half, BLOCK_K]), bias,
            TensorDescriptor.from_tensor(out, [BLOCK_M, half]), m, n, k, PROGRAMS=programs,
            BLOCK_M=BLOCK_M, HALF=half, BLOCK_K=BLOCK_K, num_warps=WARPS, num_stages=STAGES)
        return out

    @torch.library.custom_op('modelscope_t2v::geglu', mutates_args=())
    def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # geglu_rows, opaque to torch.compile and captured by CUDA graphs
        return geglu_rows(x, weight, bias)

    @_geglu_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0] // 2)
