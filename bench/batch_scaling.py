"""Videos per minute of `modelscope-t2v batch` on 1..N GPUs, through torchrun.

    python bench/batch_scaling.py --out results.json [--gpus 1,2] [--prompts 16] [--compile] [--videos-per-call N]
                                  [--model-dir DIR]

Writes a real-size random model where --model-dir has none (random weights do the arithmetic of real ones)
and a prompts file of default generations (16 frames, 256x256, DDIM 50,
guidance 9), then runs the batch job once per GPU count; without --compile the job decides itself whether
to compile (batch.COMPILE_PAYS_BACK_AFTER). Reports the wall time
of the whole job (model loading included) and the generation time summed from
the manifest; the rate after each rank's first generation (which pays for compiling); and the time before the first
video's generation (process start, imports, loading on every rank).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from modelscope_t2v.batch import CUDA_VIDEOS_PER_CALL  # noqa: E402
from modelscope_t2v.config import FULL  # noqa: E402
from modelscope_t2v.tools.make_random_model import write_model_dir  # noqa: E402


def run_batch(gpus: int, prompts: str, model_dir: str, out_dir: str, flags: list) -> tuple:
    """(time.time() at the start, wall seconds) of one torchrun batch job."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc-per-node={gpus}', '-m', 'modelscope_t2v.batch',
           prompts, '--out', out_dir, '--model', model_dir, '--no-progress'] + flags
    # bytecode written and read, as on a pip-installed machine (the lent GPUs' PYTHONDONTWRITEBYTECODE=1 tripled
    # the import's time)
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONDONTWRITEBYTECODE'}
    started, start = time.time(), time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return started, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='batch-scaling.json')
    parser.add_argument('--gpus', default='1,2')
    parser.add_argument('--prompts', type=int, default=16)
    parser.add_argument('--compile', action='store_true', help="the batch job's --compile")
    parser.add_argument('--videos-per-call', type=int, default=None,
                        help="the batch job's --videos-per-call (default: the job's own, 2 on CUDA)")
    parser.add_argument('--model-dir', default=None, help='the model dir (written if missing; default: a new one)')
    args = parser.parse_args(argv)
    command = ' '.join(['python bench/batch_scaling.py'] + (sys.argv[1:] if argv is None else argv))
    work = tempfile.mkdtemp()
    model_dir = args.model_dir or os.path.join(work, 'model')
    if not os.path.exists(os.path.join(model_dir, 'configuration.json')):
        write_model_dir(model_dir, FULL)
    prompts = os.path.join(work, 'prompts.jsonl')
    with open(prompts, 'w') as f:
        for i in range(args.prompts):
            f.write(json.dumps({'text': f'A panda eating bamboo on a rock, take {i}.', 'seed': i}) + '\n')
    flags = ['--compile'] * args.compile
    if args.videos_per_call is not None:
        flags += ['--videos-per-call', str(args.videos_per_call)]
    per_call = args.videos_per_call or CUDA_VIDEOS_PER_CALL
    rows = []
    for gpus in map(int, args.gpus.split(',')):
        out_dir = os.path.join(work, f'videos-{gpus}')
        started, wall = run_batch(gpus, prompts, model_dir, out_dir, flags)
        with open(os.path.join(out_dir, 'manifest.jsonl')) as f:
            entries = [json.loads(line) for line in f]
        assert len(entries) == args.prompts, (gpus, len(entries))
        seconds = [e['seconds'] for e in entries]
        entries.sort(key=lambda e: e['finished_at'])
        finished = [e['finished_at'] for e in entries]   # after each rank's first generation, which compiles:
        first = gpus * per_call
        steady = 60 * (len(finished) - first) / (finished[-1] - finished[first - 1])   # all ranks, one rate
        start_and_load = finished[0] - started - entries[0]['seconds']   # before the first video's generation
        rows.append({'gpus': gpus, 'videos': len(entries), 'batch_flags': ' '.join(flags) or "(the job's own)",
                     'wall_s': wall,
                     'videos_per_minute': 60 * len(entries) / wall,
                     'generation_s_per_video': sum(seconds) / len(seconds), 'start_and_load_s': start_and_load,
                     'first_video_s': entries[0]['seconds'],
                     'steady_videos_per_minute': steady})
        print(json.dumps(rows[-1]), flush=True)
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
    result = {'device': device, 'torch': torch.__version__,
              'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'command': command, 'rows': rows}
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
