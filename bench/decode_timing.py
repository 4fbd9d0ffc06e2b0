"""The autoencoder decode of a default generation (16 frames, latent 32x32 -> 256x256), eager and compiled.

    python bench/decode_timing.py                        # GPU, real-size random autoencoder, float16
    python bench/decode_timing.py --kernels-dir=DIR      # also the kernels of two compiled variants

Prints per variant: first-call seconds (compile), the median seconds of a decode in
4-frame chunks (the package's CUDA default; compiled as the package compiles, with programmatic
dependent launch, and with CUDA graphs in mode reduce-overhead), its peak allocated memory, and its largest
difference from the eager NCHW decode.
The last three variants take each GroupNorm's statistics per channel first, as the UNet's fast path does
(models/group_norm.py): reading channels-last rows in order. Compiled with CUDA graphs, that is the
package's decode under compile='reduce-overhead' (AutoencoderKL.compile_decoder). The last one also lets
cuDNN time its algorithms for each convolution shape (cudnn.benchmark).
With --kernels-dir=DIR, 3 decodes of 'compiled channels-last' and of the first per-channel variant are
profiled: ms per decode by kind of kernel, and every kernel to DIR/kernels-decode-<variant>.txt (ms and
launches per decode).
"""
import collections
import pathlib
import sys
import time

import torch
from einops import rearrange

from measure import kernel_kind, median_time, peak_gib, sync, write_kernel_table
from modelscope_t2v.config import FULL
from modelscope_t2v.models.autoencoder import AutoencoderKL
from modelscope_t2v.models.group_norm import GroupNorm
from modelscope_t2v.text_to_video import compile_options

torch.manual_seed(0)
with torch.device('cuda'):
    autoencoder = AutoencoderKL(FULL.autoencoder).half().eval().requires_grad_(False)
latents = torch.randn(1, 4, 16, 32, 32, device='cuda', dtype=torch.float16)
reference = autoencoder.decode_video(latents, 4).float()


def report(name, decode):
    start = time.perf_counter()
    with torch.no_grad():
        out = decode()
    sync()
    first = time.perf_counter() - start
    seconds = median_time(decode, 10)
    memory = peak_gib(decode)['allocated']
    err = ((out.float() - reference).abs().max() / reference.abs().max()).item()
    print(f'{name:34s} first {first:6.1f} s  decode {seconds * 1e3:6.1f} ms  peak {memory:5.2f} GiB  '
          f'max rel diff {err:.1e}', flush=True)


def profile_kernels(decode, name):
    """With --kernels-dir=DIR, profile 3 decodes: print ms per decode by kind of kernel, and write every kernel
    to DIR/kernels-decode-<name>.txt."""
    directory = next((arg.split('=', 1)[1] for arg in sys.argv if arg.startswith('--kernels-dir=')), None)
    if directory is None:
        return
    decode()
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            decode()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind = collections.defaultdict(float)
    for k in kernels:
        by_kind[kernel_kind(k.name)] += k.time_range.elapsed_us() / 3e3
    print(f'  kernels per decode: {sum(by_kind.values()):.2f} ms in {len(kernels) // 3} launches; ' +
          ', '.join(f'{kind} {ms:.2f}' for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1])))
    write_kernel_table(kernels, 3, pathlib.Path(directory, f'kernels-decode-{name}.txt'))


def decode_copying_chunks(chunk_frames):
    """decode_video, each chunk copied out of the CUDA graph's output before the next replay reuses it."""
    z = rearrange(latents / autoencoder.config.scale_factor, 'b c f h w -> (b f) c h w')
    frames = torch.cat([autoencoder.decode(part).clone() for part in z.split(chunk_frames)])
    return rearrange(frames, '(b f) c h w -> b c f h w', b=latents.shape[0])


with torch.no_grad():
    report('eager NCHW', lambda: autoencoder.decode_video(latents, 4))
    autoencoder.to(memory_format=torch.channels_last)
    report('eager channels-last', lambda: autoencoder.decode_video(latents, 4))
    decoder = autoencoder.decoder
    autoencoder.decoder = torch.compile(decoder, dynamic=False, options=compile_options('default'))
    report('compiled channels-last', lambda: autoencoder.decode_video(latents, 4))
    profile_kernels(lambda: autoencoder.decode_video(latents, 4), 'compiled')
    report('compiled channels-last, 16 at once', lambda: autoencoder.decode_video(latents, 16))
    autoencoder.decoder = torch.compile(decoder, dynamic=False, options=compile_options('reduce-overhead'))
    report('compiled reduce-overhead', lambda: decode_copying_chunks(4))
    for module in decoder.modules():
        if isinstance(module, GroupNorm):
            module.per_channel_stats = True
    autoencoder.decoder = torch.compile(decoder, dynamic=False, options=compile_options('default'))
    report('compiled, per-channel GN statistics', lambda: autoencoder.decode_video(latents, 4))
    profile_kernels(lambda: autoencoder.decode_video(latents, 4), 'per-channel-stats')
    autoencoder.decoder = torch.compile(decoder, dynamic=False, options=compile_options('reduce-overhead'))
    report('reduce-overhead, per-channel GN stats', lambda: decode_copying_chunks(4))
    autoencoder.decoder = torch.compile(decoder, dynamic=False, options=compile_options('default'))
    torch.backends.cudnn.benchmark = True
    report('per-channel GN stats, cudnn.benchmark', lambda: autoencoder.decode_video(latents, 4))
