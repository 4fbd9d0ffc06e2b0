"""The compile cache's loading alone: fresh processes that load every artefact a cold start listed, timed.

    python bench/artefact_loads.py --cache-dir DIR [--device cuda] [--rounds 3] [--pools default,off,early,ready]
                                   [--out loads.json]

DIR holds the caches a cold bench/startup.py process filled (--compile-cache). Each process imports the package,
starts the device, then loads on its main thread every artefact named in the folder's used-*.txt files (every
artefact there on the CPU, which lists none), as a warm start's loader thread does, with nothing beside it. Its
wall seconds and this process's CPU seconds (all its threads; not inductor's compile workers, which are other
processes) measure the loader's own work: in a warm start the loader shares the GIL with the main thread and
diffusers' import (docs/benchmarks.md, start-up).

Each round runs one process per way of treating inductor's pool of compile workers, in turn:
  default  as a warm start does: inductor starts the pool at its first kernel and hands it kernels once it is ready
  off      TORCHINDUCTOR_COMPILE_THREADS=1: every kernel loaded in this process
  early    the pool started just before the loads
  ready    the pool started and ready before the loads are timed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from startup import fresh_process_env  # noqa: E402

POOLS = ('default', 'off', 'early', 'ready')

CHILD = r'''
import json, os, sys, time
folder, device, pool = sys.argv[1:4]
import torch
from modelscope_t2v import compile_cache, torch_key
torch.zeros(1, device=device)
names = sorted(os.listdir(folder))
listed = [path for name in names if name.startswith('used-')
          for path in compile_cache.read_used(os.path.join(folder, name))]
paths = listed or [os.path.join(folder, name) for name in names if name.endswith('.bin')]   # none listed on the CPU
if not paths:
    sys.exit(f'no artefacts in {folder}: fill it with a cold bench/startup.py --compile-cache process first')
torch_key.restore_torch_key(folder)
wall, cpu = time.time(), time.process_time()
if pool in ('early', 'ready'):
    from torch._inductor.async_compile import AsyncCompile
    AsyncCompile.use_process_pool()   # starts the pool; True once it is ready
    while pool == 'ready' and not AsyncCompile.use_process_pool():
        time.sleep(0.05)
    if pool == 'ready':
        wall, cpu = time.time(), time.process_time()
for path in paths:
    compile_cache.load_artefact(path)
print(json.dumps({'pool': pool, 'artefacts': len(paths), 'wall_s': round(time.time() - wall, 3),
                  'cpu_s': round(time.process_time() - cpu, 3)}))
'''


def load_all(cache: str, device: str, pool: str) -> dict:
    """One fresh process's loads of every listed artefact: {'pool', 'artefacts', 'wall_s', 'cpu_s'}."""
    env = fresh_process_env(cache)
    if pool == 'off':
        env['TORCHINDUCTOR_COMPILE_THREADS'] = '1'
    folder = os.path.join(env['TORCHINDUCTOR_CACHE_DIR'], 'modelscope_t2v')
    out = subprocess.run([sys.executable, '-c', CHILD, folder, device, pool], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def medians(rows: list) -> dict:
    """Per pool: the median wall and CPU seconds over its processes."""
    pools = dict.fromkeys(row['pool'] for row in rows)
    return {pool: {key: round(statistics.median(row[key] for row in rows if row['pool'] == pool), 3)
                   for key in ('wall_s', 'cpu_s')} for pool in pools}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cache-dir', required=True, help='the caches a cold bench/startup.py process filled')
    parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--pools', default=','.join(POOLS), help=f'some of {",".join(POOLS)}, run in this order')
    parser.add_argument('--out', default='artefact-loads.json')
    args = parser.parse_args(argv)
    pools = args.pools.split(',')
    unknown = sorted(set(pools) - set(POOLS))
    if unknown:
        parser.error(f'--pools: unknown {unknown}; choose from {list(POOLS)}')
    rows = []
    for _ in range(args.rounds):
        for pool in pools:
            rows.append(load_all(args.cache_dir, args.device, pool))
            print(json.dumps(rows[-1]), flush=True)
    import torch
    result = {'device': torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu', 'torch': torch.__version__,
              'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
              'command': ' '.join(['python bench/artefact_loads.py'] + (sys.argv[1:] if argv is None else argv)),
              'rows': rows, 'medians': medians(rows)}
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result['medians']))


if __name__ == '__main__':
    main()
