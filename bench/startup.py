"""Start-up of the fast paths in fresh processes: a cold one (empty compiler caches), then warm ones.

    python bench/startup.py --out startup.json [--model-dir DIR] [--processes 2] [--cache-dir DIR]
                            [--compile-cache | --cuda-graphs] [--half-cache] [--device cpu --size tiny --steps 3]
                            [--option KEY=VALUE ...]

Each process is a new Python interpreter that imports the package, loads the model with compile=, and makes three
default generations (16 frames of 256x256, DDIM 50, guidance 9). The first one pays for compiling (with the compile
cache the second loads what it built and captures the graphs); start-up is the time from the process's start to its
third video, less three times the third video's time: all a user waits for beyond the videos. The processes share one
inductor and Triton cache folder (emptied before the first), as two runs on one machine do. Each row also gives
torch.compile's own timers (seconds summed per phase, 0.5 s or more: tracing, inductor, cache loads); what they
leave of the first video is CUDA-graph recording and running.

On the CPU (--device cpu, a dry run; torch.compile's 'default' mode) the engine compiles as on CUDA.
--compile-cache loads with compile_cache=True (compile_cache.py: standalone_compile artefacts of the networks'
blocks in the inductor cache folder, built in parallel processes; no tracing in a warm process); each row then
counts the blocks' kinds of call built and loaded. --cuda-graphs loads
with cuda_graphs=True instead of compiling (cuda_graphs.py: the eager networks replayed from CUDA graphs).
--half-cache reads the weights from a half-precision copy in the cache folder (written by the first process).
--option adds an inductor option to those the package compiles with (text_to_video.compile_options), e.g.
cpp_wrapper=True (a C++ wrapper around each compiled graph's kernels instead of a Python module).
After its timings each process makes the video again with an uncompiled engine: the largest uint8 difference
and the PSNR of the fast path's frames (the third video's) against those check that it computes what the networks
do, and the hash of those uint8 frames tells whether processes made the same video.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))

from modelscope_t2v.config import FULL, TINY  # noqa: E402
from modelscope_t2v.tools.make_random_model import write_model_dir  # noqa: E402

CHILD = r'''
import hashlib, json, sys, time
started = float(sys.argv[2])
options, device, steps, inductor = json.loads(sys.argv[3]), sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6])
import numpy as np
import torch
from modelscope_t2v import TextToVideo, parse_request, text_to_video
from modelscope_t2v.compile_cache import artefact_counts
package_options = text_to_video.compile_options
text_to_video.compile_options = lambda mode: {**package_options(mode), **inductor}
imported = time.time()
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
engine = TextToVideo.from_pretrained(sys.argv[1], device=device, **options)
if device == 'cpu' and options['compile']:   # from_pretrained compiles on CUDA only
    engine.compile_networks(options['compile'], options['compile_cache'])
loaded = time.time()
request = parse_request({'text': 'A panda eating bamboo on a rock.', 'seed': 42}, engine.config, output_type='frames',
                        num_inference_steps=steps)
engine(request); sync()
first = time.time()
from torch._dynamo.utils import compilation_time_metrics, counters
compiling = {name: round(sum(times), 2) for name, times in compilation_time_metrics.items() if sum(times) >= 0.5}
graphs = dict(counters['stats'])
engine(request); sync()
second = time.time()
video = engine(request).frames[0]; sync()
third = time.time()
frames = video.astype(np.float64)
networks = {'unet': engine.unet, 'text_encoder': engine.text_encoder, 'decoder': engine.autoencoder.decoder}
precompiled = {name: artefact_counts(network) for name, network in networks.items() if options['compile_cache']}
plain = TextToVideo.from_pretrained(sys.argv[1], device=device)(request).frames[0].astype(np.float64)
psnr = 10 * np.log10(255 ** 2 / max(np.mean((frames - plain) ** 2), 1e-12))
print(json.dumps({'import_s': imported - started, 'load_s': loaded - imported, 'first_video_s': first - loaded,
                  'second_video_s': second - first, 'third_video_s': third - second,
                  'startup_s': third - started - 3 * (third - second),
                  'compile_s': compiling, 'dynamo_stats': graphs, 'precompiled_built_loaded': precompiled,
                  'max_uint8_difference_from_uncompiled': int(np.abs(frames - plain).max()),
                  'psnr_db_against_uncompiled': round(psnr, 1),
                  'frames_sha256': hashlib.sha256(np.ascontiguousarray(video).tobytes()).hexdigest()[:16]}))
'''


def fresh_process_env(cache: str) -> dict:
    """The environment of a fresh process with the compiler caches in `cache` and this checkout importable; its
    bytecode written and read, as on a pip-installed machine (the lent GPUs' PYTHONDONTWRITEBYTECODE=1 tripled the
    import's time)."""
    path = os.pathsep.join(filter(None, [os.path.join(HERE, '..'), os.environ.get('PYTHONPATH')]))
    return {**{key: value for key, value in os.environ.items() if key != 'PYTHONDONTWRITEBYTECODE'},
            'TORCHINDUCTOR_CACHE_DIR': os.path.join(cache, 'inductor'),
            'TRITON_CACHE_DIR': os.path.join(cache, 'triton'), 'PYTHONPATH': path}


def add_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--option', action='append', default=[], metavar='KEY=VALUE',
                        help="an inductor option added to the package's compile_options (VALUE a Python literal, "
                             "e.g. cpp_wrapper=True); repeatable")


def inductor_options(options: list) -> dict:
    """--option's KEY=VALUE strings as {KEY: the Python literal VALUE}."""
    return {key: ast.literal_eval(value) for key, value in (option.split('=', 1) for option in options)}


def run_process(model_dir: str, cache: str, options: dict, device: str, steps: int, inductor: dict) -> dict:
    """One fresh process's timings (seconds), with the compiler caches in `cache`, from_pretrained's `options`
    and `inductor` options added to the package's."""
    out = subprocess.run([sys.executable, '-c', CHILD, model_dir, repr(time.time()), json.dumps(options), device,
                          str(steps), json.dumps(inductor)],
                         env=fresh_process_env(cache), check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='startup.json')
    parser.add_argument('--model-dir', default=os.path.join(tempfile.gettempdir(), 'modelscope-t2v-bench'))
    parser.add_argument('--processes', type=int, default=2)
    parser.add_argument('--compile-mode', default='reduce-overhead')
    parser.add_argument('--cache-dir', default=None,
                        help='the compiler caches (emptied first; default: a new temp dir)')
    parser.add_argument('--compile-cache', action='store_true', help="from_pretrained's compile_cache=True")
    parser.add_argument('--cuda-graphs', action='store_true',
                        help="from_pretrained's cuda_graphs=True, not compiling (--compile-mode is ignored)")
    parser.add_argument('--half-cache', action='store_true', help='half-precision weights copied into the cache dir')
    parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    parser.add_argument('--steps', type=int, default=50, help='DDIM steps of each video (default: %(default)s)')
    parser.add_argument('--size', choices=('full', 'tiny'), default='full', help='of a model written if missing')
    add_option_argument(parser)
    args = parser.parse_args(argv)
    command = ' '.join(['python bench/startup.py'] + (sys.argv[1:] if argv is None else argv))
    if args.cuda_graphs and args.compile_cache:
        parser.error('--cuda-graphs does not compile: it cannot go with --compile-cache')
    if not os.path.exists(os.path.join(args.model_dir, 'configuration.json')):
        write_model_dir(args.model_dir, FULL if args.size == 'full' else TINY)
    cache = args.cache_dir or tempfile.mkdtemp(prefix='t2v-compile-cache-')
    shutil.rmtree(cache, ignore_errors=True)
    options = {'compile': False if args.cuda_graphs else args.compile_mode, 'compile_cache': args.compile_cache,
               'cuda_graphs': args.cuda_graphs, 'half_cache': os.path.join(cache, 'half') if args.half_cache
               else False}
    inductor = inductor_options(args.option)
    rows = []
    for i in range(args.processes):
        rows.append({'process': i + 1, 'caches': 'cold' if i == 0 else 'warm',
                     **run_process(args.model_dir, cache, options, args.device, args.steps, inductor)})
        print(json.dumps(rows[-1]), flush=True)
    import torch
    with open(args.out, 'w') as f:
        device = torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'
        json.dump({'device': device, 'torch': torch.__version__,
                   'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'options': options,
                   'inductor_options': inductor,
                   'command': command, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    main()
