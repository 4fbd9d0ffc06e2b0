"""Experiment: does torch.compiler.nested_compile_region on the repeated UNet blocks shorten the cold compile?

    python bench/nested_regions_cold_compile.py plain|nested    (a fresh TORCHINDUCTOR_CACHE_DIR for each)

The UNet of the real structure (4 levels, 2 ResBlocks each, attention at 3) at width 32 on the CPU, channels-last,
compiled with the package's 'default' options; prints the first call's seconds, dynamo's and inductor's main
timers, and the largest difference from eager. 2026-12-04 on the project's 2-core CPU machine: plain 183.8 s
(tracing 43.5, compile_fx_inner 120.2), nested 157.7 s (tracing 51.1, compile_fx_inner 88.8); both within 6e-6 of
eager. Decision (docs/benchmarks.md, Rejected): not the 3x a 60 s cold start needs.
"""
import sys
import time

import torch

from modelscope_t2v.config import UNetConfig
from modelscope_t2v.models import unet3d
from modelscope_t2v.text_to_video import compile_options

nested = sys.argv[1] == 'nested'
if nested:
    for block in (unet3d.ResBlock, unet3d.SpatialTransformer, unet3d.TemporalTransformer):
        block.forward = torch.compiler.nested_compile_region(block.forward)
torch.manual_seed(0)
unet = unet3d.UNet3D(UNetConfig(dim=32, context_dim=64, head_dim=8, num_heads=4)).eval().to_channels_last()
x, t = torch.randn(1, 4, 4, 16, 16), torch.tensor([500])
unet.remember_text(torch.randn(2, 77, 64))
with torch.no_grad():
    eager = unet(x, t)
    compiled = torch.compile(unet, options=compile_options('default'), dynamic=False)
    start = time.time()
    out = compiled(x, t)
    seconds = time.time() - start
from torch._dynamo.utils import compilation_time_metrics  # noqa: E402
timers = {k: round(sum(v), 1) for k, v in compilation_time_metrics.items()
          if k in ('bytecode_tracing', 'compile_fx_inner', 'GraphLowering.codegen', 'async_compile.wait')}
print(sys.argv[1], 'first call', round(seconds, 1), timers, 'max |difference|', (out - eager).abs().max().item())
