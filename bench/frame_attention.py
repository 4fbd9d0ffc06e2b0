"""The temporal attention calls of one guided UNet3D step: the Triton kernel against SDPA's kernels.

    python bench/frame_attention.py        # GPU

For each call shape of the real model (batch 2, 16 frames, latent 32x32) prints the
microseconds per call of the package's kernel at 1, 2, 4 and 8 warps and of SDPA's
memory-efficient and cuDNN kernels (triton.testing.do_bench medians), the error of
each against float32 attention, and the sum over one step's calls.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import modelscope_t2v.models.frame_attention as fa

# (pixels n = batch x h x w, heads, calls per step) of the real model's temporal transformers
SHAPES = [(2 * 32 * 32, 8, 2), (2 * 32 * 32, 5, 10), (2 * 16 * 16, 10, 10), (2 * 8 * 8, 20, 10)]
FRAMES, HEAD = 16, 64


def kernel_at(warps):
    def run(q, k, v):
        fa.KERNEL_WARPS = warps
        return torch.ops.modelscope_t2v.frame_attention(q, k, v)
    return run


def sdpa_with(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return fa.multi_head_sdpa(q, k, v)
    return run


VARIANTS = {f'triton {w} warps': kernel_at(w) for w in (1, 2, 4, 8)}
VARIANTS.update({'sdpa efficient': sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
                 'sdpa cudnn': sdpa_with(SDPBackend.CUDNN_ATTENTION)})

totals = dict.fromkeys(VARIANTS, 0.0)
torch.manual_seed(0)
for n, heads, calls in SHAPES:
    # q, k, v as the projections leave them: (n, l, heads * d) viewed as (n, l, heads, d)
    q, k, v = (torch.randn(n, FRAMES, heads * HEAD, device='cuda', dtype=torch.float16).unflatten(-1, (heads, HEAD))
               for _ in range(3))
    ref = fa.multi_head_sdpa(q.float(), k.float(), v.float())
    for name, fn in VARIANTS.items():
        err = (fn(q, k, v).float() - ref).abs().max().item()
        us = do_bench(lambda: fn(q, k, v), warmup=50, rep=300) * 1e3
        totals[name] += us * calls
        print(f'n={n:5d} heads={heads:2d} x{calls:2d}  {name:18s} {us:8.1f} us  max|err| {err:.1e}', flush=True)
print('per step (all temporal attention calls):')
for name, us in totals.items():
    print(f'  {name:18s} {us / 1e3:6.3f} ms')
