"""GPU benchmark: this package against ModelScope's built-in classes and diffusers, in one process.

    python bench/benchmark.py --out results.json [--size full] [--runs 3] [--skip builtin,diffusers]

Builds a random-weight model dir of the real shapes (random weights do the same
arithmetic), then times on the same GPU, with medians over --runs:
  ours      TextToVideo per stage (text, denoise, decode, uint8, mp4) and end to end,
            eager and torch.compile'd, DDIM-50 and DPM++2M-25, peak memory, start-up;
  builtin   ModelScope's UNetSD / AutoencoderKL / GaussianDiffusion as its model runs
            them (fp32 weights under fp16 autocast, two UNet calls per step);
  diffusers UNet3DConditionModel + AutoencoderKL in fp16 with SDPA, batched guidance.
Also the FLOP count of the default generation, the measured fp16 matmul ceiling,
and the PSNR of the fast path's frames against the float32 path's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from einops import rearrange

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from modelscope_t2v import TextToVideo, parse_request  # noqa: E402
from modelscope_t2v.config import FULL, TINY  # noqa: E402
from modelscope_t2v.sampling import denoise, guided  # noqa: E402
from modelscope_t2v.schedulers import make_scheduler  # noqa: E402
from modelscope_t2v.text_to_video import to_uint8_frames  # noqa: E402
from modelscope_t2v.tools.make_random_model import write_model_dir  # noqa: E402

PROMPT = 'A panda eating bamboo on a rock.'
SEED = 42


# -- measuring ---------------------------------------------------------------------------

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
    """Peak allocated and reserved GPU memory while fn runs, in GiB."""
    if not torch.cuda.is_available():
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


def count_flops(engine: TextToVideo, frames: int, size: int) -> dict:
    """TFLOP of one UNet forward (batch 1) and one decode of `frames` frames."""
    from torch.utils.flop_counter import FlopCounterMode
    cell = engine.config.autoencoder.downsample
    x = torch.randn(1, 4, frames, size // cell, size // cell, device=engine.device, dtype=engine.dtype)
    context = torch.randn(1, 77, engine.config.unet.context_dim, device=engine.device, dtype=engine.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as unet_counter:
        engine.unet(x, torch.tensor([500], device=engine.device), context)
    with torch.no_grad(), FlopCounterMode(display=False) as vae_counter:
        engine.autoencoder.decode_video(x)
    return {'unet_forward': unet_counter.get_total_flops() / 1e12,
            'decode': vae_counter.get_total_flops() / 1e12}


def psnr(a, b) -> float:
    mse = ((a.astype('float64') - b.astype('float64')) ** 2).mean()
    return float('inf') if mse == 0 else float(10 * torch.log10(torch.tensor(255.0 ** 2 / mse)))


# -- this package ----------------------------------------------------------------------------

def warm_page_cache(model_dir: str) -> None:
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), 'rb') as f:
            while f.read(1 << 26):
                pass


def bench_ours(engine: TextToVideo, args, label: str) -> dict:
    """Per-stage and end-to-end times of the default generation, and DPM++2M at 25 steps."""
    request = parse_request({'text': PROMPT, 'seed': SEED}, engine.config, num_frames=args.frames,
                            height=args.size_px, width=args.size_px, output_type='frames')
    engine(parse_request({'text': PROMPT, 'seed': SEED}, engine.config, num_frames=args.frames,
                         height=args.size_px, width=args.size_px, output_type='frames',
                         num_inference_steps=2))  # warm-up (and compilation)
    stages = {}
    context, stages['text'] = timed(lambda: torch.cat([engine.encode_text([PROMPT]), engine.encode_text([''])]))
    noise = engine.initial_noise(request).to(engine.device, engine.dtype)
    model_fn = guided(engine.unet, 9.0, context[1:])
    run_denoise = lambda: denoise(model_fn, noise, context[:1], make_scheduler('ddim', engine.config.diffusion), 50)  # noqa: E731
    latents, _ = timed(run_denoise)
    stages['denoise'] = median_time(run_denoise, args.runs)
    stages['decode'] = median_time(lambda: engine.autoencoder.decode_video(latents), args.runs)
    video = engine.autoencoder.decode_video(latents)
    frames, stages['to_uint8'] = timed(lambda: to_uint8_frames(video)[0])
    stages['mp4'] = mp4_encode_time(frames)
    end_to_end = median_time(lambda: engine(request), args.runs)
    dpm = parse_request({'text': PROMPT, 'seed': SEED}, engine.config, num_frames=args.frames,
                        height=args.size_px, width=args.size_px, output_type='frames',
                        sampler='dpm++2m', num_inference_steps=25)
    return {'label': label, 'stages_s': stages, 'end_to_end_s': end_to_end,
            'dpm++2m_25_s': median_time(lambda: engine(dpm), args.runs),
            'peak_gib': peak_gib(lambda: engine(request)), 'frames': engine(request).frames[0]}


def mp4_encode_time(frames):
    try:
        from modelscope_t2v.video_io import write_video
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return None
    path = os.path.join(tempfile.mkdtemp(), 'bench.mp4')
    return timed(lambda: write_video(frames, path, fps=8))[1]


def profile_unet(engine: TextToVideo, args, path: str) -> None:
    """The GPU kernels of one guided (batch 2) UNet forward, heaviest first, written to `path`."""
    from torch.profiler import ProfilerActivity, profile
    cell = engine.config.autoencoder.downsample
    x = torch.randn(2, 4, args.frames, args.size_px // cell, args.size_px // cell, device=engine.device,
                    dtype=engine.dtype)
    context = torch.randn(2, 77, engine.config.unet.context_dim, device=engine.device, dtype=engine.dtype)
    t = torch.tensor([981, 981], device=engine.device)
    with torch.no_grad():
        engine.unet(x, t, context)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.unet(x, t, context)
            sync()
    table = prof.key_averages().table(sort_by='cuda_time_total', row_limit=40)
    with open(path, 'w') as f:
        f.write(table)
    print(table[:6000])


def compile_unet(engine: TextToVideo, mode: str, args) -> float:
    """torch.compile the UNet in place; returns the seconds of the first (compiling) call."""
    engine.unet = torch.compile(engine.unet, mode=mode, dynamic=False)
    cell = engine.config.autoencoder.downsample
    x = torch.randn(2, 4, args.frames, args.size_px // cell, args.size_px // cell, device=engine.device,
                    dtype=engine.dtype)
    context = torch.randn(2, 77, engine.config.unet.context_dim, device=engine.device, dtype=engine.dtype)
    t = torch.tensor([981, 981], device=engine.device)
    with torch.no_grad():
        return timed(lambda: engine.unet(x, t, context))[1]


# -- ModelScope's built-in classes --------------------------------------------------------

def bench_builtin(model_dir: str, engine: TextToVideo, args) -> dict:
    """UNetSD + GaussianDiffusion + AutoencoderKL run as TextToVideoSynthesis runs them."""
    from modelscope.models.multi_modal.video_synthesis.autoencoder import AutoencoderKL
    from modelscope.models.multi_modal.video_synthesis.diffusion import GaussianDiffusion, beta_schedule
    from modelscope.models.multi_modal.video_synthesis.unet_sd import UNetSD
    cfg, device = engine.config, engine.device
    u = cfg.unet
    unet = UNetSD(in_dim=u.in_dim, dim=u.dim, y_dim=u.y_dim, context_dim=u.context_dim, out_dim=u.out_dim,
                  dim_mult=list(u.dim_mult), num_heads=u.num_heads, head_dim=u.head_dim,
                  num_res_blocks=u.res_blocks, attn_scales=list(u.attn_scales), dropout=u.dropout,
                  temporal_attention=u.temporal_attention)
    unet.load_state_dict(torch.load(os.path.join(model_dir, cfg.ckpt_unet), weights_only=True), strict=True)
    unet = unet.eval().to(device)
    a = cfg.autoencoder
    ddconfig = dict(double_z=True, z_channels=a.z_channels, resolution=256, in_channels=3, out_ch=3,
                    ch=a.ch, ch_mult=list(a.ch_mult), num_res_blocks=a.res_blocks, attn_resolutions=[],
                    dropout=0.0)
    vae = AutoencoderKL(ddconfig, 4, os.path.join(model_dir, cfg.ckpt_autoencoder)).eval().to(device)
    d = cfg.diffusion
    diffusion = GaussianDiffusion(beta_schedule('linear_sd', d.num_timesteps, init_beta=d.beta_start,
                                                last_beta=d.beta_end),
                                  mean_type='eps', var_type='fixed_small', loss_type='mse')
    with torch.no_grad():
        context = torch.cat([engine.encode_text([PROMPT]), engine.encode_text([''])]).float()
    torch.manual_seed(SEED)
    cell = a.downsample
    noise = torch.randn(1, 4, args.frames, args.size_px // cell, args.size_px // cell).to(device)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == 'cuda')

    def generate():
        with torch.no_grad(), autocast:
            x0 = diffusion.ddim_sample_loop(noise=noise, model=unet,
                                            model_kwargs=[{'y': context[:1]}, {'y': context[1:]}],
                                            guide_scale=9.0, ddim_timesteps=50, eta=0.0)
            video = vae.decode(rearrange(x0 / a.scale_factor, 'b c f h w -> (b f) c h w'))
        return rearrange(video, '(b f) c h w -> b c f h w', b=1)

    generate()  # warm-up
    video, _ = timed(generate)
    result = {'label': 'ModelScope built-in (fp16 autocast)', 'end_to_end_s': median_time(generate, args.runs),
              'peak_gib': peak_gib(generate), 'frames': to_uint8_frames(video.float())[0],
              'note': 'denoise + decode; its text encoder fails on open_clip 3.x, so text is not timed'}
    return result


# -- diffusers ---------------------------------------------------------------------------------

def bench_diffusers(engine: TextToVideo, args) -> dict:
    """UNet3DConditionModel + AutoencoderKL of text-to-video-ms-1.7b's config, fp16, SDPA."""
    from diffusers import AutoencoderKL, UNet3DConditionModel
    device = engine.device
    u, a = engine.config.unet, engine.config.autoencoder
    widths = tuple(u.dim * m for m in u.dim_mult)
    unet = UNet3DConditionModel(
        sample_size=args.size_px // a.downsample, in_channels=u.in_dim, out_channels=u.out_dim,
        down_block_types=('CrossAttnDownBlock3D',) * (len(widths) - 1) + ('DownBlock3D',),
        up_block_types=('UpBlock3D',) + ('CrossAttnUpBlock3D',) * (len(widths) - 1),
        block_out_channels=widths, layers_per_block=u.res_blocks, cross_attention_dim=u.context_dim,
        attention_head_dim=u.head_dim, norm_num_groups=32).to(device, torch.float16).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=a.z_channels, layers_per_block=a.res_blocks,
        block_out_channels=tuple(a.ch * m for m in a.ch_mult),
        down_block_types=('DownEncoderBlock2D',) * len(a.ch_mult),
        up_block_types=('UpDecoderBlock2D',) * len(a.ch_mult)).to(device, torch.float16).eval()
    with torch.no_grad():
        context = torch.cat([engine.encode_text(['']), engine.encode_text([PROMPT])]).half()
    cell = a.downsample
    noise = torch.randn(1, 4, args.frames, args.size_px // cell, args.size_px // cell,
                        generator=torch.Generator().manual_seed(SEED)).to(device, torch.float16)

    def generate(sampler: str, steps: int):
        scheduler = make_scheduler(sampler, engine.config.diffusion)
        scheduler.set_timesteps(steps, device=device)
        x = noise * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:  # the loop of TextToVideoSDPipeline
                x_in = scheduler.scale_model_input(torch.cat([x] * 2), t)
                eps_u, eps_c = unet(x_in, t, encoder_hidden_states=context).sample.chunk(2)
                x = scheduler.step(eps_u + 9.0 * (eps_c - eps_u), t, x).prev_sample
            video = vae.decode(rearrange(x / a.scale_factor, 'b c f h w -> (b f) c h w')).sample
        return video

    generate('ddim', 2)  # warm-up
    result = {'label': 'diffusers UNet3DConditionModel (fp16, SDPA)',
              'end_to_end_s': median_time(lambda: generate('ddim', 50), args.runs),
              'dpm++2m_25_s': median_time(lambda: generate('dpm++2m', 25), args.runs),
              'peak_gib': peak_gib(lambda: generate('ddim', 50)),
              'note': 'denoise + decode with random weights of the same shapes; text not timed'}
    return result


# -- the run ------------------------------------------------------------------------------------

def print_table(results: dict) -> None:
    print(f"\nGPU: {results['device']}; torch {results['torch']}; "
          f"fp16 matmul ceiling {results['ceiling_tflops']:.0f} TFLOP/s; default generation "
          f"{results['flops']['generation']:.0f} TFLOP (floor {results['floor_s']:.2f} s)")
    print(f"{'implementation':52} {'DDIM-50 s':>9} {'DPM-25 s':>9} {'peak GiB':>9} {'vs floor':>8}")
    def cell(value, spec='9.3f'):
        return f"{'n/a':>9}" if value is None else format(value, spec)

    for row in results['rows']:
        print(f"{row['label']:52} {cell(row['end_to_end_s'])} {cell(row.get('dpm++2m_25_s'))} "
              f"{cell(row['peak_gib']['allocated'], '9.2f')} {results['floor_s'] / row['end_to_end_s']:8.0%}")
    for row in results['rows']:
        if 'stages_s' in row:
            print(row['label'], {k: (None if v is None else round(v, 4)) for k, v in row['stages_s'].items()})
    print('start-up from files (s):', results['startup_s'], '| compile warm-up (s):', results.get('compile_s'))
    print('PSNR of the fast path vs float32 (dB):', results.get('psnr_db'))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='bench-results.json')
    parser.add_argument('--size', choices=['full', 'tiny'], default='full')
    parser.add_argument('--model-dir', default=os.path.join(tempfile.gettempdir(), 'modelscope-t2v-bench'))
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--frames', type=int, default=16)
    parser.add_argument('--size-px', type=int, default=256)
    parser.add_argument('--skip', default='', help='comma list of: builtin, diffusers, compile, fp32')
    parser.add_argument('--compile-modes', default='max-autotune-no-cudagraphs,reduce-overhead',
                        help='torch.compile modes to time, comma separated')
    parser.add_argument('--profile', help='write a kernel profile of one UNet forward to this file')
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(',')))
    config = FULL if args.size == 'full' else TINY
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')

    if not os.path.exists(os.path.join(args.model_dir, 'configuration.json')):
        _, seconds = timed(lambda: write_model_dir(args.model_dir, config))
        print(f'wrote random {args.size} model to {args.model_dir} in {seconds:.1f} s', flush=True)
    warm_page_cache(args.model_dir)
    engine, startup = timed(lambda: TextToVideo.from_pretrained(args.model_dir, device=device))
    results = {'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
               'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d'), 'startup_s': startup,
               'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]), 'rows': []}
    results['ceiling_tflops'] = matmul_ceiling(device)
    flops = count_flops(engine, args.frames, args.size_px)
    flops['generation'] = 50 * 2 * flops['unet_forward'] + flops['decode']
    results['flops'] = flops
    results['floor_s'] = flops['generation'] / results['ceiling_tflops']
    print(json.dumps({k: results[k] for k in ('device', 'startup_s', 'ceiling_tflops', 'flops')}), flush=True)

    if args.profile:
        profile_unet(engine, args, args.profile)
    rows = results['rows']
    rows.append(bench_ours(engine, args, f'modelscope-t2v eager ({str(engine.dtype)[6:]})'))
    print(rows[-1]['label'], rows[-1]['end_to_end_s'], flush=True)
    if 'compile' not in skip:
        results['compile_s'] = {}
        eager_unet = engine.unet
        for mode in filter(None, args.compile_modes.split(',')):
            engine.unet = eager_unet
            results['compile_s'][mode] = compile_unet(engine, mode, args)
            rows.append(bench_ours(engine, args, f'modelscope-t2v compiled ({mode})'))
            print(rows[-1]['label'], rows[-1]['end_to_end_s'], flush=True)
    if 'fp32' not in skip and device.type == 'cuda':
        fast = rows[-1]['frames']
        del engine
        torch.cuda.empty_cache()
        torch.backends.cudnn.allow_tf32 = False  # a true float32 reference
        engine = TextToVideo.from_pretrained(args.model_dir, device=device, dtype=torch.float32)
        request = parse_request({'text': PROMPT, 'seed': SEED}, engine.config, num_frames=args.frames,
                                height=args.size_px, width=args.size_px, output_type='frames')
        reference_frames = engine(request).frames[0]
        results['psnr_db'] = {'fast_vs_fp32': psnr(fast, reference_frames)}
    if 'builtin' not in skip:
        rows.append(bench_builtin(args.model_dir, engine, args))
        print(rows[-1]['label'], rows[-1]['end_to_end_s'], flush=True)
        if 'psnr_db' in results:
            results['psnr_db']['builtin_vs_fp32'] = psnr(rows[-1]['frames'], reference_frames)
    if 'diffusers' not in skip:
        rows.append(bench_diffusers(engine, args))
        print(rows[-1]['label'], rows[-1]['end_to_end_s'], flush=True)
    for row in rows:
        row.pop('frames', None)
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=2)
    print_table(results)


if __name__ == '__main__':
    main()
