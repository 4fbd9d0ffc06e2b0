"""The temporal-conv stages of one guided UNet3D step: the fused Triton kernel against the op-by-op stage.

    python bench/frame_conv.py        # GPU

A stage is GroupNorm, SiLU and a (3, 1, 1) conv over 16 frames. For each width of the real
model (batch 2, latent 32x32) prints the microseconds per stage, CUDA-graph replayed
(triton.testing.do_bench_cudagraph medians), of
- the kernel alone at each tile configuration (norm statistics precomputed),
- the whole stage compiled op by op (norm, SiLU, taps GEMM, frame-shifted sum: the previous path),
- the whole stage compiled with the kernel at the module's configuration,
the error of each against the float32 stage, and the sums over one step's 88 stages.
"""
import torch
from torch import nn
from triton.testing import do_bench_cudagraph

from modelscope_t2v.models import frame_conv
from modelscope_t2v.models.unet3d import frame_conv_as_gemm, frame_major_weight, store_frame_major

# (channels, latent side, stages per step) of the real model: 4 stages per ResBlock
SHAPES = [(320, 32, 20), (640, 16, 20), (1280, 8, 20), (1280, 4, 28)]
BATCH, FRAMES = 2, 16
CONFIGS = [(64, 128, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4), (64, 64, 4, 4),
           (128, 256, 8, 3)]   # BLOCK_M, BLOCK_N, WARPS, STAGES


def op_by_op(x, norm, conv):
    return frame_conv_as_gemm(nn.functional.silu(norm(x)), conv)


def fused(x, norm, conv):
    return frame_conv.fused_stage(x, norm, frame_major_weight(conv).unflatten(0, (3, conv.out_channels)), conv.bias)


def cuda_graph_us(fn):
    return do_bench_cudagraph(fn, rep=200) * 1e3


torch.backends.cudnn.allow_tf32 = False   # a float32 reference
frame_conv.NORM_IN_KERNEL = False
torch.manual_seed(0)
totals = {'op by op, compiled': 0.0, 'fused, compiled': 0.0}
best_kernel = dict.fromkeys(CONFIGS, 0.0)
for c, side, calls in SHAPES:
    norm = nn.GroupNorm(32, c).cuda()
    nn.init.normal_(norm.weight, 1.0, 0.2)
    nn.init.normal_(norm.bias, 0.0, 0.2)
    conv = nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)).cuda()
    x32 = torch.randn(BATCH, c, FRAMES, side, side, device='cuda') * 1.5 + 0.3
    ref = conv(nn.functional.silu(norm(x32)))
    norm, conv = norm.half(), conv.half()
    store_frame_major(conv)
    x = x32.half().contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        scale, shift = frame_conv.norm_scale_shift(x, norm)
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, c)
        taps = frame_major_weight(conv).unflatten(0, (3, c))
        for config in CONFIGS:
            frame_conv.BLOCK_M, frame_conv.BLOCK_N, frame_conv.WARPS, frame_conv.STAGES = config
            try:
                us = cuda_graph_us(lambda: torch.ops.modelscope_t2v.frame_conv(rows, scale, shift, taps, conv.bias,
                                                                                side * side))
            except Exception as error:  # e.g. out of shared memory for this tile
                print(f'c={c:4d} {side:2d}x{side:<2d} kernel {config} failed: {str(error)[:80]}')
                us = float('inf')
            best_kernel[config] += us * calls
            print(f'c={c:4d} {side:2d}x{side:<2d} x{calls}  kernel {config}  {us:7.1f} us', flush=True)
        frame_conv.BLOCK_M, frame_conv.BLOCK_N, frame_conv.WARPS, frame_conv.STAGES = min(best_kernel,
                                                                                           key=best_kernel.get)
        for name, fn in (('op by op, compiled', op_by_op), ('fused, compiled', fused)):
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False)
            err = ((compiled(x, norm, conv).float() - ref).abs().max() / ref.abs().max()).item()
            us = cuda_graph_us(lambda: compiled(x, norm, conv))
            totals[name] += us * calls
            print(f'c={c:4d} {side:2d}x{side:<2d} x{calls}  {name:20s} {us:7.1f} us  max rel err {err:.1e}',
                  flush=True)
print('per step (all 88 stages):')
for config, us in sorted(best_kernel.items(), key=lambda item: item[1])[:5]:
    print(f'  kernel alone {config}: {us / 1e3:6.3f} ms')
for name, us in totals.items():
    print(f'  {name:20s} {us / 1e3:6.3f} ms')
