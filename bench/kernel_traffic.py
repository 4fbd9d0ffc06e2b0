"""The bytes each of inductor's kernels moves in one compiled guided UNet step, and what they cost at the HBM's peak.

    python bench/kernel_traffic.py --frames 24 --latents 72x40                     # zeroscope 576w's shape
    python bench/kernel_traffic.py --frames 24 --latents 72x40 --kernels kernels-reduce-overhead.txt

The package's compiled UNet (channels-last, its Triton kernels, real-size random weights, fp16, guidance's
two texts) is compiled once more with inductor's bandwidth profiler on (TORCHINDUCTOR_PROFILE): each
generated kernel is timed alone at its first call (L2 flushed) and reports the bytes its loads and stores
take. Inductor's kernels are the norms, their statistics and the pointwise work: no matrix products. Prints
per kernel name: calls a step, GB a step, the profiler's ms and TB/s; then the step's totals and the least
time those bytes take at --peak-tbs. With --kernels (a table of `bench/step_timing.py --kernels-dir`, timed
in the step's CUDA graph), the time inductor's kernels took in the step, and every other kernel.
"""
import argparse
import collections
import os
import sys
import tempfile

ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument('--frames', type=int, default=16)
ARGS.add_argument('--latents', default='32x32', help='W x H of the latents (576w: 72x40)')
ARGS.add_argument('--peak-tbs', type=float, default=3.35, help="HBM bandwidth in TB/s (H100 SXM 3.35, H200 4.8)")
ARGS.add_argument('--kernels', help="step_timing's kernel table of the same shape: ms and launches a step, name")
ARGS.add_argument('--top', type=int, default=40, help='kernel names printed, most bytes first')
args = ARGS.parse_args()

PROFILE = os.path.join(tempfile.mkdtemp(), 'bandwidth.txt')
os.environ['TORCHINDUCTOR_PROFILE'] = '1'            # read when inductor's config is first imported
os.environ['TORCHINDUCTOR_PROFILE_OUTPUT'] = PROFILE

import torch  # noqa: E402

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')]
from measure import read_kernel_table  # noqa: E402

import modelscope_t2v.models.unet3d as unet3d  # noqa: E402
from modelscope_t2v.config import FULL  # noqa: E402
from modelscope_t2v.sampling import guided  # noqa: E402
from modelscope_t2v.text_to_video import compile_options, use_torchs_ptxas  # noqa: E402


def profile_one_step():
    """Compile the guided UNet as the package does, less CUDA graphs (the profiler times each kernel by
    itself), and run it once: inductor appends each graph's kernels to PROFILE."""
    use_torchs_ptxas()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    with torch.device('cuda'):
        unet = unet3d.UNet3D(FULL.unet).half().eval().requires_grad_(False)
    options = {**compile_options('default'), 'triton.cudagraphs': False,
               'benchmark_harness': False}   # torch 2.11's harness fails under the profiler
    model = torch.compile(unet.to_channels_last(), dynamic=False, options=options)
    width, height = map(int, args.latents.split('x'))
    x = torch.randn(1, 4, args.frames, height, width, device='cuda', dtype=torch.half)
    texts = torch.randn(2, 77, FULL.unet.context_dim, device='cuda', dtype=torch.half)
    model.remember_text(texts)
    guided(model, 9.0)(x, torch.full((1,), 981, device='cuda'), None)
    torch.cuda.synchronize()


def profiled_kernels():
    """name -> [calls, GB, ms] over one step, from the last block inductor wrote for each graph."""
    blocks = {}
    for block in open(PROFILE).read().split('=' * 20 + '\n'):
        head, _, body = block.partition('\n')
        if head:
            blocks[head] = [line.split('\t') for line in body.splitlines() if line.count('\t') == 4]
    kernels = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for rows in blocks.values():
        for ms, gb, _, _, name in rows:   # '0.318ms', '0.708 GB', '2223.73GB/s', '0.82%', name
            entry = kernels[name.strip()]
            entry[0] += 1
            entry[1] += float(gb.split()[0])
            entry[2] += float(ms.strip()[:-2])
    return kernels


profile_one_step()
kernels = profiled_kernels()
ours = {name: k for name, k in kernels.items() if not name.startswith('triton_')}   # the package's own Triton
inductor = {name: k for name, k in kernels.items() if name.startswith('triton_')}
print(f'{torch.cuda.get_device_name()} {torch.__version__}, {args.frames} frames, latents {args.latents}')
print(f'{"calls":>6} {"GB":>7} {"ms alone":>9} {"TB/s":>6}  kernel')
for name, (calls, gb, ms) in sorted(kernels.items(), key=lambda item: -item[1][1])[:args.top]:
    print(f'{calls:6d} {gb:7.3f} {ms:9.3f} {gb / ms:6.2f}  {name}')
calls, gb = sum(k[0] for k in inductor.values()), sum(k[1] for k in inductor.values())
print(f"inductor's kernels: {len(inductor)} names, {calls} calls, {gb:.2f} GB a step: "
      f'{gb / args.peak_tbs:.2f} ms at {args.peak_tbs} TB/s')
print(f"the package's Triton kernels: {', '.join(sorted(ours))}: {sum(k[1] for k in ours.values()):.2f} GB")
if args.kernels:
    table = read_kernel_table(args.kernels)
    in_step = sum(ms for name, (ms, _) in table.items() if name.startswith('triton_'))
    launches = sum(n for name, (_, n) in table.items() if name.startswith('triton_'))
    total = sum(ms for ms, _ in table.values())
    print(f"in the step ({args.kernels}): inductor's kernels {in_step:.2f} ms in {launches:.0f} launches "
          f'({gb / in_step:.2f} TB/s), every other kernel {total - in_step:.2f} ms, all {total:.2f} ms')
