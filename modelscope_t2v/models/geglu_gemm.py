"""GEGLU's projection and gate in one Triton kernel on CUDA; linear, chunk and gelu elsewhere.

GEGLU computes a * gelu(g), where a and g are the two halves of one linear
map. As two steps the product writes both halves (2 x inner columns) to memory
and a second kernel reads them back to write a * gelu(g). This kernel keeps a
and g of the same columns in registers, one accumulator each, and writes only
the result: half the output traffic, no second pass.

It serves float16 CUDA tensors whose input width is a multiple of BLOCK_K;
everything else (the CPU, other dtypes) runs the plain three steps, so the CPU
path is unchanged.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None
if not hasattr(torch.library, 'triton_op'):  # torch < 2.6
    triton = None

BLOCK_K = 64
# tile rows, tile columns (of each half), warps, pipeline stages: measured by bench/geglu_gemm.py on an H200
TILE = {'BLOCK_M': 128, 'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 3}


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """a * gelu(g) for (a, g) = x @ weight.T + bias split in halves: (..., k) -> (..., n)."""
    a, g = F.linear(x, weight, bias).chunk(2, dim=-1)
    return a * F.gelu(g)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GEGLU of x (..., k) with an nn.Linear(k, 2 n)'s weight and bias -> (..., n)."""
    if kernel_serves(x, weight):
        rows = x.reshape(-1, x.shape[-1])
        return torch.ops.modelscope_t2v.geglu_gemm(rows, weight, bias).view(*x.shape[:-1], -1)
    return geglu_reference(x, weight, bias)


def kernel_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dtype == weight.dtype == torch.float16
            and x.shape[-1] % BLOCK_K == 0
            and (torch.compiler.is_compiling() or kernel_works(x.device)))


@functools.cache
def kernel_works(device: torch.device) -> bool:
    """Whether the kernel runs on `device`; else warn once, and the plain steps serve."""
    try:
        w = torch.zeros(2 * 16, BLOCK_K, device=device, dtype=torch.float16)
        torch.ops.modelscope_t2v.geglu_gemm(w[:1], w, w[:, 0])
        return True
    except Exception as error:  # whatever Triton raises, the plain steps give the same values
        warnings.warn(f'GEGLU runs as linear + gelu: the Triton kernel failed on {device} ({error})')
        return False


if triton is not None:

    @triton.jit
    def _geglu_gemm_kernel(x_ptr, w_ptr, b_ptr, o_ptr, M, N, K,
                           x_sm, w_sn, o_sm,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
        # one program: output rows [m0, m0 + BLOCK_M), columns [n0, n0 + BLOCK_N);
        # programs sharing weight columns run close together (GROUP_M row tiles), for the L2 cache
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_rows = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
        pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < M, cols < N
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * x_sm + ks[None, :]          # (BLOCK_M, BLOCK_K)
        a_ptrs = w_ptr + cols[None, :].to(tl.int64) * w_sn + ks[:, None]          # (BLOCK_K, BLOCK_N)
        g_ptrs = a_ptrs + N * w_sn                                                 # the gate half's rows
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            acc_a = tl.dot(x, tl.load(a_ptrs, mask=col_ok[None, :], other=0.0), acc_a)
            acc_g = tl.dot(x, tl.load(g_ptrs, mask=col_ok[None, :], other=0.0), acc_g)
            x_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
        a = acc_a + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        g = acc_g + tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))              # a * gelu(g), exact gelu
        o_ptrs = o_ptr + rows[:, None].to(tl.int64) * o_sm + cols[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @torch.library.triton_op('modelscope_t2v::geglu_gemm', mutates_args=())
    def _geglu_gemm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x: (m, k); weight: (2 n, k); bias: (2 n,) -> (m, n), each with unit stride along its last dim
        x, weight, bias = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, weight, bias))
        (m, k), n = x.shape, weight.shape[0] // 2
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        tiles = triton.cdiv(m, TILE['BLOCK_M']) * triton.cdiv(n, TILE['BLOCK_N'])
        torch.library.wrap_triton(_geglu_gemm_kernel)[(tiles,)](
            x, weight, bias, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_K=BLOCK_K, GROUP_M=8, **TILE)
        return out
