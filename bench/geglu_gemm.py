"""The package's GEGLU kernel (modelscope_t2v/models/geglu.py) against compiled linear + gelu and against
cuBLAS's linear alone, on the GEGLU calls of one guided UNet3D step, for a few tile configs.

    python bench/geglu_gemm.py          # GPU: microseconds per call and per step, each tile config

The package's tile config is the first of CONFIGS; the others are set on the module for the run.
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from modelscope_t2v.models import geglu

# (rows m = texts x frames x pixels, input width k, output width n, calls per step) of the real model
SHAPES = [(2 * 16 * 32 * 32, 320, 1280, 10), (16 * 32 * 32, 320, 1280, 1), (2 * 16 * 16 * 16, 640, 2560, 10),
          (2 * 16 * 8 * 8, 1280, 5120, 10), (2 * 16 * 4 * 4, 1280, 5120, 2)]
CONFIGS = [   # BLOCK_M, MAX_HALF (output columns per tile), BLOCK_K, WARPS, STAGES, PER_SM
    (geglu.BLOCK_M, geglu.MAX_HALF, geglu.BLOCK_K, geglu.WARPS, geglu.STAGES, geglu.PER_SM),
    (128, 128, 64, 8, 3, 1), (128, 128, 32, 8, 6, 1),
    # two programs per SM, 128 x 64 tiles of one warpgroup each: one program's epilogue can run while the
    # other's products do (the best of five such configs on 2026-11-30, 4.10 ms a step against 3.69)
    (128, 64, 64, 4, 3, 2)]


def with_config(config):
    def run(x, w, b):
        geglu.BLOCK_M, geglu.MAX_HALF, geglu.BLOCK_K, geglu.WARPS, geglu.STAGES, geglu.PER_SM = config
        return geglu.geglu_rows(x, w, b)   # without the custom op's host time: CUDA graphs hide it
    return run


def operands(m, k, n):
    torch.manual_seed(0)
    x = torch.randn(m, k, device='cuda').half()
    w = (torch.randn(2 * n, k, device='cuda') / k ** 0.5).half()
    b = (torch.randn(2 * n, device='cuda') * 0.1).half()
    return x, w, b


def main():
    compiled = torch.compile(geglu.plain_geglu, dynamic=False)
    variants = {'linear + gelu (compiled)': compiled, 'linear alone (cuBLAS)': F.linear}
    variants.update({'kernel {}x{} k{} w{} s{} {}/SM'.format(*config): with_config(config) for config in CONFIGS})
    totals = dict.fromkeys(variants, 0.0)
    for m, k, n, calls in SHAPES:
        x, w, b = operands(m, k, n)
        ref = geglu.plain_geglu(x.float(), w.float(), b.float())
        flop = 2 * m * k * 2 * n
        for name, fn in variants.items():
            try:
                out = fn(x, w, b)
                err = 0.0 if name.startswith('linear alone') else (out.float() - ref).abs().max().item()
                us = do_bench(lambda: fn(x, w, b), warmup=50, rep=300) * 1e3
            except Exception as error:   # a config that does not fit (shared memory, registers)
                print(f'm={m:5d} k={k:4d} n={n:4d}  {name:30s} failed: {str(error)[:100]}', flush=True)
                totals[name] = float('inf')
                continue
            totals[name] += us * calls
            print(f'm={m:5d} k={k:4d} n={n:4d} x{calls:2d}  {name:30s} {us:8.1f} us  {flop / us / 1e6:5.0f} TFLOP/s'
                  f'  max|err| {err:.1e}', flush=True)
    print('per step (all GEGLU calls):')
    for name, us in totals.items():
        print(f'  {name:30s} {us / 1e3:6.3f} ms')


if __name__ == '__main__':
    main()
