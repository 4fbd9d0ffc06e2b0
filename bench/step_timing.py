"""One guided UNet3D forward and one step of the 50-step DDIM loop, eager and compiled, with the top GPU kernels.

    python bench/step_timing.py            # GPU, real-size random UNet, fp16, 2 texts per video (guidance)
    python bench/step_timing.py tiny eager                         # CPU dry run
    python bench/step_timing.py reduce-overhead freezing           # only the named variants, in this order

Variants: eager, reduce-overhead (the package's compiled path), freezing (reduce-overhead with
inductor's freezing: weights as constants, Q/K/V products concatenated), freezing+cudnn-benchmark,
combo-kernels (inductor launches independent small kernels as one), max-autotune (inductor
picks each GEMM from cuBLAS and Triton templates).

Prints per variant: first-call (compile) seconds, ms per forward, ms per loop step, and from
torch.profiler the GPU kernel ms per step, launches per step and the 12 costliest kernels.
Dynamo's graph-break, recompile, CUDA-graph and performance-hint logs are on.
"""
import sys
import time

import torch
from measure import sync, timed

import modelscope_t2v.models.unet3d as unet3d
from modelscope_t2v.config import FULL, TINY
from modelscope_t2v.sampling import denoise, guided
from modelscope_t2v.schedulers import make_scheduler

torch._logging.set_logs(graph_breaks=True, recompiles=True, cudagraphs=True, perf_hints=True)
torch._dynamo.config.cache_size_limit = 64
torch.set_grad_enabled(False)   # inference, as the engine runs it (and freezing applies only without grad)
cfg = TINY if 'tiny' in sys.argv else FULL
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = torch.float16 if dev == 'cuda' else torch.float32
torch.manual_seed(0)
with torch.device(dev):
    unet = unet3d.UNet3D(cfg.unet).to(dtype).eval().requires_grad_(False)
lat = 32 if cfg is FULL else 8
x = torch.randn(1, 4, 16, lat, lat, device=dev, dtype=dtype)
ctx, unc = torch.randn(2, 1, 77, cfg.unet.context_dim, device=dev, dtype=dtype)
t1, c2 = torch.full((1,), 981, device=dev), torch.cat([unc, ctx])   # one video, two texts
START = time.perf_counter()


def wall(fn, n):
    """Mean seconds per call over n back-to-back calls."""
    return timed(lambda: [fn() for _ in range(n)])[1] / n


def report(name, model):
    t0 = time.perf_counter()
    model(x, t1, c2)
    sync()
    first = time.perf_counter() - t0
    for _ in range(3):
        model(x, t1, c2)
    fwd = wall(lambda: model(x, t1, c2), 20)
    loop = lambda: denoise(guided(model, 9.0, unc), x, ctx, make_scheduler('ddim', cfg.diffusion), 50)  # noqa: E731
    loop()
    per_step = wall(loop, 2) / 50
    print(f'{name:40} first {first:7.1f} s  forward {fwd * 1e3:6.2f} ms  loop/step {per_step * 1e3:6.2f} ms  '
          f'(t={time.perf_counter() - START:.0f} s)', flush=True)
    if dev != 'cuda':
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        denoise(guided(model, 9.0, unc), x, ctx, make_scheduler('ddim', cfg.diffusion), 3)
        sync()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / 3e3
    print(f'   GPU kernel ms per step {total:.2f}; launches per step {sum(e.count for e in events) / 3:.0f}')
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f'     {e.self_device_time_total / 3e3:7.2f} ms  {e.count // 3:5d}x  {e.key[:90]}')


def compiled(**options):
    """The channels-last UNet compiled with CUDA graphs (mode 'reduce-overhead') and these inductor options."""
    return torch.compile(unet.to_channels_last(), dynamic=False, options={'triton.cudagraphs': True, **options})


def with_cudnn_benchmark(make):
    torch.backends.cudnn.benchmark = True
    return make()


VARIANTS = {
    'eager': lambda: unet,
    'reduce-overhead': compiled,
    'freezing': lambda: compiled(freezing=True),
    'freezing+cudnn-benchmark': lambda: with_cudnn_benchmark(lambda: compiled(freezing=True)),
    'combo-kernels': lambda: compiled(combo_kernels=True),
    'max-autotune': lambda: compiled(max_autotune=True, max_autotune_gemm_backends='ATEN,TRITON',
                                     max_autotune_conv_backends='ATEN'),
}
chosen = [name for name in sys.argv[1:] if name in VARIANTS] or ['eager', 'reduce-overhead']
for name in chosen:   # eager first: to_channels_last changes the model for the variants after it
    report(name, VARIANTS[name]())
