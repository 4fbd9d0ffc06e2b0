"""One guided UNet3D call and one step of the 50-step DDIM loop, eager and compiled, with the GPU kernels.

    python bench/step_timing.py            # GPU, real-size random UNet, fp16, 2 texts per video (guidance)
    python bench/step_timing.py tiny eager                         # CPU dry run
    python bench/step_timing.py reduce-overhead plain-geglu        # only the named variants, in this order
    python bench/step_timing.py --parallel reduce-overhead gemm-taps    # each variant compiled in its own process
                                                                        # at once, then timed one after another
    python bench/step_timing.py reduce-overhead --videos=2         # 2 videos a call (batched prompts)
    python bench/step_timing.py reduce-overhead --frames=24 --latents=72x40   # zeroscope 576w's shape

Variants: eager, cuda-graphs (a copy of the eager UNet replayed from CUDA graphs of its own kernels, as
from_pretrained's cuda_graphs=True: cuda_graphs.capture_calls), reduce-overhead (the package's compiled path).
The others are reduce-overhead with one of the package's choices undone, to measure it again (docs/decisions.md,
"Kept"): not-deterministic (inductor's default mode, which times several configs of each reduction
kernel), plain-geglu (each GEGLU as F.linear and a fused gelu-multiply, not models/geglu.py's kernel),
gemm-taps (each temporal conv as a GEMM into 3 co tap columns and a frame-shifted sum, not
models/frame_conv.py's kernel), residual-after-ff (each transformer block's last residual added by a kernel of
its own after the feed-forward's second GEMM, not by that GEMM), text-at-every-step (the texts' keys and values
projected at every step, not once per generation); or with a kernel's tile config from the environment:
geglu-config (GEGLU_CONFIG), frame-conv-config (FRAME_CONV_CONFIG); or option:KEY=VALUE, reduce-overhead with
one inductor option changed (VALUE a Python literal, e.g. option:triton.max_tiles=3). The variants of the
alternatives docs/decisions.md rejects are in git history.

Compiling a variant takes minutes of CPU; with --parallel every variant compiles at once in its own
process (its first-call seconds then count the others' load too), and the timings run one process
at a time, in the order given, with the GPU to themselves. With --compile-limit=S, a variant not compiled
after S seconds says so and ends, and the others are timed without it (some inductor options compile for
longer than a device call may run).

Prints per variant: first-call (compile) seconds, the guided eps's max |difference| / max |eager
eps|, ms per guided eps (one UNet call with two texts and guidance's combination), ms per loop step,
the host's ms per loop step (until the loop returns, the GPU not waited for) and the synchronising
calls in a loop, the host's ms for one call with the GPU idle, the GPU's ms per step along a 50-step
loop (CUDA events), and from torch.profiler of 3 loop steps: GPU kernel ms and launches per step, ms
per kind of kernel, the 12 costliest kernels, the kernels the memsets follow, and the GPU's idle
time.
With --kernels-dir=DIR, each variant's every kernel goes to DIR/kernels-<variant>.txt (ms and launches
per step). Dynamo's graph-break, recompile, CUDA-graph and performance-hint logs are on.
"""
import ast
import collections
import functools
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from copy import deepcopy

import torch

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')]
from measure import kernel_kind, sync, timed, write_kernel_table  # noqa: E402

import modelscope_t2v.models.unet3d as unet3d  # noqa: E402
from modelscope_t2v.config import FULL, TINY  # noqa: E402
from modelscope_t2v.cuda_graphs import capture_calls  # noqa: E402
from modelscope_t2v.sampling import denoise, guided  # noqa: E402
from modelscope_t2v.schedulers import make_scheduler  # noqa: E402
from modelscope_t2v.text_to_video import compile_options  # noqa: E402

torch._logging.set_logs(graph_breaks=True, recompiles=True, cudagraphs=True, perf_hints=True)
torch._dynamo.config.cache_size_limit = 64
torch.set_grad_enabled(False)   # inference, as the engine runs it (and freezing applies only without grad)
cfg = TINY if 'tiny' in sys.argv else FULL
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = torch.float16 if dev == 'cuda' else torch.float32
torch.manual_seed(0)
with torch.device(dev):
    unet = unet3d.UNet3D(cfg.unet).to(dtype).eval().requires_grad_(False)


def option(name):
    """The value of a --name=value argument, or None."""
    return next((arg.split('=', 1)[1] for arg in sys.argv if arg.startswith(f'--{name}=')), None)


# the shape of one call: --videos=N (N videos per UNet call, 2 N texts), --frames=F, --latents=WxH (576w: 72x40)
videos, frames = int(option('videos') or 1), int(option('frames') or 16)
width, height = map(int, (option('latents') or ('32x32' if cfg is FULL else '8x8')).split('x'))
x = torch.randn(videos, 4, frames, height, width, device=dev, dtype=dtype)
ctx, unc = torch.randn(2, videos, 77, cfg.unet.context_dim, device=dev, dtype=dtype)
t1 = torch.full((videos,), 981, device=dev)
START = time.perf_counter()


def wall(fn, n):
    """Mean seconds per call over n back-to-back calls."""
    return timed(lambda: [fn() for _ in range(n)])[1] / n


def report(name, eps_fn, reference):
    """eps_fn(x, t, context) -> guided eps: time its first call, compare it with `reference` (the eager
    guided eps), time calls and loop steps, and profile 3 steps."""
    t0 = time.perf_counter()
    eps_fn(x, t1, ctx)
    sync()
    first = time.perf_counter() - t0
    error = ((eps_fn(x, t1, ctx).float() - reference).abs().max() / reference.abs().max()).item()
    wait_for_turn()
    for _ in range(3):
        eps_fn(x, t1, ctx)
    eps = wall(lambda: eps_fn(x, t1, ctx), 20)
    loop = functools.partial(ddim_loop, eps_fn, 50)
    loop()
    per_step = wall(loop, 2) / 50
    print(f'{name:40} first {first:7.1f} s  rel diff {error:.1e}  guided eps {eps * 1e3:6.2f} ms '
          f'({eps * 1e3 / videos:6.2f} a video)  '
          f'loop/step {per_step * 1e3:6.2f} ms  '
          f'(t={time.perf_counter() - START:.0f} s)', flush=True)
    if dev != 'cuda':
        return
    print_host_waits(eps_fn)
    print_step_times(eps_fn)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ddim_loop(eps_fn, 3)
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print_kernel_summary(kernels, steps=3)
    if option('kernels-dir'):
        write_kernel_table(kernels, 3, pathlib.Path(option('kernels-dir'), f'kernels-{name}.txt'))


def ddim_loop(eps_fn, steps):
    """The package's denoising loop, DDIM, from x."""
    return denoise(eps_fn, x, ctx, make_scheduler('ddim', cfg.diffusion), steps)


def print_host_waits(eps_fn):
    """Whether the host waits for the GPU in the loop: the seconds until the loop returns (close to
    the GPU's only if something waits), the synchronising calls torch's sync debug mode reports, and
    the host's costliest CUDA runtime calls in a profiled 10-step loop."""
    sync()
    t0 = time.perf_counter()
    ddim_loop(eps_fn, 50)
    host = time.perf_counter() - t0
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        ddim_loop(eps_fn, 50)
        torch.cuda.set_sync_debug_mode('default')
    waits = collections.Counter(str(w.message)[:70] for w in caught)
    print(f'   host ms per loop step {host / 50 * 1e3:.2f}; synchronising calls in a loop: {waits.most_common(3)}')
    steps = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        ddim_loop(eps_fn, steps)
        sync()
    runtime = collections.defaultdict(list)   # the host's CUDA runtime and driver calls: where it blocks
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith('cu'):
            runtime[event.name].append(event.time_range.elapsed_us())
    top = sorted(runtime.items(), key=lambda item: -sum(item[1]))[:6]
    print('   host CUDA calls per loop step (ms, count):',
          [(name, round(sum(us) / steps / 1e3, 2), len(us) // steps) for name, us in top])


def print_step_times(eps_fn):
    """Where a loop's fixed cost goes: the host's ms for one guided eps call with the GPU idle (all
    of it exposed when it starts a loop), then the GPU's time per step across one 50-step loop from
    CUDA events before each call and after each step. The events before the first call measure the
    host's set-up; a slow first step is a fixed cost per generation; a rise along the loop is the GPU
    slowing down (clocks under its power limit)."""
    host = []
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        eps_fn(x, t1, ctx)
        host.append(time.perf_counter() - t0)
    sync()
    print(f'   host ms per guided eps call, GPU idle: median {sorted(host)[5] * 1e3:.2f}, min {min(host) * 1e3:.2f}')
    event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    start, befores, ends = event(), [], []

    def eps_after_event(*args):
        befores.append(event())
        befores[-1].record()
        return eps_fn(*args)

    def record(step, timestep, latents):
        ends.append(event())
        ends[-1].record()
    start.record()
    denoise(eps_after_event, x, ctx, make_scheduler('ddim', cfg.diffusion), 50, callback=record)
    sync()
    ms = [start.elapsed_time(ends[0])] + [a.elapsed_time(b) for a, b in zip(ends, ends[1:])]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f'   GPU ms per step in a 50-step loop: whole loop {start.elapsed_time(ends[-1]):.1f}, '
          f'to the first call {start.elapsed_time(befores[0]):.2f}, first step {ms[0]:.2f} '
          f'(its call to its end {befores[0].elapsed_time(ends[0]):.2f}), steps 2-10 {mean(ms[1:10]):.2f}, '
          f'11-25 {mean(ms[10:25]):.2f}, 26-40 {mean(ms[25:40]):.2f}, 41-50 {mean(ms[40:]):.2f}, '
          f'min {min(ms):.2f}, max {max(ms):.2f}')


def print_kernel_summary(kernels, steps):
    """Kernel ms per step by kind, the 12 costliest kernels, and the GPU's idle time between kernels."""
    busy = sum(k.time_range.elapsed_us() for k in kernels) / steps / 1e3
    print(f'   GPU kernel ms per step {busy:.2f}; launches per step {len(kernels) / steps:.0f}')
    by_kind, by_name = collections.defaultdict(list), collections.defaultdict(list)
    for k in kernels:
        by_kind[kernel_kind(k.name)].append(k.time_range.elapsed_us())
        by_name[k.name].append(k.time_range.elapsed_us())
    for kind, times in sorted(by_kind.items(), key=lambda item: -sum(item[1])):
        print(f'     {sum(times) / steps / 1e3:7.2f} ms  {len(times) // steps:5d}x  [{kind}]')
    for kernel, times in sorted(by_name.items(), key=lambda item: -sum(item[1]))[:12]:
        print(f'     {sum(times) / steps / 1e3:7.2f} ms  {len(times) // steps:5d}x  {kernel[:90]}')
    ordered = sorted(kernels, key=lambda k: k.time_range.start)
    before_memsets = collections.Counter(a.name[:60] for a, b in zip(ordered, ordered[1:]) if 'Memset' in b.name)
    print(f'   memsets per step follow: {[(name, n // steps) for name, n in before_memsets.most_common(4)]}')
    idle = [(b.time_range.start - a.time_range.end, a.name) for a, b in zip(ordered, ordered[1:])]
    span = (ordered[-1].time_range.end - ordered[0].time_range.start) / steps / 1e3
    small = sum(gap for gap, _ in idle if 0 < gap < 20) / steps / 1e3
    print(f'   GPU span per step {span:.2f} ms: idle {span - busy:.2f} ms, of which {small:.2f} ms in gaps < 20 us; '
          f'largest gaps (us, after): {[(round(gap), name[:40]) for gap, name in sorted(idle)[-6:]]}')


def compiled(**options):
    """The channels-last UNet compiled as the package compiles it (mode 'reduce-overhead'), with these
    inductor options changed."""
    return torch.compile(unet.to_channels_last(), dynamic=False,
                         options={**compile_options('reduce-overhead'), **options})


def eager_graphs():
    """A copy of the eager UNet (the variants after it keep the plain one) whose calls replay CUDA graphs."""
    copy = deepcopy(unet)
    capture_calls(copy)
    return guided_eps(copy)


def guided_eps(model):
    """Guidance around the model, outside its graph, the texts remembered: the package's loop
    (TextToVideo.guided_unet). Called as eps_fn(x, t, ctx), it leaves ctx, the same text, unused."""
    model.remember_text(torch.cat([unc, ctx]))
    eps = guided(model, 9.0)
    return lambda x, t, context: eps(x, t, None)


def text_at_every_step():
    """The package's compiled path given the texts at every step, each cross-attention projecting their keys
    and values again at each, not once (UNet3D.remember_text)."""
    eps, texts = guided(compiled(), 9.0), torch.cat([unc, ctx])
    return lambda x, t, context: eps(x, t, texts)


def plain_geglu():
    """The package's compiled path with each GEGLU as F.linear and gelu (inductor fuses the gelu-multiply),
    not as models/geglu.py's kernel. Changes models.geglu for the rest of the process: give it alone or
    with --parallel."""
    from modelscope_t2v.models import geglu
    geglu.kernel_serves = lambda x, weight: False
    return guided_eps(compiled())


def geglu_config():
    """The package's compiled path with the GEGLU kernel's tile config from GEGLU_CONFIG
    ('block_m,max_half,block_k,warps,stages,per_sm', the tile constants of models/geglu.py). Changes models.geglu
    for the rest of the process: give it alone or with --parallel."""
    from modelscope_t2v.models import geglu
    (geglu.BLOCK_M, geglu.MAX_HALF, geglu.BLOCK_K, geglu.WARPS, geglu.STAGES,
     geglu.PER_SM) = (int(v) for v in os.environ['GEGLU_CONFIG'].split(','))
    return guided_eps(compiled())


def temporal_conv_kernel(where):
    """The package's compiled path with the temporal-conv kernel (models/frame_conv.py) only on calls where
    `where(rows, taps)` holds; elsewhere the GEMM into 3 co tap columns and the frame-shifted sum, which
    inductor fuses into the GroupNorm after it. FRAME_CONV_CONFIG ('block_m,max_n,block_k,warps,stages',
    models/frame_conv.py's tile constants and k_loop) sets the kernel's tile config. Changes models.frame_conv
    for the rest of the process: give it alone or with --parallel."""
    from modelscope_t2v.models import frame_conv
    if 'FRAME_CONV_CONFIG' in os.environ:
        frame_conv.BLOCK_M, frame_conv.MAX_N, block_k, frame_conv.WARPS, stages = (
            int(v) for v in os.environ['FRAME_CONV_CONFIG'].split(','))
        frame_conv.k_loop = lambda c: (block_k, stages)
    serves = frame_conv.kernel_serves
    frame_conv.kernel_serves = lambda rows, taps: where(rows, taps) and serves(rows, taps)
    return guided_eps(compiled())


def residual_after_feed_forward():
    """The package's compiled path with each transformer block's last residual added after the feed-forward's
    second GEMM (F.linear, then + x), not by that GEMM (addmm with C = x + bias). Patches
    layers.FeedForward for the rest of the process: give it alone or with --parallel."""
    from modelscope_t2v.models import layers
    layers.FeedForward.forward = lambda self, x, residual: self.net(x) + residual
    return guided_eps(compiled())


VARIANTS = {   # name -> a maker of eps_fn(x, t, context), the guided eps
    'eager': lambda: guided_eps(unet),
    'cuda-graphs': eager_graphs,
    'reduce-overhead': lambda: guided_eps(compiled()),
    'not-deterministic': lambda: guided_eps(compiled(deterministic=False)),
    'plain-geglu': plain_geglu,
    'geglu-config': geglu_config,
    'gemm-taps': lambda: temporal_conv_kernel(lambda rows, taps: False),
    'frame-conv-config': lambda: temporal_conv_kernel(lambda rows, taps: True),
    'residual-after-ff': residual_after_feed_forward,
    'text-at-every-step': text_at_every_step,
}


def variant(name):
    """The maker of the named variant's eps_fn: one of VARIANTS, or option:KEY=VALUE."""
    if not name.startswith('option:'):
        return VARIANTS[name]
    key, value = name.removeprefix('option:').split('=', 1)
    return lambda: guided_eps(compiled(**{key: ast.literal_eval(value)}))


def wait_for_turn():
    """In a --parallel child: say this variant is compiled, then wait for every variant compiled and the one
    before this one timed, so that each times with the GPU and the CPU to itself."""
    if option('turn') is None:
        return
    if compile_limit:
        compile_limit.cancel()
    turns, turn, count = pathlib.Path(option('turn-dir')), int(option('turn')), int(option('of'))
    (turns / f'compiled-{turn}').touch()
    while len(list(turns.glob('compiled-*'))) < count or (turn and not (turns / f'timed-{turn - 1}').exists()):
        time.sleep(0.5)


def give_up_compiling(name):
    """In a --parallel child whose variant is not compiled within --compile-limit: say so, let the others go
    on without it, and end."""
    print(f'{name:40} not compiled within {option("compile-limit")} s: not timed', flush=True)
    for marker in ('compiled', 'timed'):
        pathlib.Path(option('turn-dir'), f'{marker}-{option("turn")}').touch()
    os._exit(1)


def run_in_parallel(names):
    """One child process per variant; print their outputs in order once all have finished."""
    with tempfile.TemporaryDirectory() as turn_dir:
        logs = [pathlib.Path(turn_dir, f'log-{i}') for i in range(len(names))]
        shared = ('--kernels-dir=', '--videos=', '--frames=', '--latents=', '--compile-limit=')
        passed_on = [arg for arg in sys.argv if arg == 'tiny' or arg.startswith(shared)]
        children = [subprocess.Popen([sys.executable, __file__, name, *passed_on,
                                      f'--turn={i}', f'--of={len(names)}', f'--turn-dir={turn_dir}'],
                                     stdout=log.open('w'), stderr=subprocess.STDOUT)
                    for i, (name, log) in enumerate(zip(names, logs))]
        for child, log in zip(children, logs):
            child.wait()
            print(log.read_text(), flush=True)


chosen = ([name for name in sys.argv[1:] if name in VARIANTS or name.startswith('option:')]
          or ['eager', 'reduce-overhead'])
if '--parallel' in sys.argv:
    run_in_parallel(chosen)
else:
    compile_limit = None
    if option('turn') is not None and option('compile-limit'):
        compile_limit = threading.Timer(float(option('compile-limit')), give_up_compiling, chosen)
        compile_limit.daemon = True
        compile_limit.start()
    try:
        eager_eps = guided_eps(unet)(x, t1, ctx).float()   # before any variant changes the model or a setting
        for name in chosen:   # eager first: to_channels_last changes the model for the variants after it
            report(name, variant(name)(), eager_eps)
    finally:   # a --parallel child that failed lets the others go on
        if option('turn') is not None:
            for marker in ('compiled', 'timed'):
                pathlib.Path(option('turn-dir'), f'{marker}-{option("turn")}').touch()
