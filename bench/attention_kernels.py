"""The UNet's attention calls at one workload's shapes, each kernel timed alone (GPU).

    python bench/attention_kernels.py --frames 24 --latents 72x40     # zeroscope 576w
    python bench/attention_kernels.py                                 # the default 16 x 32x32

Spatial self-attention ((b f), h w, heads, 64) and cross-attention (b, f h w queries, 77 text tokens) at
each level, under each of SDPA's backends; temporal attention ((b h w), f, heads, 64) in the package's
kernel (models/frame_attention.py) with 1, 2 and 4 warps a program, and SDPA's memory-efficient kernel.
With --window W --stride S the temporal rows run in windows (FreeNoise, models/frame_windows.py): the
package's one-call kernel against its window-by-window loop, each also compared with the loop in float32.
Each call is timed inside a CUDA graph of REPEATS calls, so the host's launches do not count. Prints
microseconds, TFLOP/s and the HBM bandwidth that reading q, k, v and writing out once would take.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from modelscope_t2v.models import frame_attention
from modelscope_t2v.models.frame_windows import window_starts, windowed

HEAD = 64
TEXT = 77
BACKENDS = {'cudnn': SDPBackend.CUDNN_ATTENTION, 'flash': SDPBackend.FLASH_ATTENTION,
            'efficient': SDPBackend.EFFICIENT_ATTENTION}


REPEATS = 10


def microseconds(fn, runs=20) -> float:
    """GPU microseconds of one fn(), the median over `runs` replays of a CUDA graph of REPEATS calls."""
    fn()   # compiles and loads the kernel before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPEATS)
    return statistics.median(times)


def report(label, us, flop, nbytes):
    print(f'{label:<62} {us:9.1f} us {flop / us / 1e6:7.1f} TFLOP/s {nbytes / us / 1e6:5.2f} TB/s', flush=True)


def sdpa(q, k, v, backend):
    # q, k, v: (n, l, heads, d) as the UNet holds them
    with sdpa_kernel(BACKENDS[backend]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def qkv(n, lq, lk, heads, device):
    def make(length):
        return torch.randn(n, length, heads * HEAD, device=device, dtype=torch.float16).view(n, length, heads, HEAD)
    return make(lq), make(lk), make(lk)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--frames', type=int, default=16)
    parser.add_argument('--latents', default='32x32', help='W x H of the latents')
    parser.add_argument('--window', type=int, help='temporal attention in windows of this many frames')
    parser.add_argument('--stride', type=int, default=4)
    parser.add_argument('--levels', type=int, default=4, help='the first this many levels of the UNet')
    args = parser.parse_args()
    width, height = (int(s) for s in args.latents.split('x'))
    device, videos = torch.device('cuda'), 2   # two texts: guidance
    print(torch.cuda.get_device_name(), torch.__version__, f'{args.frames} frames, latents {width}x{height}')
    for level, heads in enumerate((5, 10, 20, 20)[:args.levels]):
        pixels = -(-width // 2 ** level) * -(-height // 2 ** level)
        images = videos * args.frames
        shapes = {'self': (images, pixels, pixels), 'cross': (videos, args.frames * pixels, TEXT)}
        for kind, (n, lq, lk) in shapes.items():
            q, k, v = qkv(n, lq, lk, heads, device)
            flop = 4 * n * heads * lq * lk * HEAD
            nbytes = 2 * (q.numel() * 2 + k.numel() + v.numel())
            for backend in BACKENDS:
                try:
                    us = microseconds(lambda: sdpa(q, k, v, backend))
                except RuntimeError as error:
                    print(f'level {level} {kind} {backend}: {str(error).splitlines()[0][:80]}')
                    continue
                report(f'level {level} {kind:<5} {tuple(q.shape)} x {lk} {backend}', us, flop, nbytes)
        q, k, v = qkv(videos * pixels, args.frames, args.frames, heads, device)
        nbytes = 4 * q.numel() * 2
        if args.window:
            windows = len(window_starts(args.frames, args.window, args.stride))
            flop = 4 * q.shape[0] * heads * windows * args.window ** 2 * HEAD
            loop = windowed(frame_attention.frame_attention, args.window, args.stride)
            one_call = windowed(frame_attention.frame_attention, args.window, args.stride,
                                frame_attention.frame_attention_in_windows)
            exact = loop(q.float(), k.float(), v.float())
            for label, attend in (('loop', loop), ('one call', one_call)):
                us = microseconds(lambda: attend(q, k, v))
                report(f'level {level} frames {tuple(q.shape)} windows, {label}', us, flop, nbytes)
                print(f'    max |difference| from float32 windows: {(attend(q, k, v).float() - exact).abs().max():.2e}')
            continue
        flop = 4 * q.shape[0] * heads * args.frames ** 2 * HEAD
        for warps in (1, 2, 4):
            frame_attention.KERNEL_WARPS = warps
            us = microseconds(lambda: torch.ops.modelscope_t2v.frame_attention(q, k, v))
            report(f'level {level} frames {tuple(q.shape)} kernel, {warps} warps', us, flop, nbytes)
        us = microseconds(lambda: sdpa(q, k, v, 'efficient'))
        report(f'level {level} frames {tuple(q.shape)} efficient', us, flop, nbytes)


if __name__ == '__main__':
    with torch.no_grad():
        main()
