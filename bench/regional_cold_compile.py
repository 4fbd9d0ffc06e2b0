"""Experiment: does compiling each repeated UNet block apart (regional compilation) shorten the cold compile?

    python bench/regional_cold_compile.py whole|regional    (a fresh TORCHINDUCTOR_CACHE_DIR for each)

The UNet of the real structure (4 levels, 2 ResBlocks each, attention at 3) at width 32 on the CPU, channels-last,
with the package's 'default' options: either torch.compile of the whole UNet, or each ResBlock, SpatialTransformer
and TemporalTransformer compiled apart (dynamo then compiles one graph per distinct block shape and reuses it for
the blocks of the same shape; the layers between them run eager). Prints the first and second call's seconds,
dynamo's and inductor's main timers, the graphs compiled and the largest difference from eager.

2026-12-05 on the project's 2-core CPU machine: whole 188.1 s (tracing 43.2, compile_fx_inner 125.1; 1 graph),
regional 127.2 s (tracing 22.7, compile_fx_inner 90.2; 25 graphs for 55 blocks); a call after compiling 0.100 s
whole against 0.124 s regional; both within 7e-6 of eager. Decision (docs/benchmarks.md, Rejected): 1.5x, not
the 3x a 60 s cold start needs, and the UNet's step would no longer be one CUDA graph.
"""
import sys
import time

import torch

from modelscope_t2v.config import UNetConfig
from modelscope_t2v.models import unet3d
from modelscope_t2v.text_to_video import compile_options

how = sys.argv[1]
torch.manual_seed(0)
unet = unet3d.UNet3D(UNetConfig(dim=32, context_dim=64, head_dim=8, num_heads=4)).eval().to_channels_last()
x, t = torch.randn(1, 4, 4, 16, 16), torch.tensor([500])
unet.remember_text(torch.randn(2, 77, 64))
torch._dynamo.config.recompile_limit = 64             # one graph per distinct block shape
torch._dynamo.config.accumulated_recompile_limit = 4096
with torch.no_grad():
    eager = unet(x, t)
    if how == 'whole':
        compiled = torch.compile(unet, options=compile_options('default'), dynamic=False)
    else:
        for module in unet.modules():
            if isinstance(module, (unet3d.ResBlock, unet3d.SpatialTransformer, unet3d.TemporalTransformer)):
                module.compile(options=compile_options('default'), dynamic=False)
        compiled = unet
    start = time.time()
    out = compiled(x, t)
    first = time.time() - start
    start = time.time()
    compiled(x, t)
    second = time.time() - start
from torch._dynamo.utils import compilation_time_metrics, counters  # noqa: E402
timers = {k: round(sum(v), 1) for k, v in compilation_time_metrics.items()
          if k in ('bytecode_tracing', 'compile_fx_inner', 'GraphLowering.codegen', 'async_compile.wait')}
print(how, 'first call', round(first, 1), 'second', round(second, 3), timers,
      'graphs', counters['stats']['unique_graphs'], 'max |difference|', (out - eager).abs().max().item())
