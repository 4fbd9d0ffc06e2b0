"""The GEGLU calls of one guided UNet3D step: the package's one-kernel GEGLU against linear + gelu.

    python bench/geglu_gemm.py        # GPU

For each call shape of the real model (2 texts per video, 16 frames, latent 32x32) prints the
microseconds per call (triton.testing.do_bench medians) of the plain steps, compiled as the
package's compiled path runs them (cuBLAS product, then one fused gelu-and-multiply kernel), and of
the Triton kernel at each tile shape, with its largest error against float32; then the sum over
one step's calls for the plain steps and for each tile shape.
"""
import torch
from triton.testing import do_bench

import modelscope_t2v.models.geglu_gemm as gg

# (rows m = texts x frames x pixels, input width k, output width n, calls per step) of the real model
SHAPES = [(2 * 16 * 32 * 32, 320, 1280, 10), (16 * 32 * 32, 320, 1280, 1), (2 * 16 * 16 * 16, 640, 2560, 10),
          (2 * 16 * 8 * 8, 1280, 5120, 10), (2 * 16 * 4 * 4, 1280, 5120, 2)]
TILES = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 4),
         (64, 128, 4, 4), (256, 64, 8, 3), (64, 64, 4, 4)]   # BLOCK_M, BLOCK_N, warps, stages


def kernel_with(tile):
    def run(x, w, b):
        gg.TILE = dict(zip(('BLOCK_M', 'BLOCK_N', 'num_warps', 'num_stages'), tile))
        return torch.ops.modelscope_t2v.geglu_gemm(x, w, b)
    return run


VARIANTS = {'linear + gelu (compiled)': torch.compile(gg.geglu_reference, dynamic=False)}
VARIANTS.update({'triton {}x{} w{} s{}'.format(*tile): kernel_with(tile) for tile in TILES})

totals = dict.fromkeys(VARIANTS, 0.0)
torch.manual_seed(0)
for m, k, n, calls in SHAPES:
    x = torch.randn(m, k, device='cuda', dtype=torch.float16)
    w = (torch.randn(2 * n, k, device='cuda') / k ** 0.5).half()
    b = (torch.randn(2 * n, device='cuda') * 0.1).half()
    ref = gg.geglu_reference(x.float(), w.float(), b.float())
    flop = 2 * m * k * 2 * n
    for name, fn in VARIANTS.items():
        try:
            err = (fn(x, w, b).float() - ref).abs().max().item()
            us = do_bench(lambda: fn(x, w, b), warmup=50, rep=300) * 1e3
        except Exception as error:   # a tile that does not fit (shared memory, registers)
            print(f'm={m:5d} k={k:4d} n={n:4d}  {name:26s} failed: {str(error)[:80]}', flush=True)
            totals[name] = float('inf')
            continue
        totals[name] += us * calls
        print(f'm={m:5d} k={k:4d} n={n:4d} x{calls:2d}  {name:26s} {us:8.1f} us  {flop / us / 1e6:5.0f} TFLOP/s  '
              f'max|err| {err:.1e}', flush=True)
print('per step (all GEGLU calls):')
for name, us in totals.items():
    print(f'  {name:26s} {us / 1e3:6.3f} ms')
