"""The autoencoder decode of a default generation (16 frames, latent 32x32 -> 256x256), eager and compiled.

    python bench/decode_timing.py        # GPU, real-size random autoencoder, float16

Prints per variant: first-call seconds (compile), the median seconds of a decode in
4-frame chunks (the package's CUDA default; compiled as the package compiles, with programmatic
dependent launch, and with CUDA graphs in mode reduce-overhead), its peak allocated memory, and its largest
difference from the eager NCHW decode.
"""
import time

import torch
from einops import rearrange

from measure import median_time, peak_gib, sync
from modelscope_t2v.config import FULL
from modelscope_t2v.models.autoencoder import AutoencoderKL
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
    report('compiled channels-last, 16 at once', lambda: autoencoder.decode_video(latents, 16))
    autoencoder.decoder = torch.compile(decoder, dynamic=False, options=compile_options('reduce-overhead'))
    report('compiled reduce-overhead', lambda: decode_copying_chunks(4))
