"""GEGLU (a * gelu(g), a and g the halves of one projection) as one persistent TMA GEMM, against the package's
compiled linear + gelu, on the GEGLU calls of one guided UNet3D step.

    python bench/geglu_gemm.py          # GPU: microseconds per call and per step, each tile config
    python bench/geglu_gemm.py check    # CPU: the kernel under Triton's interpreter against float32

The package's path writes the projection's 8 c columns and reads them back in a second kernel; at the
32x32 level that takes 175 us a call on an H200 against ~80 us of arithmetic. Here the weight's rows are
interleaved per tile (`interleave`: HALF value rows, then the HALF gate rows of the same columns), so one
accumulator of 2 HALF columns holds a and g of HALF output columns, and the epilogue writes only
a * gelu(g). The kernel is persistent (one or two programs per SM, each looping over tiles, the loads of
the next tile issued while the current one finishes) and loads and stores through TMA descriptors. An experiment:
the package takes it only if it beats linear + gelu on the whole step.
"""
import os
import sys

if 'check' in sys.argv:
    os.environ['TRITON_INTERPRET'] = '1'   # read when a kernel is defined

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

# (rows m = texts x frames x pixels, input width k, output width n, calls per step) of the real model
SHAPES = [(2 * 16 * 32 * 32, 320, 1280, 10), (16 * 32 * 32, 320, 1280, 1), (2 * 16 * 16 * 16, 640, 2560, 10),
          (2 * 16 * 8 * 8, 1280, 5120, 10), (2 * 16 * 4 * 4, 1280, 5120, 2)]
CONFIGS = [   # BLOCK_M, HALF (output columns per tile), BLOCK_K, warps, stages, programs per SM
    (128, 64, 64, 8, 3, 1), (128, 64, 64, 8, 4, 1), (128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 4, 1),
    (128, 64, 64, 4, 4, 1), (64, 128, 64, 4, 4, 1), (128, 128, 32, 8, 5, 1), (256, 64, 64, 8, 3, 1),
    (128, 64, 64, 8, 3, 2), (128, 64, 64, 4, 3, 2), (128, 64, 64, 8, 2, 2)]


def geglu_reference(x, weight, bias):
    """a * gelu(g) for (a, g) = x @ weight.T + bias split in halves: (m, k) -> (m, n). The package's GEGLU."""
    a, g = F.linear(x, weight, bias).chunk(2, dim=-1)
    return a * F.gelu(g)


def interleave(weight, bias, half):
    """(2 n, k) weight and (2 n,) bias of [a rows; g rows] -> rows [a 0..half-1, g 0..half-1, a half.., ...]."""
    n = weight.shape[0] // 2
    w = weight.view(2, n // half, half, -1).transpose(0, 1).reshape(2 * n, -1).contiguous()
    b = bias.view(2, n // half, half).transpose(0, 1).reshape(2 * n).contiguous()
    return w, b


@triton.jit
def _geglu_persistent_kernel(x_desc, w_desc, b_ptr, o_desc, M, N, K,
                             BLOCK_M: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr,
                             PROGRAMS: tl.constexpr):
    # tile (i, j): output rows [i BLOCK_M, +BLOCK_M), columns [j HALF, +HALF), from interleaved weight rows
    # [2 j HALF, +2 HALF); columns j run fastest, so the programs at work at once share rows of x in L2
    tiles_n = N // HALF
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    k_steps = tl.cdiv(K, BLOCK_K)
    done = tl.program_id(0) - PROGRAMS   # the epilogue's own tile counter, kept apart from the loads'
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        row, col = (tile // tiles_n) * BLOCK_M, (tile % tiles_n) * 2 * HALF
        acc = tl.zeros((BLOCK_M, 2 * HALF), dtype=tl.float32)
        for step in range(k_steps):
            x = x_desc.load([row, step * BLOCK_K])                 # (BLOCK_M, BLOCK_K)
            w = w_desc.load([col, step * BLOCK_K])                 # (2 HALF, BLOCK_K)
            acc = tl.dot(x, w.T, acc)
        done += PROGRAMS
        row, col = (done // tiles_n) * BLOCK_M, (done % tiles_n) * 2 * HALF
        acc += tl.load(b_ptr + col + tl.arange(0, 2 * HALF)).to(tl.float32)[None, :]
        a, g = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))   # (BLOCK_M, HALF) each
        out = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))                  # a * gelu(g), exact gelu
        o_desc.store([row, col // 2], out.to(o_desc.dtype))


def geglu_persistent(x, w_interleaved, b_interleaved, config, processors):
    """GEGLU of x (m, k) with weights interleaved for config's HALF -> (m, n), on `processors` SMs."""
    block_m, half, block_k, warps, stages, per_processor = config
    (m, k), n = x.shape, w_interleaved.shape[0] // 2
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(m, block_m) * (n // half)
    grid = (min(per_processor * processors, tiles),)
    _geglu_persistent_kernel[grid](
        TensorDescriptor.from_tensor(x, [block_m, block_k]),
        TensorDescriptor.from_tensor(w_interleaved, [2 * half, block_k]), b_interleaved,
        TensorDescriptor.from_tensor(out, [block_m, half]), m, n, k,
        BLOCK_M=block_m, HALF=half, BLOCK_K=block_k, PROGRAMS=grid[0], num_warps=warps, num_stages=stages)
    return out


@torch.library.custom_op('t2v_bench::geglu_tma', mutates_args=())
def geglu_tma(x: torch.Tensor, w_interleaved: torch.Tensor, b_interleaved: torch.Tensor,
              block_m: int, half: int, block_k: int, warps: int, stages: int, per_processor: int) -> torch.Tensor:
    """geglu_persistent as an operator torch.compile calls as it is (and a CUDA graph captures)."""
    processors = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    config = (block_m, half, block_k, warps, stages, per_processor)
    return geglu_persistent(x.contiguous(), w_interleaved, b_interleaved, config, processors)


@geglu_tma.register_fake
def _(x, w_interleaved, b_interleaved, block_m, half, block_k, warps, stages, per_processor):
    return x.new_empty(x.shape[0], w_interleaved.shape[0] // 2)


def operands(m, k, n, device, dtype):
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(2 * n, k, device=device) / k ** 0.5).to(dtype)
    b = (torch.randn(2 * n, device=device) * 0.1).to(dtype)
    return x, w, b


def check():
    """Small shapes under the interpreter (ragged rows, several tiles per program) against float32."""
    for m, k, n, config, processors in [(40, 64, 32, (16, 16, 32, 4, 2, 1), 3), (64, 96, 64, (32, 32, 32, 4, 2, 2), 1)]:
        x, w, b = operands(m, k, n, 'cpu', torch.float16)
        got = geglu_persistent(x, *interleave(w, b, config[1]), config, processors).float()
        ref = geglu_reference(x.float(), w.float(), b.float())
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f'm={m} k={k} n={n} config {config} on {processors} SMs: max rel diff {err:.1e}')
        assert err < 5e-3, err


def bench():
    from triton.testing import do_bench
    processors = torch.cuda.get_device_properties(0).multi_processor_count
    compiled = torch.compile(geglu_reference, dynamic=False)
    # each variant: (x, w, b, {half: interleaved w and b}) -> output; the weights interleaved once per shape,
    # as the package would store them
    variants = {'linear + gelu (compiled)': lambda x, w, b, interleaved: compiled(x, w, b),
                'linear alone (cuBLAS)': lambda x, w, b, interleaved: F.linear(x, w, b)}
    for config in CONFIGS:
        variants['tma {}x{} k{} w{} s{} {}/SM'.format(*config)] = (
            lambda x, w, b, interleaved, config=config:
            geglu_persistent(x, *interleaved[config[1]], config, processors))
    totals = dict.fromkeys(variants, 0.0)
    for m, k, n, calls in SHAPES:
        x, w, b = operands(m, k, n, 'cuda', torch.float16)
        interleaved = {half: interleave(w, b, half) for half in {config[1] for config in CONFIGS}}
        ref = geglu_reference(x.float(), w.float(), b.float())
        flop = 2 * m * k * 2 * n
        for name, fn in variants.items():
            try:
                out = fn(x, w, b, interleaved)
                err = 0.0 if name.startswith('linear alone') else (out.float() - ref).abs().max().item()
                us = do_bench(lambda: fn(x, w, b, interleaved), warmup=50, rep=300) * 1e3
            except Exception as error:   # a config that does not fit (shared memory, registers)
                print(f'm={m:5d} k={k:4d} n={n:4d}  {name:26s} failed: {str(error)[:100]}', flush=True)
                totals[name] = float('inf')
                continue
            totals[name] += us * calls
            print(f'm={m:5d} k={k:4d} n={n:4d} x{calls:2d}  {name:26s} {us:8.1f} us  {flop / us / 1e6:5.0f} TFLOP/s'
                  f'  max|err| {err:.1e}', flush=True)
    print('per step (all GEGLU calls):')
    for name, us in totals.items():
        print(f'  {name:26s} {us / 1e3:6.3f} ms')


if __name__ == '__main__':
    check() if 'check' in sys.argv else bench()
