"""Start-up of the compiled fast path in fresh processes: a cold one (empty compiler caches), then warm ones.

    python bench/startup.py --out startup.json [--model-dir DIR] [--processes 2] [--cache-dir DIR]

Each process is a new Python interpreter that imports the package, loads the model with compile=, and makes two
default generations (16 frames of 256x256, DDIM 50, guidance 9). The first one pays for compiling; start-up is
the time from the process's start to its first video, less the second video's time: what a user waits for
beyond one generation. The processes share one inductor and Triton cache folder (emptied before the first), as
two runs on one machine do. Each row also gives torch.compile's own timers (seconds summed per phase, 0.5 s or
more: tracing, inductor, cache loads); what they leave of the first video is CUDA-graph recording and running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))

from modelscope_t2v.config import FULL  # noqa: E402
from modelscope_t2v.tools.make_random_model import write_model_dir  # noqa: E402

CHILD = r'''
import json, sys, time
started = float(sys.argv[3])
import torch
from modelscope_t2v import TextToVideo, parse_request
imported = time.time()
engine = TextToVideo.from_pretrained(sys.argv[1], device='cuda', compile=sys.argv[2])
loaded = time.time()
request = parse_request({'text': 'A panda eating bamboo on a rock.', 'seed': 42}, engine.config, output_type='frames')
engine(request); torch.cuda.synchronize()
first = time.time()
from torch._dynamo.utils import compilation_time_metrics, counters
compiling = {name: round(sum(times), 2) for name, times in compilation_time_metrics.items() if sum(times) >= 0.5}
graphs = dict(counters['stats'])
engine(request); torch.cuda.synchronize()
second = time.time()
print(json.dumps({'import_s': imported - started, 'load_s': loaded - imported, 'first_video_s': first - loaded,
                  'second_video_s': second - first, 'startup_s': first - started - (second - first),
                  'compile_s': compiling, 'dynamo_stats': graphs}))
'''


def run_process(model_dir: str, mode: str, cache: str) -> dict:
    """One fresh process's timings (seconds), with the compiler caches in `cache`."""
    path = os.pathsep.join(filter(None, [os.path.join(HERE, '..'), os.environ.get('PYTHONPATH')]))
    env = {**os.environ, 'TORCHINDUCTOR_CACHE_DIR': os.path.join(cache, 'inductor'),
           'TRITON_CACHE_DIR': os.path.join(cache, 'triton'), 'PYTHONPATH': path}
    out = subprocess.run([sys.executable, '-c', CHILD, model_dir, mode, repr(time.time())], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='startup.json')
    parser.add_argument('--model-dir', default=os.path.join(tempfile.gettempdir(), 'modelscope-t2v-bench'))
    parser.add_argument('--processes', type=int, default=2)
    parser.add_argument('--compile-mode', default='reduce-overhead')
    parser.add_argument('--cache-dir', default=None,
                        help='the compiler caches (emptied first; default: a new temp dir)')
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.model_dir, 'configuration.json')):
        write_model_dir(args.model_dir, FULL)
    cache = args.cache_dir or tempfile.mkdtemp(prefix='t2v-compile-cache-')
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for i in range(args.processes):
        rows.append({'process': i + 1, 'caches': 'cold' if i == 0 else 'warm',
                     **run_process(args.model_dir, args.compile_mode, cache)})
        print(json.dumps(rows[-1]), flush=True)
    import torch
    with open(args.out, 'w') as f:
        json.dump({'device': torch.cuda.get_device_name(), 'torch': torch.__version__,
                   'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'compile_mode': args.compile_mode,
                   'command': ' '.join(['python bench/startup.py'] + sys.argv[1:]), 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    main()
