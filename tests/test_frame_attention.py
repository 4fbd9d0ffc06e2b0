"""The Triton temporal-attention kernel against SDPA.

No GPU here: Triton's interpreter runs the same kernel code with NumPy.
"""

import pytest
import torch
from interpreted import UNET_LATENTS, run_interpreted, tiny_unet_kernel_vs_plain

from modelscope_t2v.models import frame_attention as fa


def test_kernel_equals_float32_attention():
    # (pixels, frames, heads, head size): the model's 16 frames; fewer and more frames
    # than a block (masked rows and keys); every head size the kernel takes.
    out = run_interpreted('''
        import torch
        from modelscope_t2v.models.frame_attention import multi_head_sdpa
        torch.manual_seed(0)
        for n, frames, heads, d in [(3, 16, 2, 64), (2, 5, 3, 16), (2, 20, 1, 32), (1, 16, 1, 128)]:
            # q, k, v as the projections leave them: strided views of one (n, l, 3 heads d) tensor
            q, k, v = (t.unflatten(-1, (heads, d)) for t in torch.randn(n, frames, 3 * heads * d).half().chunk(3, -1))
            out = torch.ops.modelscope_t2v.frame_attention(q, k, v)
            assert out.shape == q.shape and out.is_contiguous()
            ref = multi_head_sdpa(q.float(), k.float(), v.float())
            print((out.float() - ref).abs().max().item())
    ''')
    errors = [float(line) for line in out.split()]
    print('max |kernel - float32 attention| per shape:', errors)
    assert len(errors) == 4 and max(errors) < 4e-3  # float16 inputs and output: rounding ~1e-3


@pytest.mark.parametrize('latents', UNET_LATENTS)
def test_unet_with_kernel_equals_unet_with_sdpa(latents):
    err, = tiny_unet_kernel_vs_plain(
        'from modelscope_t2v.models import frame_attention; frame_attention.kernel_serves = lambda q: True',
        latents=UNET_LATENTS[latents])
    print(f'tiny UNet3D, temporal attention in the kernel vs SDPA (float32): {err:.2e}')
    assert err < 1e-5


def test_cpu_runs_sdpa_unchanged():
    q, k, v = torch.randn(3, 4, 16, 2, 32, generator=torch.Generator().manual_seed(2)).unbind(0)
    assert not fa.kernel_serves(q)
    assert torch.equal(fa.frame_attention(q, k, v), fa.multi_head_sdpa(q, k, v))
