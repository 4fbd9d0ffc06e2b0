"""Where a compile-cache start spends its seconds (warm; cold with --cold): a fresh process, every thread sampled.

    python bench/warm_start_profile.py --cache-dir DIR [--model-dir DIR] [--out profile.json] [--no-sampling]
                                       [--cold] [--option KEY=VALUE ...]
    python bench/warm_start_profile.py --summarise profile.json

DIR holds the caches a cold process filled (`bench/startup.py --processes 1 --compile-cache --half-cache
--cache-dir DIR`). The process is one of startup.py's warm ones: it imports the package, loads the model with
compile='reduce-overhead', compile_cache=True and half_cache=DIR/half, and makes three default videos; start-up
is counted as startup.py counts it. Meanwhile a daemon thread records, every 2 ms, the Python stack of every
other thread (sys._current_frames): the main thread, the compile cache's loader thread, the thread importing
diffusers. A thread inside a C call shows the Python frame that made it; the sampler takes the GIL too, so a
thread that holds it long is sampled less. --no-sampling times the same process without the sampler. --cold
empties DIR first: the process then converts the weights into the half cache and builds the artefacts in worker
processes (not sampled) while its first video runs uncompiled, as a cold start does. --option adds an inductor
option to the package's compile options, as startup.py's does (give the one that filled DIR).

The summary gives, per phase (import, load, first video, ...) and thread, the functions most often on the stack,
then a timeline: each thread's most frequent function in every half second.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from startup import add_option_argument, fresh_process_env, inductor_options  # noqa: E402

IDLE = ('_recv_msg', 'timer.py:check', '_monitor.py:run', 'thread.py:_worker')   # threads waiting for work

CHILD = r'''
import json, sys, threading, time
started = time.time()
samples, stacks, marks, sampling = [], {}, [], {'on': True}


def sample():
    me = threading.get_ident()
    while sampling['on']:
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        now = round(time.time() - started, 4)
        for ident, frame in sys._current_frames().items():
            stack = []
            while frame is not None and ident != me:
                stack.append(f'{frame.f_code.co_filename.split("site-packages/")[-1]}:{frame.f_code.co_name}')
                frame = frame.f_back
            if stack:
                samples.append((now, names.get(ident, str(ident)), stacks.setdefault(tuple(reversed(stack)),
                                                                                         len(stacks))))
        time.sleep(0.002)


def mark(name):
    marks.append((name, round(time.time() - started, 4)))


sampler = threading.Thread(target=sample, name='sampler', daemon=True)
if sys.argv[3] == 'sample':
    sampler.start()
import torch
from modelscope_t2v import TextToVideo, parse_request, text_to_video
package_options, inductor = text_to_video.compile_options, json.loads(sys.argv[4])
text_to_video.compile_options = lambda mode: {**package_options(mode), **inductor}
mark('imported')
engine = TextToVideo.from_pretrained(sys.argv[1], device='cuda', compile='reduce-overhead', compile_cache=True,
                                     half_cache=sys.argv[2])
torch.cuda.synchronize()
mark('loaded')
request = parse_request({'text': 'A panda eating bamboo on a rock.', 'seed': 42}, engine.config, output_type='frames')
for video in range(1, 4):
    engine(request)
    torch.cuda.synchronize()
    mark(f'video {video}')
sampling['on'] = False
from torch._dynamo.utils import compilation_time_metrics
times = dict(marks)
print(json.dumps({'startup_s': round(times['video 3'] - 3 * (times['video 3'] - times['video 2']), 3), 'marks': marks,
                  'compile_s': {name: round(sum(t), 3) for name, t in compilation_time_metrics.items()},
                  'samples': samples, 'stacks': [list(stack) for stack in stacks]}))
'''


def profile(model_dir: str, cache: str, sample: bool, inductor: dict) -> dict:
    """The warm process's marks (seconds from its start), start-up, torch.compile's timers and stack samples, with
    `inductor` options added to the package's."""
    command = [sys.executable, '-c', CHILD, model_dir, os.path.join(cache, 'half'), 'sample' if sample else 'time',
               json.dumps(inductor)]
    out = subprocess.run(command, env=fresh_process_env(cache), check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarise(result: dict, top: int = 12) -> str:
    """Per phase and thread the functions most often on the stack (percent of that thread's samples), then the
    timeline: per half second each thread's most frequent innermost package function."""
    lines = [f"start-up {result['startup_s']} s; marks {result['marks']}", f"compile_s {result['compile_s']}"]
    phases = [('start', 0.0)] + [tuple(mark) for mark in result['marks']]
    stacks = result['stacks']
    for (name, begin), (end_name, end) in zip(phases, phases[1:]):
        lines.append(f'\n== {name} -> {end_name}: {end - begin:.2f} s')
        by_thread = collections.defaultdict(list)
        for time, thread, stack in result['samples']:
            if begin <= time < end:
                by_thread[thread].append(stacks[stack])
        for thread, thread_stacks in by_thread.items():
            counts = collections.Counter(frame for stack in thread_stacks for frame in set(stack) if ours(frame))
            lines.append(f'-- {thread}: {len(thread_stacks)} samples')
            lines += [f'  {100 * n / len(thread_stacks):5.1f} %  {frame}' for frame, n in counts.most_common(top)]
    lines.append('\n== timeline (per half second and busy thread: the innermost frame of this package or an installed '
                 'one, and its share of the samples)')
    buckets = collections.defaultdict(collections.Counter)
    for time, thread, stack in result['samples']:
        frames = [frame for frame in stacks[stack] if ours(frame) and not frame.startswith('<')]
        frame = frames[-1] if frames else stacks[stack][-1]
        if not frame.endswith(IDLE):
            buckets[int(time * 2)][(thread, frame)] += 1
    for bucket in sorted(buckets):
        per_thread = {}
        for (thread, frame), n in buckets[bucket].most_common():
            total = sum(m for (other, _), m in buckets[bucket].items() if other == thread)
            per_thread.setdefault(thread, f'{thread}: {frame} {100 * n // total} %')
        lines.append(f'{bucket / 2:5.1f} s  ' + ' | '.join(per_thread.values()))
    return '\n'.join(lines)


def ours(frame: str) -> bool:
    """A frame of this package or of an installed package (paths there start after site-packages/), not of
    Python's standard library or of the profiled script."""
    return 'modelscope_t2v/' in frame or not frame.startswith(('/', '<'))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cache-dir', help='the caches a cold bench/startup.py process filled (not emptied)')
    parser.add_argument('--cold', action='store_true', help='empty --cache-dir first: profile a cold start')
    parser.add_argument('--model-dir', default=os.path.join(tempfile.gettempdir(), 'modelscope-t2v-bench'))
    parser.add_argument('--out', default='warm-start-profile.json', help='the marks and stack samples (JSON)')
    parser.add_argument('--no-sampling', action='store_true', help='time the process without the sampler')
    parser.add_argument('--summarise', metavar='JSON', help='print the summary of an earlier --out file and stop')
    add_option_argument(parser)
    args = parser.parse_args(argv)
    if args.summarise:
        with open(args.summarise) as f:
            print(summarise(json.load(f)))
        return
    if not args.cache_dir:
        parser.error('--cache-dir is required (or --summarise)')
    if args.cold:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    result = profile(args.model_dir, args.cache_dir, not args.no_sampling, inductor_options(args.option))
    with open(args.out, 'w') as f:
        json.dump(result, f)
    print(summarise(result) if result['samples'] else f"start-up {result['startup_s']} s; marks {result['marks']}")


if __name__ == '__main__':
    main()
