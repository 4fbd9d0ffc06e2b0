"""TFLOP of one UNet3D call with two texts (a guided step's) by kind of layer: FlopCounterMode on meta tensors.

    python bench/flops_by_layer.py                               # 16 frames of 32x32 latents (256x256)
    python bench/flops_by_layer.py --frames 24 --latents 72x40   # zeroscope 576w

The meta device runs shapes only: seconds on any CPU, no weights. The total is within 0.2 % of twice
benchmark.py's 'unet_forward' count on the GPU at the same shape (9.66 against 9.64 TFLOP at 256x256).
Beside step_timing.py's kernel table, each kind's TFLOP over its kernels' milliseconds says how near the
matmul ceiling those kernels run (docs/benchmarks.md). The attention products are also given apart: the spatial
transformers' (self- and cross-attention: cuDNN's kernels) and the temporal ones' (models/frame_attention.py).
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')]
from modelscope_t2v.config import FULL  # noqa: E402
from modelscope_t2v.models.layers import GEGLU  # noqa: E402
from modelscope_t2v.models.unet3d import SpatialTransformer, TemporalTransformer, UNet3D  # noqa: E402


@register_flop_formula(torch.ops.modelscope_t2v.addmm_)
def addmm_in_place_flops(acc_shape, a_shape, b_shape, **kwargs) -> int:
    """The feed-forward's second GEMM (layers.addmm_): acc (m, n) += a (m, k) @ b (k, n). On meta tensors the
    op runs its fake implementation, which FlopCounterMode would count as nothing."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def flops_by_kind(frames: int, height: int, width: int) -> dict:
    """TFLOP by kind of layer of one call on 2 latents (the two texts of a guided step), and the total."""
    with torch.device('meta'):
        unet = UNet3D(FULL.unet).half().eval()
        latents = torch.empty(2, 4, frames, height, width, dtype=torch.float16)
        context = torch.empty(2, 77, FULL.unet.context_dim, dtype=torch.float16)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(latents, torch.full((2,), 500), context)
    counts = counter.get_flop_counts()   # 'Global' and each module's name -> {operator: FLOPs}

    def of_modules(module_type, op_name=None):
        """FLOPs in the modules of module_type, of every operator or only the one named."""
        return sum(flops for name, module in unet.named_modules() if isinstance(module, module_type)
                   for op, flops in counts.get(f'{type(unet).__name__}.{name}', {}).items()
                   if op_name in (None, op.__name__))

    by_op = {op.__name__: flops for op, flops in counts['Global'].items()}
    kinds = {'spatial convs': of_modules(nn.Conv2d), 'temporal convs': of_modules(nn.Conv3d),
             'GEGLU projections': of_modules(GEGLU), 'attention products': by_op.get('bmm', 0),
             '  spatial, cross': of_modules(SpatialTransformer, 'bmm'),
             '  temporal': of_modules(TemporalTransformer, 'bmm')}
    kinds['other linear maps'] = sum(by_op.get(op, 0) for op in ('mm', 'addmm', 'addmm_')) - kinds['GEGLU projections']
    kinds['total'] = sum(by_op.values())
    return {kind: flops / 1e12 for kind, flops in kinds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--frames', type=int, default=16)
    parser.add_argument('--latents', default='32x32', help='WxH of the latents (pixels / 8)')
    args = parser.parse_args()
    width, height = map(int, args.latents.split('x'))
    for kind, tflop in flops_by_kind(args.frames, height, width).items():
        print(f'{kind:20} {tflop:7.3f} TFLOP')


if __name__ == '__main__':
    main()
