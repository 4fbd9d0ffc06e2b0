"""GPU benchmark: this package against ModelScope's built-in classes and diffusers, in one process.

    python bench/benchmark.py --out results.json [--size full] [--runs 3] [--workload W] [--skip builtin,...]
    python bench/benchmark.py --out results.json --workload batch|startup [that tool's flags]

Builds a random-weight model dir of the real shapes (random weights do the same
arithmetic), then times on the same GPU, with medians over --runs:
  startup   from the original fp32 files, and from the half-precision safetensors cache;
  eager     TextToVideo per stage (text, denoise, decode, uint8, mp4) and end to end,
            DDIM-50 and DPM++2M-25, peak memory;
  memory    low_memory=True, and 64 frames with and without it: time and peak memory;
  graphs    cuda_graphs=True: the eager networks replayed from CUDA graphs, its capture cost (first video), and
            the largest difference of its frames from the eager row's;
  compile   the compiled fast path (channels-last, temporal GEMMs), its warm-up cost (--compile-cache: through
            the compile cache, compile_cache.py);
  fp32      a float32 run of the same seed: PSNR of every fast path's frames against it;
  builtin, diffusers   the peers of bench/peers.py.
Also the FLOP count of the default generation and the measured fp16 matmul ceiling.
--skip takes any of: startup, eager, memory, graphs, compile, fp32, builtin, diffusers (the FLOP count and the
ceiling always run: each row's floor).
--workload batch and --workload startup are jobs of several processes: they run bench/batch_scaling.py (64
default videos through `modelscope-t2v batch` on one GPU) and bench/startup.py (three fresh processes, the compile
cache), with --out, --model-dir and any further flags passed on to them.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, '..'), HERE]

import peers  # noqa: E402
from measure import count_flops, matmul_ceiling, median_time, peak_gib, psnr, timed  # noqa: E402
from modelscope_t2v import TextToVideo, parse_request  # noqa: E402
from modelscope_t2v.config import FULL, TINY  # noqa: E402
from modelscope_t2v.sampling import denoise  # noqa: E402
from modelscope_t2v.schedulers import make_scheduler  # noqa: E402
from modelscope_t2v.text_to_video import to_uint8_frames  # noqa: E402
from modelscope_t2v.tools.make_random_model import write_model_dir  # noqa: E402
from peers import PROMPT, SEED  # noqa: E402

LONG_FRAMES = 64
# --workload presets: (frames, height, width, sampler, steps, strength); 'default' is the model card's generation;
# a strength re-renders a video (video-to-video): the last strength x steps of the steps run
WORKLOADS = {
    'default': (16, 256, 256, 'ddim', 50, None),
    'zeroscope-576w': (24, 320, 576, 'dpm++2m', 40, None),   # zeroscope_v2_576w's card: 576x320, 24 frames
    'zeroscope-xl': (24, 576, 1024, 'ddim', 50, 0.65),       # zeroscope_v2_XL re-rendering 576w's 576x320 output
    'long': (256, 256, 256, 'ddim', 50, None),               # FreeNoise windows of 16 frames, stride 4
    'lcm': (16, 256, 256, 'lcm', 4, None),                   # few steps (a consistency LoRA's), guidance off
}
# workloads of several processes, each measured by its own tool: (module in bench/, its default flags)
JOBS = {
    'batch': ('batch_scaling', ['--gpus', '1', '--prompts', '64']),
    'startup': ('startup', ['--processes', '3', '--compile-cache', '--half-cache']),
}


def guidance(args) -> float:
    """The workload's guidance scale: 9 as the model card, off (one UNet pass a step) for lcm."""
    return 1.0 if args.sampler == 'lcm' else 9.0


def kept_steps(args) -> int:
    """UNet steps the workload runs: all of them, or the last strength x steps of a re-render."""
    return args.steps if args.strength is None else min(int(args.steps * args.strength), args.steps)


def source_video(args):
    """A re-render's input: uint8 frames (f, 320, 576, 3) of the benchmark's seed, resized by the request."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 256, (args.frames, 320, 576, 3), generator=generator, dtype=torch.uint8).numpy()


def default_request(engine: TextToVideo, args, **options):
    """The workload's generation (guidance 9) of the benchmark's prompt and seed, as frames."""
    values = dict(num_frames=args.frames, height=args.height, width=args.width, sampler=args.sampler,
                  num_inference_steps=args.steps, guidance_scale=guidance(args), output_type='frames')
    if args.strength is not None:
        values.update(init_video=source_video(args), strength=args.strength)
    return parse_request({'text': PROMPT, 'seed': SEED}, engine.config, **{**values, **options})


def load(args, device, **options) -> TextToVideo:
    return TextToVideo.from_pretrained(args.model_dir, device=device, **options)


def release(engine: TextToVideo) -> None:
    """Free an engine's GPU memory before the next one is built, compiled code and CUDA graphs included."""
    engine.text_encoder = engine.unet = engine.autoencoder = None
    torch._dynamo.reset()   # its caches hold the compiled modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- this package ----------------------------------------------------------------------------

def warm_page_cache(model_dir: str) -> None:
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), 'rb') as f:
            while f.read(1 << 26):
                pass


def bench_startup(args, device) -> dict:
    """Seconds from files to a ready fp16 pipeline: the fp32 originals, then the half cache."""
    warm_page_cache(args.model_dir)
    engine, fp32_files = timed(lambda: load(args, device))
    release(engine)
    cache = args.model_dir + '-half-cache'
    shutil.rmtree(cache, ignore_errors=True)
    engine, write = timed(lambda: load(args, device, half_cache=cache))
    release(engine)
    engine, read = timed(lambda: load(args, device, half_cache=cache))
    release(engine)
    return {'fp32_files_s': fp32_files, 'half_cache_first_call_s': write, 'half_cache_s': read}


@torch.no_grad()   # as the engine runs; a compiled UNet would otherwise recompile for grad mode
def bench_ours(engine: TextToVideo, args, label: str) -> dict:
    """Per-stage and end-to-end times of the workload's generation; for the default one also DPM++2M at 25
    steps."""
    request = default_request(engine, args)
    engine(default_request(engine, args, num_inference_steps=2))  # warm-up
    stages = {}
    negatives = [''] if guidance(args) > 1 else None
    (context, uncond), stages['text'] = timed(lambda: engine.encode_prompts([PROMPT], negatives))
    noise = engine.initial_noise(request)[0].to(engine.device, engine.dtype)
    model_fn = engine.guided_unet(context, uncond, guidance(args))
    engine.unet.set_temporal_window(request.temporal_window, request.temporal_stride or 1)
    scheduler = lambda: make_scheduler(args.sampler, engine.config.diffusion, args.steps)  # noqa: E731
    init = None if args.strength is None else torch.zeros_like(noise)   # the values do not change the arithmetic
    run_denoise = lambda: denoise(model_fn, noise, None, scheduler(), args.steps,  # noqa: E731
                                  init=init, strength=args.strength or 1.0)
    latents, _ = timed(run_denoise)
    stages['denoise'] = median_time(run_denoise, args.runs)
    stages['decode'] = median_time(lambda: engine.decode(latents), args.runs)
    video = engine.decode(latents)
    frames, stages['to_uint8'] = timed(lambda: to_uint8_frames(video)[0])
    stages['mp4'] = mp4_encode_time(frames)
    outputs = []
    row = {'label': label, 'stages_s': stages, 'end_to_end_s': median_time(lambda: engine(request), args.runs),
           'peak_gib': peak_gib(lambda: outputs.append(engine(request)))}
    row['frames'] = outputs[0].frames[0]
    if args.workload == 'default':
        dpm = default_request(engine, args, sampler='dpm++2m', num_inference_steps=25)
        row['dpm++2m_25_s'] = median_time(lambda: engine(dpm), args.runs)
    return row


def mp4_encode_time(frames):
    """Seconds to write the frames as H.264 mp4 (None where imageio-ffmpeg is missing)."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return None
    from modelscope_t2v.video_io import write_video
    path = os.path.join(tempfile.mkdtemp(), 'bench.mp4')
    return timed(lambda: write_video(frames, path, fps=8))[1]


def bench_memory(args, device) -> list:
    """Time and peak memory of the low-memory option, and of 64 frames with and without it."""
    rows = []
    for low_memory, frames, runs in ((True, args.frames, args.runs), (False, LONG_FRAMES, 1), (True, LONG_FRAMES, 1)):
        engine = load(args, device, low_memory=low_memory)
        request = default_request(engine, args, num_frames=frames)
        engine(default_request(engine, args, num_frames=frames, num_inference_steps=2))  # warm-up
        rows.append({'label': f'modelscope-t2v eager, {frames} frames' + (', low_memory' if low_memory else ''),
                     'end_to_end_s': median_time(lambda: engine(request), runs),
                     'peak_gib': peak_gib(lambda: engine(request))})
        print(rows[-1], flush=True)
        release(engine)
    return rows


def bench_graphs(args, device) -> tuple:
    """The eager networks replayed from CUDA graphs: (row, seconds of the first video, capture included)."""
    engine = load(args, device, cuda_graphs=True)
    _, first = timed(lambda: engine(default_request(engine, args)))
    row = bench_ours(engine, args, 'modelscope-t2v eager + CUDA graphs')
    release(engine)
    return row, first


def bench_compiled(args, device, mode: str) -> tuple:
    """The compiled fast path: (row, seconds of the first, compiling, generation)."""
    engine = load(args, device, compile=mode, compile_cache=args.compile_cache)
    _, warm_up = timed(lambda: engine(default_request(engine, args, num_inference_steps=2)))
    cache = ', compile cache' if args.compile_cache else ''
    row = bench_ours(engine, args, f'modelscope-t2v compiled ({mode}{cache}), channels-last')
    release(engine)
    return row, warm_up


def psnr_against_fp32(args, device, rows: list) -> dict:
    """PSNR (dB) of each row's frames against a float32 run of the same seed (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    engine = load(args, device, dtype=torch.float32)
    reference = engine(default_request(engine, args)).frames[0]
    release(engine)
    torch.backends.cudnn.allow_tf32 = True
    return {row['label']: psnr(row['frames'], reference) for row in rows if 'frames' in row}


# -- the run ------------------------------------------------------------------------------------

def report_row(results: dict, path: str) -> None:
    """Print the newest row as it finishes and save the results so far."""
    row = results['rows'][-1]
    print(row['label'], row['end_to_end_s'], 'peak', row.get('peak_gib'), 'stages', row.get('stages_s'), flush=True)
    save(results, path)


def save(results: dict, path: str) -> None:
    """Write the results so far (rows without their frames): a run cut short keeps its finished rows."""
    rows = [{k: v for k, v in row.items() if k != 'frames'} for row in results['rows']]
    with open(path, 'w') as f:
        json.dump({**results, 'rows': rows}, f, indent=2)


def print_table(results: dict) -> None:
    print(f"\nGPU: {results['device']}; torch {results['torch']}; "
          f"fp16 matmul ceiling {results['ceiling_tflops']:.0f} TFLOP/s; workload {results['workload']}: "
          f"{results['flops']['generation']:.0f} TFLOP (floor {results['floor_s']:.2f} s)")
    print(f"{'implementation':56} {'time s':>9} {'DPM-25 s':>9} {'peak GiB':>9} {'floor/time':>10}")

    def cell(value, spec='9.3f'):
        return f"{'n/a':>9}" if value is None else format(value, spec)

    for row in results['rows']:
        print(f"{row['label']:56} {cell(row['end_to_end_s'])} {cell(row.get('dpm++2m_25_s'))} "
              f"{cell(row['peak_gib']['allocated'], '9.2f')} {results['floor_s'] / row['end_to_end_s']:10.0%}")
    for row in results['rows']:
        if 'stages_s' in row:
            print(row['label'], {k: (None if v is None else round(v, 4)) for k, v in row['stages_s'].items()})
    for key in ('startup_s', 'graphs_first_video_s', 'graphs_max_uint8_difference_from_eager', 'compile_warm_up_s',
                'psnr_db'):
        print(key, json.dumps(results.get(key)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='bench-results.json')
    parser.add_argument('--size', choices=['full', 'tiny'], default='full')
    parser.add_argument('--model-dir', default=os.path.join(tempfile.gettempdir(), 'modelscope-t2v-bench'))
    parser.add_argument('--runs', type=int, default=3)
    jobs = '; '.join(f'{name} (bench/{module}.py {" ".join(flags)})' for name, (module, flags) in JOBS.items())
    parser.add_argument('--workload', choices=sorted(WORKLOADS) + sorted(JOBS), default='default',
                        help='frames, size, sampler and steps: ' + '; '.join(f'{k} {v}' for k, v in WORKLOADS.items())
                        + '; or a job of several processes: ' + jobs)
    parser.add_argument('--skip', default='',
                        help='comma list of: startup, eager, memory, graphs, compile, fp32, builtin, diffusers')
    parser.add_argument('--compile-modes', default='reduce-overhead', help='torch.compile modes, comma separated')
    parser.add_argument('--compile-cache', action='store_true',
                        help="compiled rows through compile_cache=True (inductor's cache folder): "
                             "standalone_compile artefacts, CUDA graphs captured by hand")
    args, args.job_flags = parser.parse_known_args(argv)
    if args.workload in JOBS:
        return args
    if args.job_flags:
        parser.error(f'unrecognized arguments: {" ".join(args.job_flags)} (only --workload batch or startup '
                     'passes flags on)')
    args.frames, args.height, args.width, args.sampler, args.steps, args.strength = WORKLOADS[args.workload]
    return args


def write_model_if_missing(args) -> None:
    if not os.path.exists(os.path.join(args.model_dir, 'configuration.json')):
        _, seconds = timed(lambda: write_model_dir(args.model_dir, FULL if args.size == 'full' else TINY))
        print(f'wrote random {args.size} model to {args.model_dir} in {seconds:.1f} s', flush=True)


def run_job(args) -> None:
    """A workload of several processes, through its own tool: its default flags, then the caller's."""
    write_model_if_missing(args)
    module, flags = JOBS[args.workload]
    importlib.import_module(module).main(flags + ['--out', args.out, '--model-dir', args.model_dir]
                                         + args.job_flags)


def main(argv=None):
    args = parse_args(argv)
    if args.workload in JOBS:
        return run_job(args)
    skip = set(filter(None, args.skip.split(',')))
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    write_model_if_missing(args)
    results = {'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
               'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
               'command': ' '.join(['python bench/benchmark.py'] + sys.argv[1:]), 'workload': args.workload,
               'rows': []}
    rows = results['rows']
    if 'startup' not in skip:
        results['startup_s'] = bench_startup(args, device)
        print('startup', results['startup_s'], flush=True)

    # the eager path, and the arithmetic floor
    engine = load(args, device)
    results['ceiling_tflops'] = matmul_ceiling(device)
    results['flops'] = count_flops(engine, args.frames, args.height, args.width, encode=args.strength is not None)
    texts = 2 if guidance(args) > 1 else 1
    results['flops']['generation'] = (kept_steps(args) * texts * results['flops']['unet_forward']
                                      + results['flops']['decode'] + results['flops'].get('encode', 0))
    results['floor_s'] = results['flops']['generation'] / results['ceiling_tflops']
    print(f"floor {results['floor_s']:.2f} s: {results['flops']['generation']:.0f} TFLOP at "
          f"{results['ceiling_tflops']:.0f} TFLOP/s", flush=True)
    if 'eager' not in skip:
        rows.append(bench_ours(engine, args, f'modelscope-t2v eager ({str(engine.dtype)[6:]})'))
        report_row(results, args.out)
    # the same path at the trained frame count: how do time and memory grow?
    if args.workload == 'long' and 'eager' not in skip:
        short = argparse.Namespace(**{**vars(args), 'frames': engine.config.max_frames})
        rows.append(bench_ours(engine, short, f'modelscope-t2v eager, {short.frames} frames'))
        results['long_over_short'] = rows[0]['end_to_end_s'] / rows[-1]['end_to_end_s']
        report_row(results, args.out)
    release(engine)

    if 'memory' not in skip:
        rows.extend(bench_memory(args, device))
    if 'graphs' not in skip:
        row, results['graphs_first_video_s'] = bench_graphs(args, device)
        if 'eager' not in skip:
            difference = np.abs(row['frames'].astype(np.int16) - rows[0]['frames'].astype(np.int16)).max()
            results['graphs_max_uint8_difference_from_eager'] = int(difference)
        rows.append(row)
        report_row(results, args.out)
    if 'compile' not in skip:
        results['compile_warm_up_s'] = {}
        for mode in filter(None, args.compile_modes.split(',')):
            row, results['compile_warm_up_s'][mode] = bench_compiled(args, device, mode)
            rows.append(row)
            report_row(results, args.out)
    if not {'builtin', 'diffusers'} <= skip:
        engine = load(args, device)  # the peers take their text embedding from our encoder
        if 'builtin' not in skip:
            rows.append(peers.bench_builtin(args.model_dir, engine, args))
            report_row(results, args.out)
        if 'diffusers' not in skip:
            rows.append(peers.bench_diffusers(engine, args))
            report_row(results, args.out)
        release(engine)
    if 'fp32' not in skip and device.type == 'cuda':
        results['psnr_db'] = psnr_against_fp32(args, device, rows)
    save(results, args.out)
    print_table(results)


if __name__ == '__main__':
    main()
