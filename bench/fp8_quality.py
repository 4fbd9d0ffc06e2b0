"""Would FP8 matrix products keep the output quality, and how much faster are they?

    python bench/fp8_quality.py             # GPU: real-size random weights
    python bench/fp8_quality.py tiny        # CPU dry run on the tiny model

Quality: every F.linear of the UNet's channels-last path (attention, feed-forward, projections and the
temporal convolutions' GEMMs) gets its input rounded per row, and its weight per output channel, to
float8 e4m3, each row scaled so that its largest |value| maps to 448; the product is then taken in the
engine's dtype. That is what a row-wise scaled FP8 GEMM with a wide accumulator computes, the best case
of FP8 (per-tensor scales round more coarsely). The 3x3 convolutions stay in fp16. Prints the PSNR (dB)
of the uint8 frames of fp16 and of fp16 + FP8 GEMMs against a float32 run of the same seed (TF32 off).

Speed (CUDA only): for the UNet's main GEMM shapes, TFLOP/s of fp16 torch.mm against row-wise scaled
FP8 torch._scaled_mm (bf16 out), operands already in their formats.
"""
import contextlib
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from measure import psnr

from modelscope_t2v import TextToVideo, parse_request
from modelscope_t2v.config import FULL, TINY
from modelscope_t2v.tools.make_random_model import write_model_dir

E4M3_MAX = 448.0
GEMM_SHAPES = [   # (rows, in, out) of the guided step's GEMMs at the four resolutions
    (32768, 320, 2560), (32768, 1280, 320), (32768, 320, 960), (8192, 640, 5120), (8192, 2560, 640),
    (2048, 1280, 10240), (2048, 5120, 1280), (2048, 1280, 1280), (512, 1280, 1280)]


def row_scales(t: torch.Tensor) -> torch.Tensor:
    """(..., k) -> (..., 1) float32: each row's largest |value| / 448."""
    return t.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX


def to_e4m3(t: torch.Tensor) -> torch.Tensor:
    """t rounded row by row to float8 e4m3 (scaled to each row's largest |value|), back in t's dtype."""
    scale = row_scales(t)
    return ((t.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(t.dtype)


@contextlib.contextmanager
def fp8_linear():
    """F.linear with its input and weight rounded to e4m3 row by row, while inside."""
    plain = F.linear
    F.linear = lambda x, weight, bias=None: plain(to_e4m3(x), to_e4m3(weight), bias)
    try:
        yield
    finally:
        F.linear = plain


def with_fp8_gemms(unet):
    """unet whose forward runs under fp8_linear (the text encoder and decoder keep theirs)."""
    forward = unet.forward

    def fp8_forward(*args, **kwargs):
        with fp8_linear():
            return forward(*args, **kwargs)
    unet.forward = fp8_forward
    return unet


def frames(model_dir, dtype, fp8=False):
    """uint8 frames of the default generation (DDIM 50, guidance 9, seed 0) on the channels-last path."""
    engine = TextToVideo.from_pretrained(model_dir, dtype=dtype)
    engine.unet.to_channels_last()
    if fp8:
        with_fp8_gemms(engine.unet)
    request = parse_request({'text': 'a panda eating bamboo on a rock', 'seed': 0}, engine.config,
                            output_type='frames')
    return engine(request).frames[0]


def gemm_speeds():
    """Print fp16 and row-wise FP8 TFLOP/s for GEMM_SHAPES."""
    from triton.testing import do_bench
    for rows, k, n in GEMM_SHAPES:
        a = torch.randn(rows, k, device='cuda', dtype=torch.float16)
        w = torch.randn(n, k, device='cuda', dtype=torch.float16) / k ** 0.5
        a8, w8 = (a / row_scales(a)).to(torch.float8_e4m3fn), (w / row_scales(w)).to(torch.float8_e4m3fn)
        sa, sw = row_scales(a), row_scales(w).t()
        flop = 2 * rows * k * n
        half = do_bench(lambda: torch.mm(a, w.t()))
        fp8 = do_bench(lambda: torch._scaled_mm(a8, w8.t(), sa, sw, out_dtype=torch.bfloat16))
        print(f'  ({rows:5d} x {k:5d}) @ ({k:5d} x {n:5d})  fp16 {flop / half / 1e9:5.0f} TFLOP/s  '
              f'fp8 row-wise {flop / fp8 / 1e9:5.0f} TFLOP/s  ({half * 1e3:6.1f} -> {fp8 * 1e3:6.1f} us)', flush=True)


def main():
    cfg = TINY if 'tiny' in sys.argv else FULL
    half = torch.float16 if torch.cuda.is_available() else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(os.path.join(tmp, 'model'), cfg)
        reference = frames(model_dir, torch.float32)
        again = frames(model_dir, torch.float32)
        print(f'{"float32 against itself":28} PSNR {psnr(again, reference):6.1f} dB', flush=True)
        print(f'{"fp16" if half == torch.float16 else "float32":28} PSNR '
              f'{psnr(frames(model_dir, half), reference):6.1f} dB', flush=True)
        print(f'{"+ FP8 e4m3 row-wise GEMMs":28} PSNR {psnr(frames(model_dir, half, fp8=True), reference):6.1f} dB',
              flush=True)
    if torch.cuda.is_available():
        gemm_speeds()


if __name__ == '__main__':
    torch.set_grad_enabled(False)
    main()
