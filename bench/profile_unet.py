"""Time variants of one UNet3D forward (real size, fp16, batch 2, 16 frames, 32x32 latents).

    python bench/profile_unet.py --out-dir $OUT [--variants LIST] [--budget SECONDS]
    python bench/profile_unet.py --size tiny --dtype float32 --no-compile   # CPU dry run

Each variant is a '+'-joined set of flags applied to a fresh copy of one
random-weight model (parameter shapes and values unchanged, code swapped by
replacing module classes inside this script; no package file is touched):

  cl        model and input in channels_last (4D) / channels_last_3d (5D weights)
  owngn     every GroupNorm by a layout-keeping one (var_mean + addcmul): no NCHW copy
  tconv2d   TemporalConv's Conv3d(3,1,1) as Conv2d (3,1) on 'b c f (h w)' (weight.view)
  tgemm     TemporalConv as ONE GEMM x @ [W0;W1;W2]^T (no pad, no copy; any layout)
            followed by a frame-shifted sum Y0[t-1] + Y1[t] + Y2[t+1]
            (its GroupNorms are layout-keeping too)
  kv        cross-attention K/V once per video: queries of all frames of a video
            in one sequence against the un-repeated 77 context tokens
  bench     torch.backends.cudnn.benchmark = True (off otherwise, as in the package)
  sdpa=B    attention through backend B only (cudnn, flash, efficient, math; 'auto':
            the one whose total over this model's attention shapes was least in the
            SDPA table measured first in the same run; skipped when that is the default)
  compile   torch.compile(mode='default', dynamic=False)
  regional  compile each ResBlock / SpatialTransformer / TemporalTransformer alone
  cdt, freeze, c1x1, mm   inductor knobs: coordinate_descent_tuning, freezing,
            conv_1x1_as_mm, max_autotune_gemm (only with compile)

Every variant is timed as called (do_bench median: CPU launch overhead included)
and as a replayed CUDA graph of the same call ('graph ms': the GPU-bound time, what
mode='reduce-overhead' or a captured denoising step would give).
Every variant is checked against the eager output of the same input
(max |out - ref| / max |ref| < 1e-2, else marked FAIL). Results go to
OUT/profile.json after every variant, kernel tables of profiled variants to
OUT/kernels.txt; the last lines printed are the table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from modelscope_t2v.config import FULL, TINY  # noqa: E402
from modelscope_t2v.models.unet3d import (ResBlock, SpatialTransformer, TemporalConv,  # noqa: E402
                                          TemporalTransformer, UNet3D)

T0 = time.perf_counter()
DEFAULT_VARIANTS = ','.join([
    'eager', 'cl', 'kv', 'tgemm+kv', 'cl+owngn+tgemm+kv', 'cl+tconv2d', 'eager',
    'compile+cl+tgemm+kv', 'compile+cl+tgemm+kv+sdpa=auto', 'compile',
])
PROFILE_EAGER = ('eager', 'cl+owngn+tgemm+kv')
SDPA_BACKENDS = ('cudnn', 'flash', 'efficient', 'math')


# -- replacement modules (same parameters, other code) --------------------------------------------

def group_norm_keep_layout(x: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm over dims 1.. of x in x's own memory layout (native CUDA GroupNorm copies to NCHW)."""
    b, c = x.shape[:2]
    g = gn.num_groups
    xg = x.unflatten(1, (g, c // g))
    dims = tuple(range(2, xg.dim()))
    var, mean = torch.var_mean(xg, dim=dims, keepdim=True, correction=0)   # fp32 accumulation
    rstd = torch.rsqrt(var.float() + gn.eps)                                # (b, g, 1, ...)
    shape = (b, c) + (1,) * (x.dim() - 2)
    w = gn.weight.float().view(g, c // g)
    scale = (rstd.view(b, g, 1) * w).reshape(shape)
    shift = (gn.bias.float().view(g, c // g) - mean.float().view(b, g, 1) * scale.view(b, g, c // g))
    return torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.to(x.dtype))


class LayoutGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return group_norm_keep_layout(x, self)


def temporal_gemm(y: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """Conv3d (3,1,1), padding (1,0,0), as one GEMM and a frame-shifted sum; y: (b, c, f, h, w)."""
    b, c, f, h, w = y.shape
    wall = conv.wall                                      # (3 co, ci), row k*co + o = W[o, :, k]
    co = wall.shape[0] // 3
    if y.stride(1) == 1:                                  # channels last: memory (b f h w c)
        big = F.linear(y.permute(0, 2, 3, 4, 1), wall)    # (b, f, h, w, 3co): one mm, no copy
        big = big.view(b, f, h, w, 3, co)
        out = big[..., 1, :] + conv.bias
        out[:, 1:] += big[:, :-1, ..., 0, :]
        out[:, :-1] += big[:, 1:, ..., 2, :]
        return out.permute(0, 4, 1, 2, 3)
    xf = y.transpose(1, 2).reshape(b * f, c, h * w)       # a view when memory is (b f) c h w
    big = torch.matmul(wall, xf).view(b, f, 3, co, h * w)
    out = big[:, :, 1] + conv.bias[:, None]
    out[:, 1:] += big[:, :-1, 0]
    out[:, :-1] += big[:, 1:, 2]
    return out.view(b, f, co, h, w).transpose(1, 2)


def temporal_conv2d(y: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """Conv3d (3,1,1) as Conv2d (3,1) on 'b c f (h w)'."""
    b, c, f, h, w = y.shape
    out = F.conv2d(y.reshape(b, c, f, h * w), conv.weight.view(*conv.weight.shape[:3], 1), conv.bias,
                   padding=(1, 0))
    return out.view(b, -1, f, h, w)


class FastTemporalConv(TemporalConv):
    """TemporalConv with the (3,1,1) convolution computed as `self.mode` says."""
    mode = 'gemm'

    def forward(self, x):
        h = x
        for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
            gn, conv = stage[0], stage[-1]
            h = gn(h) if isinstance(gn, LayoutGroupNorm) or self.mode != 'gemm' else group_norm_keep_layout(h, gn)
            h = F.silu(h)
            h = temporal_gemm(h, conv) if self.mode == 'gemm' else temporal_conv2d(h, conv)
        return x + h


def cross_attention_per_video(attn, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
    """attn(x, context repeated per frame) with K/V of the un-repeated context: x (b f, l, dim)."""
    n, l, _ = x.shape
    b = n // frames
    heads = attn.heads
    q = attn.to_q(x).view(b, frames * l, heads, -1).transpose(1, 2)
    k = attn.to_k(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
    v = attn.to_v(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)         # (b, heads, f l, d)
    return attn.to_out(out.transpose(1, 2).reshape(n, l, -1))


class KVOnceSpatialTransformer(SpatialTransformer):
    def forward(self, x, cond):
        h, w = x.shape[-2:]
        context = cond.context[::cond.frames]             # UNet3D repeat_interleaves it per frame
        y = self.proj_in(rearrange(self.norm(x), 'n c h w -> n (h w) c'))
        for blk in self.transformer_blocks:
            y = blk.attn1(blk.norm1(y)) + y
            y = cross_attention_per_video(blk.attn2, blk.norm2(y), context, cond.frames) + y
            y = blk.ff(blk.norm3(y), y)
        return x + rearrange(self.proj_out(y), 'n (h w) c -> n c h w', h=h, w=w)


# -- building and transforming models ---------------------------------------------------------------

def build_model(cfg, device, dtype, seed=0) -> UNet3D:
    """Random UNet3D, weights ~ N(0, 1/fan_in), norms ~ 1 (as tools.make_random_model), built on device."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = UNet3D(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0 if name.endswith('weight') else 0.0, 0.02)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model.to(dtype).eval().requires_grad_(False)


def to_channels_last(model: nn.Module) -> None:
    for p in list(model.parameters()) + list(model.buffers()):
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        elif p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)


def make_variant(base: UNet3D, flags: set) -> UNet3D:
    model = copy.deepcopy(base)
    if 'cl' in flags:
        to_channels_last(model)
    for m in model.modules():
        if 'owngn' in flags and type(m) is nn.GroupNorm:
            m.__class__ = LayoutGroupNorm
        if type(m) is TemporalConv and flags & {'tgemm', 'tconv2d'}:
            m.__class__ = FastTemporalConv
            m.mode = 'gemm' if 'tgemm' in flags else 'conv2d'
            for stage in (m.conv1, m.conv2, m.conv3, m.conv4):
                conv = stage[-1]
                w = conv.weight[:, :, :, 0, 0]                          # (co, ci, 3)
                conv.wall = w.permute(2, 0, 1).reshape(-1, w.shape[1]).contiguous()
        if type(m) is SpatialTransformer and 'kv' in flags:
            m.__class__ = KVOnceSpatialTransformer
    return model


INDUCTOR_KNOBS = {'cdt': {'coordinate_descent_tuning': True}, 'freeze': {'freezing': True},
                  'c1x1': {'conv_1x1_as_mm': True}, 'mm': {'max_autotune_gemm': True}}


def compile_model(model: nn.Module, flags: set):
    if 'regional' in flags:
        for name in ('cache_size_limit', 'recompile_limit', 'accumulated_cache_size_limit',
                     'accumulated_recompile_limit'):
            try:
                setattr(torch._dynamo.config, name, 256)
            except Exception:
                pass
        for m in model.modules():
            if isinstance(m, (ResBlock, SpatialTransformer, TemporalTransformer)):
                m.compile(dynamic=False)
        return model
    return torch.compile(model, mode='default', dynamic=False)


# -- measuring -------------------------------------------------------------------------------------

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_ms(fn, device, rep_ms=600) -> tuple:
    """(median ms, spread of the middle half in ms) of fn()."""
    if device.type == 'cuda':
        from triton.testing import do_bench
        q = do_bench(fn, warmup=100, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return q[1], q[2] - q[0]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), max(times) - min(times)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (out.float() - ref.float())
    return {'max_rel_err': float(d.abs().max() / ref.float().abs().max()),
            'norm_rel_err': float(d.norm() / ref.float().norm()),
            'finite': bool(torch.isfinite(out).all())}


def categorise(name: str) -> str:
    n = name.lower()
    if 'nchwtonhwc' in n or 'nhwctonchw' in n or 'layout' in n:
        return 'layout conversion'
    if 'flash' in n or 'fmha' in n or 'attention' in n or 'sdpa' in n:
        return 'attention (SDPA)'
    if 'conv' in n or 'fprop' in n or 'dgrad' in n or 'implicit' in n or 'winograd' in n:
        return 'convolution'
    if 'gemm' in n or 'nvjet' in n or 'cutlass' in n or 'sm90_xmma' in n or 'cublas' in n or 'matmul' in n:
        return 'gemm'
    if 'group_norm' in n or 'groupnorm' in n or 'rowwisemoments' in n or 'compute_mean' in n:
        return 'group norm'
    if n.startswith('triton_') or 'triton' in n:
        return 'triton (fused)'
    return 'other elementwise/reduction'


def kernel_profile(fn, device, path: str, name: str, top: int = 25) -> dict:
    """GPU kernels of one fn() call: totals by category and the `top` heaviest, appended to path."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    fn()
    sync(device)
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            rows.append((e.key, e.count, e.self_device_time_total / 1e3))   # ms
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows) or float('nan')
    cats = {}
    for kname, count, ms in rows:
        c = categorise(kname)
        cats[c] = cats.get(c, 0.0) + ms
    lines = [f'GPU kernel time of one forward: {total:.2f} ms in {sum(r[1] for r in rows)} launches',
             'by category: ' + ', '.join(f'{c} {ms:.2f} ms ({ms / total:.0%})'
                                          for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])),
             f"{'kernel':100} {'calls':>6} {'ms':>8} {'share':>6}"]
    for kname, count, ms in rows:
        lines.append(f'{kname[:100]:100} {count:6d} {ms:8.3f} {ms / total:6.1%}')
    with open(path, 'a') as f:
        f.write(f'=== {name}\n' + '\n'.join(lines) + '\n\n')
    return {'kernel_ms': total, 'launches': sum(r[1] for r in rows), 'categories_ms': cats,
            'table': '\n'.join(lines[:3 + top])}


def make_fn(model, xin, t, context, backend=None):
    def fn():
        with torch.no_grad():
            if backend is None:
                return model(xin, t, context)
            from torch.nn.attention import sdpa_kernel
            with sdpa_kernel([sdpa_backend(backend)]):
                return model(xin, t, context)
    return fn


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {'cudnn': SDPBackend.CUDNN_ATTENTION, 'flash': SDPBackend.FLASH_ATTENTION,
            'efficient': SDPBackend.EFFICIENT_ATTENTION, 'math': SDPBackend.MATH}[name]


def graph_time(fn, ref, device, rep_ms) -> tuple:
    """(median ms of replaying fn() captured in a CUDA graph, max rel err of the graph's output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    out.fill_(float('nan'))          # poison: the replay must write every element
    graph.replay()
    sync(device)
    err = errors(out, ref)
    if not err['finite']:
        raise RuntimeError('graph replay left non-finite values')
    ms = time_ms(graph.replay, device, rep_ms)[0]
    del graph, out
    return ms, err['max_rel_err']


def sdpa_bench(base, x, t, context, device) -> dict:
    """Every attention call of one forward (plain and with K/V once per video), timed per backend."""
    calls = {}
    original = F.scaled_dot_product_attention

    def record(tag):
        def spy(q, k, v, *args, **kwargs):
            key = (tuple(q.shape), tuple(q.stride()), tuple(k.shape), tuple(k.stride()),
                   tuple(v.shape), tuple(v.stride()))
            entry = calls.setdefault(key, {'base': 0, 'kv': 0})
            entry[tag] += 1
            return original(q, k, v, *args, **kwargs)
        return spy

    kv_model = make_variant(base, {'kv'})
    try:
        with torch.no_grad():
            F.scaled_dot_product_attention = record('base')
            base(x, t, context)
            F.scaled_dot_product_attention = record('kv')
            kv_model(x, t, context)
    finally:
        F.scaled_dot_product_attention = original
    del kv_model
    from torch.nn.attention import sdpa_kernel
    rows = []
    for (qs, qst, ks, kst, vs, vst), counts in calls.items():
        q, k, v = (torch.empty_strided(s, st, device=device, dtype=x.dtype).normal_()
                   for s, st in ((qs, qst), (ks, kst), (vs, vst)))
        times = {}
        for name in SDPA_BACKENDS:
            try:
                with sdpa_kernel([sdpa_backend(name)]):
                    F.scaled_dot_product_attention(q, k, v)
                    times[name] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, 40)[0]
            except Exception:  # a backend that does not support this shape
                times[name] = None
        flops = 4 * qs[0] * qs[1] * qs[2] * ks[2] * qs[3]
        rows.append({'q': qs, 'k': ks, 'q_stride': qst, 'count_base': counts['base'], 'count_kv': counts['kv'],
                     'gflop': flops / 1e9, 'ms': times})
    totals = {}
    for tag in ('base', 'kv'):
        for name in SDPA_BACKENDS:
            used = [r for r in rows if r['count_' + tag]]
            ok = all(r['ms'][name] is not None for r in used)
            totals[f'{tag}:{name}'] = sum(r['ms'][name] * r['count_' + tag] for r in used) if ok else None
        totals[f'{tag}:best_per_shape'] = sum(min(v for v in r['ms'].values() if v is not None) * r['count_' + tag]
                                              for r in rows if r['count_' + tag])
    candidates = {n: totals[f'kv:{n}'] for n in SDPA_BACKENDS if totals[f'kv:{n}'] is not None}
    best = min(candidates, key=candidates.get) if candidates else None
    # torch 2.11 on an H200 dispatches these fp16 calls to cudnn (kernel names in the profiles)
    return {'rows': rows, 'totals_ms': totals, 'best_backend': best, 'default_backend': 'cudnn'}


def print_sdpa(sdpa: dict) -> None:
    print("\nSDPA per call shape (ms per call; counts per forward plain / with kv-once)")
    print(f"{'q (n,h,l,d)':24} {'k':22} {'base':>4} {'kv':>3} {'GFLOP':>7} " +
          ' '.join(f'{n:>9}' for n in SDPA_BACKENDS))
    for r in sdpa['rows']:
        cells = ' '.join(f"{r['ms'][n]:9.4f}" if r['ms'][n] is not None else f"{'n/a':>9}" for n in SDPA_BACKENDS)
        print(f"{str(r['q']):24} {str(r['k']):22} {r['count_base']:4d} {r['count_kv']:3d} {r['gflop']:7.2f} {cells}")
    print('totals per forward (ms):', {k: (round(v, 3) if v is not None else None)
                                      for k, v in sdpa['totals_ms'].items()})
    print('best single backend (kv-once shapes):', sdpa['best_backend'], flush=True)


# -- the run ---------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out-dir', default=os.environ.get('OUT', '.'))
    parser.add_argument('--size', choices=['full', 'tiny'], default='full')
    parser.add_argument('--dtype', choices=['float16', 'bfloat16', 'float32'], default='float16')
    parser.add_argument('--variants', default=DEFAULT_VARIANTS)
    parser.add_argument('--no-compile', action='store_true', help='skip every compiled variant')
    parser.add_argument('--budget', type=float, default=440.0,
                        help='seconds from start after which no new compiled variant is begun')
    parser.add_argument('--compile-estimate', type=float, default=130.0,
                        help='seconds a compiled variant is assumed to take before one was measured')
    parser.add_argument('--recompile-estimate', type=float, default=150.0,
                        help='cap on the estimate for later compiled variants (kernel caches are warm by then)')
    parser.add_argument('--rep-ms', type=float, default=600.0)
    args = parser.parse_args(argv)

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dtype = getattr(torch, args.dtype)
    cfg = FULL.unet if args.size == 'full' else TINY.unet
    frames, side = 16, (32 if args.size == 'full' else 8)
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, 'profile.json')

    results = {'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
               'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d %H:%M:%S'),
               'command': ' '.join(['bench/profile_unet.py'] + (argv if argv is not None else sys.argv[1:])),
               'shape': {'x': [2, cfg.in_dim, frames, side, side], 'context': [2, 77, cfg.context_dim],
                         'dtype': args.dtype, 'size': args.size},
               'rows': []}

    def save():
        with open(json_path, 'w') as f:
            json.dump(results, f, indent=2)

    base, seconds = None, time.perf_counter()
    base = build_model(cfg, device, dtype)
    sync(device)
    results['build_s'] = time.perf_counter() - seconds
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, cfg.in_dim, frames, side, side, device=device, dtype=dtype, generator=gen)
    context = torch.randn(2, 77, cfg.context_dim, device=device, dtype=dtype, generator=gen)
    t = torch.tensor([981, 981], device=device)

    with torch.device('meta'):
        meta = UNet3D(cfg).to(dtype)
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(x.to('meta'), t.to('meta'), context.to('meta'))
    del meta
    results['tflop_per_forward'] = counter.get_total_flops() / 1e12
    if device.type == 'cuda':
        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        b = torch.randn(8192, 8192, device=device, dtype=dtype)
        results['matmul_tflops'] = 2 * 8192 ** 3 / time_ms(lambda: a @ b, device, 300)[0] / 1e9
        del a, b
        results['floor_ms'] = results['tflop_per_forward'] / results['matmul_tflops'] * 1e3
    print(json.dumps({k: v for k, v in results.items() if k != 'rows'}), flush=True)

    with torch.no_grad():
        ref = base(x, t, context).clone()
    sync(device)
    results['ref_abs_max'] = float(ref.float().abs().max())
    save()

    if device.type == 'cuda':
        try:
            results['sdpa'] = sdpa_bench(base, x, t, context, device)
            print_sdpa(results['sdpa'])
        except Exception as error:
            results['sdpa'] = {'error': f'{type(error).__name__}: {error}'}
            traceback.print_exc()
        save()

    compile_seen = []
    seen_names = {}
    pending_profiles = []   # (name, fn, row) profiled once no plain (non-graph) timing is left to spoil
    profiled_once = False
    for spec in filter(None, args.variants.split(',')):
        flags = set(spec.split('+'))
        compiled = bool(flags & {'compile', 'regional'})
        seen_names[spec] = seen_names.get(spec, 0) + 1
        name = spec if seen_names[spec] == 1 else f'{spec}#{seen_names[spec]}'
        row = {'variant': name, 'ms': None, 'spread_ms': None, 'compile_s': None}
        elapsed = time.perf_counter() - T0
        if compiled and args.no_compile:
            continue
        backend = next((f.split('=', 1)[1] for f in flags if f.startswith('sdpa=')), None)
        if backend == 'auto':
            backend = results.get('sdpa', {}).get('best_backend')
            if backend in (None, results.get('sdpa', {}).get('default_backend')):
                row['error'] = f'skipped: best SDPA backend is the default ({backend})'
                results['rows'].append(row)
                print(name, row['error'], flush=True)
                continue
            row['sdpa_backend'] = backend
        if compiled:
            estimate = (min(max(compile_seen) * 1.1, args.recompile_estimate) if compile_seen
                        else args.compile_estimate)
            if elapsed + estimate > args.budget:
                row['error'] = f'skipped: {elapsed:.0f} s + ~{estimate:.0f} s compile > budget {args.budget:.0f} s'
                results['rows'].append(row)
                print(name, row['error'], flush=True)
                save()
                continue
        model = fn = None
        torch.backends.cudnn.benchmark = 'bench' in flags
        row['after_profiler'] = profiled_once
        try:
            model = make_variant(base, flags)
            xin = x.contiguous(memory_format=torch.channels_last_3d) if 'cl' in flags else x
            if compiled:
                model = compile_model(model, flags)
            knobs = {}
            for flag in flags & set(INDUCTOR_KNOBS):
                knobs.update(INDUCTOR_KNOBS[flag])
            fn = make_fn(model, xin, t, context, backend)
            start = time.perf_counter()
            with torch._inductor.config.patch(knobs):
                out = fn()
                sync(device)
            row['first_call_s'] = time.perf_counter() - start
            if compiled:
                row['compile_s'] = row['first_call_s']
                compile_seen.append(row['first_call_s'])
            row.update(errors(out, ref))
            row['ok'] = row['finite'] and row['max_rel_err'] < 1e-2
            del out
            row['ms'], row['spread_ms'] = time_ms(fn, device, args.rep_ms)
            if 'tflop_per_forward' in results:
                row['tflops'] = results['tflop_per_forward'] / row['ms'] * 1e3
            if device.type == 'cuda':
                try:
                    row['graph_ms'], graph_err = graph_time(fn, ref, device, args.rep_ms)
                    row['graph_max_rel_err'] = graph_err
                except Exception as error:
                    row['graph_error'] = f'{type(error).__name__}: {error}'[:500]
                    traceback.print_exc()
            if device.type == 'cuda' and (compiled or name in PROFILE_EAGER):
                pending_profiles.append((name, fn, row))
        except Exception as error:  # keep going: one broken variant must not cost the others
            row['error'] = f'{type(error).__name__}: {error}'[:2000]
            traceback.print_exc()
        results['rows'].append(row)
        save()
        print(f"[{time.perf_counter() - T0:6.0f} s] {name:28} ms={row['ms']} graph_ms={row.get('graph_ms')} "
              f"compile_s={row['compile_s']} max_rel_err={row.get('max_rel_err')} {row.get('error', '')}", flush=True)
        del model, fn
        if compiled and pending_profiles:   # the profiler slows later launches: profile once plain timings are done
            for pname, pfn, prow in pending_profiles:
                try:
                    prof = kernel_profile(pfn, device, os.path.join(args.out_dir, 'kernels.txt'), pname)
                    prow['kernel_ms'], prow['launches'] = prof['kernel_ms'], prof['launches']
                    prow['categories_ms'] = prof['categories_ms']
                    prow['top_kernels'] = prof['table']
                    print(pname, prof['table'].split('\n', 2)[1], flush=True)
                except Exception:
                    traceback.print_exc()
            pending_profiles = []
            profiled_once = True
            save()
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()

    timed_rows = [r for r in results['rows'] if r.get('ms') is not None and r.get('ok')]
    compiled_rows = [r for r in timed_rows if 'top_kernels' in r and ('compile' in r['variant'] or 'regional' in r['variant'])]
    best = min(compiled_rows or [r for r in timed_rows if 'top_kernels' in r] or [None],
               key=lambda r: (r.get('graph_ms') or r['ms']) if r else 0)
    if best:
        results['profiled'] = best['variant']
        print(f"\nkernel profile of {best['variant']} (top 25; all kernels in kernels.txt):\n{best['top_kernels']}")
    eager_ms = min((r['ms'] for r in timed_rows if r['variant'].split('#')[0] == 'eager'), default=None)
    results['total_s'] = time.perf_counter() - T0
    save()
    print(f"\n{results['device']}, torch {results['torch']}, {results['date']}; "
          f"{results.get('tflop_per_forward', 0):.2f} TFLOP/forward; matmul ceiling "
          f"{results.get('matmul_tflops', float('nan')):.0f} TFLOP/s; floor {results.get('floor_ms', float('nan')):.1f} ms")
    print(f"{'variant':34} {'ms/fwd':>8} {'spread':>7} {'graph ms':>8} {'vs eager':>8} {'TFLOP/s':>8} "
          f"{'kernel ms':>9} {'compile s':>9} {'max rel err':>11} ok")
    for r in results['rows']:
        if r.get('ms') is None:
            print(f"{r['variant']:34} {'-':>8}  {r.get('error', '')[:90]}")
            continue
        speed = f"{eager_ms / r['ms']:7.2f}x" if eager_ms else f"{'':8}"
        comp = f"{r['compile_s']:9.0f}" if r['compile_s'] else f"{'-':>9}"
        kern = f"{r['kernel_ms']:9.2f}" if r.get('kernel_ms') else f"{'-':>9}"
        graph = f"{r['graph_ms']:8.2f}" if r.get('graph_ms') else f"{'-':>8}"
        flag = ' (timed after a profiler run)' if r.get('after_profiler') else ''
        print(f"{r['variant']:34} {r['ms']:8.2f} {r['spread_ms']:7.2f} {graph} {speed} {r.get('tflops', 0):8.0f} "
              f"{kern} {comp} {r['max_rel_err']:11.2e} {'ok' if r['ok'] else 'FAIL'}{flag}")


if __name__ == '__main__':
    main()
