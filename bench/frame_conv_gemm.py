"""The package's temporal-conv kernel (modelscope_t2v/models/frame_conv.py) against the GEMM into 3 co tap
columns with the compiled frame-shifted sum, and against cuBLAS's GEMM alone, on the temporal convs of one
guided UNet3D step, for a few tile configs. Times are CUDA-graph replays: the GPU's time, no host time.

    python bench/frame_conv_gemm.py          # GPU: microseconds per call and per step, each tile config

The first kernel variant is the package's tile config; those of CONFIGS are set on the module for each call.
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from modelscope_t2v.models import frame_conv

# (videos, pixels per frame, channels, calls per step) of the real model, 16 frames; the first ResBlock
# runs before the first cross-attention, once for both texts
SHAPES = [(2, 32 * 32, 320, 16), (1, 32 * 32, 320, 4), (2, 16 * 16, 640, 20), (2, 8 * 8, 1280, 20),
          (2, 4 * 4, 1280, 28)]
FRAMES = 16
CONFIGS = [   # BLOCK_M, MAX_N, BLOCK_K, WARPS, STAGES
    (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 3), (128, 128, 64, 4, 5), (128, 256, 64, 8, 3),
    (128, 64, 64, 4, 4),
    # two warpgroups of 128 rows each; a longer K step; deeper pipelines. Each fits the 227 KB of shared memory
    # of a Hopper SM (compiled for sm_90 on the CPU)
    (256, 128, 64, 8, 3), (256, 64, 64, 8, 4), (256, 128, 32, 8, 6), (128, 128, 128, 4, 3), (128, 128, 64, 4, 6)]


def with_config(config):
    def run(rows, taps, bias, pixels):
        package = frame_conv.BLOCK_M, frame_conv.MAX_N, frame_conv.WARPS, frame_conv.k_loop
        frame_conv.BLOCK_M, frame_conv.MAX_N, block_k, frame_conv.WARPS, stages = config
        frame_conv.k_loop = lambda c: (block_k, stages)
        try:
            return frame_conv.frame_conv_rows(rows, taps, bias, pixels)
        finally:
            frame_conv.BLOCK_M, frame_conv.MAX_N, frame_conv.WARPS, frame_conv.k_loop = package
    return run


def operands(videos, pixels, c):
    torch.manual_seed(0)
    rows = torch.randn(videos, FRAMES * pixels, c, device='cuda').half()
    taps = (torch.randn(3, c, c, device='cuda') / (3 * c) ** 0.5).half()
    bias = (torch.randn(c, device='cuda') * 0.1).half()
    return rows, taps, bias


def main():
    compiled = torch.compile(frame_conv.plain_frame_conv, dynamic=False)
    variants = {'3 co GEMM + shifted sum (compiled)': compiled,
                '3 co GEMM alone (cuBLAS)': lambda rows, taps, bias, pixels: F.linear(rows, taps.flatten(0, 1))}
    variants['kernel, package tiles (k_loop per c)'] = frame_conv.frame_conv_rows
    variants.update({'kernel {}x{} k{} w{} s{}'.format(*config): with_config(config) for config in CONFIGS})
    totals = dict.fromkeys(variants, 0.0)
    for videos, pixels, c, calls in SHAPES:
        rows, taps, bias = operands(videos, pixels, c)
        ref = frame_conv.plain_frame_conv(rows.float(), taps.float(), bias.float(), pixels)
        flop = 2 * rows.shape[0] * rows.shape[1] * c * 3 * c
        for name, fn in variants.items():
            try:
                out = fn(rows, taps, bias, pixels)
                err = 0.0 if 'alone' in name else ((out.float() - ref).abs().max() / ref.abs().max()).item()
                us = do_bench_cudagraph(lambda: fn(rows, taps, bias, pixels), rep=200) * 1e3
            except Exception as error:   # a config that does not fit (shared memory, registers)
                print(f'{videos}x{pixels:4d}px c={c:4d}  {name:36s} failed: {str(error)[:100]}', flush=True)
                totals[name] = float('inf')
                continue
            totals[name] += us * calls
            print(f'{videos}x{pixels:4d}px c={c:4d} x{calls:2d}  {name:36s} {us:7.1f} us  '
                  f'{flop / us / 1e6:5.0f} TFLOP/s  max rel err {err:.1e}', flush=True)
    print('per step (all temporal convs):')
    for name, us in totals.items():
        print(f'  {name:36s} {us / 1e3:6.3f} ms')


if __name__ == '__main__':
    main()
