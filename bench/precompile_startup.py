"""Experiment for issue 27's warm start-up (<= 10 s): the UNet from a torch.compiler.precompile artefact on disk
instead of torch.compile, whose dynamo tracing alone takes 16.5 s of a warm process (docs/benchmarks.md).

    python bench/precompile_startup.py --out precompile.json [--model-dir DIR] [--cuda-graph]

Process 1 builds the artefact of one guided UNet call at the default shape (16 frames of 256x256, two texts,
channels-last, inductor's options of 'reduce-overhead' less CUDA graphs, which precompile turns off) into
--cache-dir, with inductor's own caches inside it. Process 2, fresh, imports the package, loads the model and the
artefact and makes two default videos; start-up is counted as bench/startup.py counts it (the time to the first
video less the second's). --cuda-graph replays the artefact's call from a CUDA graph captured here. The text
encoder and the decoder run eager in both processes. Each process also reports the largest difference of its
UNet output from the eager UNet's on the same input.
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

CHILD = r'''
import json, os, sys, time
started = float(sys.argv[5])
import torch
from modelscope_t2v import TextToVideo, parse_request
from torch._inductor.decomposition import select_decomp_table
from modelscope_t2v.text_to_video import compile_options
imported = time.time()
model_dir, device, cache, step = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3], sys.argv[4]
engine = TextToVideo.from_pretrained(model_dir, device=device)
unet = engine.unet.to_channels_last()
request = parse_request({'text': 'A panda eating bamboo on a rock.', 'seed': 42}, engine.config, output_type='frames')
size = engine.config.unet.in_dim, request.num_frames, request.height // 8, request.width // 8
x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device, engine.dtype)
t = torch.full((1,), 501, dtype=torch.long, device=device)
unet.remember_text(torch.randn(2, 77, engine.config.unet.context_dim).to(device, engine.dtype))
with torch.no_grad():
    eager = unet(x, t)


def guided_step(unet, x, t):   # the engine's call, under no_grad as the engine runs it (precompile traces with grad)
    with torch.no_grad():
        return unet(x, t)


code_path, cache_path = os.path.join(cache, 'unet.py'), os.path.join(cache, 'unet.cache')
if step == 'build':
    options = {k: v for k, v in compile_options('reduce-overhead').items() if k != 'triton.cudagraphs'}
    with torch._inductor.config.patch(options):
        code, artefact = torch.compiler.precompile(guided_step, unet, x, t, decompositions=select_decomp_table())
    open(code_path, 'w').write(code)
    open(cache_path, 'wb').write(artefact)
run = torch.compiler.precompile.load(open(code_path).read(), open(cache_path, 'rb').read())
if step == 'load-graph':   # static input and output tensors, the call captured once
    static_x, static_t = x.clone(), t.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(unet, static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(unet, static_x, static_t)

    def call(x, t):
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        return static_out
else:
    def call(x, t):
        return run(unet, x, t)
difference = (call(x, t).float() - eager.float()).abs().max().item()


class PrecompiledUNet:
    """The engine's UNet with its calls (remembered text, no guidance embedding) through the artefact."""
    def __init__(self, unet):
        self.unet = unet
    def __getattr__(self, name):
        return getattr(self.unet, name)
    def __call__(self, x, t, context=None, guidance=None):
        assert context is None and guidance is None
        return call(x, t)


engine.unet = PrecompiledUNet(unet)
loaded = time.time()
sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
engine(request); sync()
first = time.time()
engine(request); sync()
second = time.time()
print(json.dumps({'step': step, 'import_s': imported - started, 'load_s': loaded - imported,
                  'first_video_s': first - loaded, 'second_video_s': second - first,
                  'startup_s': first - started - (second - first), 'max_abs_difference_from_eager': difference}))
'''


def run_process(args, step: str) -> dict:
    path = os.pathsep.join(filter(None, [os.path.join(HERE, '..'), os.environ.get('PYTHONPATH')]))
    env = {**os.environ, 'TORCHINDUCTOR_CACHE_DIR': os.path.join(args.cache_dir, 'inductor'),
           'TRITON_CACHE_DIR': os.path.join(args.cache_dir, 'triton'), 'PYTHONPATH': path}
    out = subprocess.run([sys.executable, '-c', CHILD, args.model_dir, args.device, args.cache_dir, step,
                          repr(time.time())], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='precompile.json')
    parser.add_argument('--model-dir', default=os.path.join(tempfile.gettempdir(), 'modelscope-t2v-bench'))
    parser.add_argument('--size', choices=('full', 'tiny'), default='full', help='of a model written if missing')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--cache-dir', default=None, help='the artefact and compiler caches (emptied first)')
    parser.add_argument('--cuda-graph', action='store_true', help='replay the UNet call from a CUDA graph')
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(HERE, '..'))
    if not os.path.exists(os.path.join(args.model_dir, 'configuration.json')):
        from modelscope_t2v.config import FULL, TINY
        from modelscope_t2v.tools.make_random_model import write_model_dir
        write_model_dir(args.model_dir, FULL if args.size == 'full' else TINY)
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix='t2v-precompile-')
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    os.makedirs(args.cache_dir)
    rows = [run_process(args, 'build')]
    print(json.dumps(rows[-1]), flush=True)
    rows.append(run_process(args, 'load-graph' if args.cuda_graph else 'load'))
    print(json.dumps(rows[-1]), flush=True)
    with open(args.out, 'w') as f:
        json.dump({'command': ' '.join(['python bench/precompile_startup.py'] + sys.argv[1:]),
                   'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    main()
