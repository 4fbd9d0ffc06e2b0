"""Timing, peak memory, FLOP counting and image comparison for the benchmarks."""

from __future__ import annotations

import collections
import statistics
import time

import torch
from torch.utils.flop_counter import register_flop_formula

import modelscope_t2v.models.layers  # noqa: F401 (defines torch.ops.modelscope_t2v.addmm_)
from modelscope_t2v.models import frame_conv, geglu


@register_flop_formula(torch.ops.modelscope_t2v.addmm_)
def _addmm_flops(acc_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """The feed-forward's second GEMM, in place: (m, k) @ (k, n)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


if geglu.triton is not None:
    @register_flop_formula(torch.ops.modelscope_t2v.geglu)
    def _geglu_flops(x_shape, weight_shape, *args, **kwargs) -> int:
        """The GEGLU kernel's projection: (m, k) @ (k, 2 n); FlopCounterMode counts no elementwise work."""
        return 2 * x_shape[0] * x_shape[1] * weight_shape[0]


if frame_conv.triton is not None:
    @register_flop_formula(torch.ops.modelscope_t2v.frame_conv)
    def _frame_conv_flops(rows_shape, taps_shape, *args, **kwargs) -> int:
        """The temporal-conv kernel: (b n, 3 c) @ (3 c, co), as the Conv3d it replaces counts."""
        return 2 * rows_shape[0] * rows_shape[1] * rows_shape[2] * taps_shape[0] * taps_shape[1]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(result, seconds) of fn(), the device synchronised on both sides."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def median_time(fn, runs: int) -> float:
    return statistics.median(timed(fn)[1] for _ in range(runs))


def peak_gib(fn) -> dict:
    """Peak allocated and reserved GPU memory while fn runs, in GiB (None without a GPU)."""
    if not torch.cuda.is_available():
        fn()
        return {'allocated': None, 'reserved': None}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return {'allocated': torch.cuda.max_memory_allocated() / 2 ** 30,
            'reserved': torch.cuda.max_memory_reserved() / 2 ** 30}


def matmul_ceiling(device, dtype=torch.float16) -> float:
    """Measured TFLOP/s of a large matrix product: the arithmetic ceiling."""
    n = 8192 if device.type == 'cuda' else 512
    dtype = dtype if device.type == 'cuda' else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / median_time(lambda: a @ b, 10) / 1e12


def count_flops(engine, frames: int, height: int, width: int, encode: bool = False) -> dict:
    """TFLOP of one UNet forward (batch 1) and one decode of `frames` frames of height x width (and one encode)."""
    from torch.utils.flop_counter import FlopCounterMode
    cell = engine.config.autoencoder.downsample
    x = torch.randn(1, 4, frames, height // cell, width // cell, device=engine.device, dtype=engine.dtype)
    context = torch.randn(1, 77, engine.config.unet.context_dim, device=engine.device, dtype=engine.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as unet_counter:
        engine.unet(x, torch.tensor([500], device=engine.device), context)
    with torch.no_grad(), FlopCounterMode(display=False) as vae_counter:
        engine.decode(x)
    flops = {'unet_forward': unet_counter.get_total_flops() / 1e12, 'decode': vae_counter.get_total_flops() / 1e12}
    if encode:
        pixels = torch.zeros(1, 3, frames, height, width, device=engine.device, dtype=engine.dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as encode_counter:
            engine.autoencoder.encode_video(pixels, chunk_frames=1)
        flops['encode'] = encode_counter.get_total_flops() / 1e12
    return flops


def psnr(a, b) -> float:
    mse = ((a.astype('float64') - b.astype('float64')) ** 2).mean()
    return float('inf') if mse == 0 else float(10 * torch.log10(torch.tensor(255.0 ** 2 / mse)))


def write_kernel_table(kernels, steps, path):
    """Every kernel of the profiled steps, costliest first: ms per step, launches per step, full name."""
    by_name = collections.defaultdict(list)
    for k in kernels:
        by_name[k.name].append(k.time_range.elapsed_us())
    rows = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    path.write_text(''.join(f'{sum(us) / steps / 1e3:8.3f} ms {len(us) / steps:6.1f}x  {name}\n' for name, us in rows))


def read_kernel_table(path) -> dict:
    """write_kernel_table's file: name -> (ms, launches) per step."""
    table = {}
    for line in open(path):
        ms, _, launches, name = line.split(maxsplit=3)
        table[name.strip()] = float(ms), float(launches[:-1])
    return table


def kernel_kind(name: str) -> str:
    """A coarse kind for a kernel name: matrix products, convolutions, attention, Triton fusions by type, copies."""
    kinds = [('triton reduction', ('triton_red', 'triton_per')), ('triton pointwise', ('triton_poi',)),
             ('temporal conv (Triton)', ('_frame_conv_kernel',)), ('GEGLU (Triton)', ('_geglu_kernel',)),
             ('attention', ('sdpa', 'flash', 'fmha', 'frame_attention')),
             ('convolution (cuDNN)', ('fprop', 'conv')), ('gemm (cuBLAS)', ('nvjet', 'gemm', 'cutlass')),
             ('memset/memcpy', ('Memset', 'Memcpy'))]
    return next((kind for kind, keys in kinds if any(key in name for key in keys)), 'other')
