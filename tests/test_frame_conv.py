"""The Triton temporal-conv kernel against the (3, 1, 1) Conv3d.

No GPU here: Triton's interpreter runs the same kernel code with NumPy.
"""

import pytest
from interpreted import UNET_LATENTS, run_interpreted, tiny_unet_kernel_vs_plain

from modelscope_t2v.models import frame_conv as frame_conv_lib


def test_kernel_equals_float32_conv3d():
    # (videos, input channels, output channels, frames, h, w): several tiles per program; a ragged last row
    # tile (90 rows); input channels no multiple of BLOCK_K (zero-filled loads); one frame (only tap 1 lands);
    # two videos, whose frames must not leak into each other at their ends; loads of 128 channels (c = 256);
    # zeroscope's 24 frames at an odd 5x9 pixels
    out = run_interpreted('''
        import torch
        from modelscope_t2v.models import frame_conv
        frame_conv.processors = lambda device: 3   # fewer programs than tiles: each loops
        torch.manual_seed(0)
        shapes = [(2, 64, 96, 3, 5, 6), (1, 72, 32, 1, 4, 4), (2, 16, 256, 4, 8, 8), (1, 256, 40, 3, 3, 3),
                  (1, 64, 32, 24, 5, 9)]
        for b, c, co, f, h, w in shapes:
            conv = torch.nn.Conv3d(c, co, (3, 1, 1), padding=(1, 0, 0))
            x = torch.randn(b, c, f, h, w).half()
            rows = x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
            taps = conv.weight.detach().permute(2, 0, 1, 3, 4).reshape(3, co, c).half()
            out = torch.ops.modelscope_t2v.frame_conv(rows, taps, conv.bias.detach().half(), h * w)
            assert out.shape == (b, f * h * w, co) and out.dtype == torch.float16
            with torch.no_grad():
                ref = conv(x.float()).permute(0, 2, 3, 4, 1).reshape(b, f * h * w, co)
            print(((out.float() - ref).abs().max() / ref.abs().max()).item())
        # rows a view 6 bytes into its storage (TMA needs 16-byte aligned starts): the same result
        shifted = torch.cat([torch.zeros(3).half(), rows.flatten()])[3:].view(rows.shape)
        assert shifted.data_ptr() % 16
        assert torch.equal(torch.ops.modelscope_t2v.frame_conv(shifted, taps, conv.bias.detach().half(), h * w), out)
    ''')
    errors = [float(line) for line in out.split()]
    print('max |kernel - float32 Conv3d| / max |Conv3d| per shape:', errors)
    assert len(errors) == 5 and max(errors) < 2e-3   # float16 inputs and output: rounding ~5e-4


@pytest.mark.parametrize('latents', UNET_LATENTS)
def test_unet_with_kernel_equals_plain_unet(latents):
    err, calls = tiny_unet_kernel_vs_plain(
        'from modelscope_t2v.models import frame_conv; calls = []; unet.to_channels_last(); '
        'frame_conv.kernel_serves = lambda rows, taps: calls.append(rows.shape) or True', report='len(calls)',
        latents=UNET_LATENTS[latents])
    print(f'tiny UNet3D (float32), {calls:.0f} temporal convs in the kernel vs Conv3d: {err:.2e}')
    assert calls > 0 and err < 3e-5   # float32, the same products summed in another order


def test_tiles_and_where_the_kernel_serves():
    assert [frame_conv_lib.output_columns_per_tile(co) for co in (320, 640, 1280, 96, 8)] == [128, 128, 128, 128, 16]
    assert [frame_conv_lib.k_loop(c) for c in (320, 640, 1280, 72)] == [(64, 4), (128, 3), (128, 3), (64, 4)]
    # the real UNet's calls, 2 videos of 16 frames (1 before the first cross-attention): 32x32 to 4x4 pixels
    calls = [(2, 16 * 1024, 320), (1, 16 * 1024, 320), (2, 16 * 256, 640), (2, 16 * 64, 1280), (2, 16 * 16, 1280)]
    counts = [frame_conv_lib.tiles(*call) for call in calls]
    assert counts == [768, 384, 320, 160, 40]
    sms = 132   # an H200's
    assert [n >= frame_conv_lib.MIN_TILES_PER_SM * sms for n in counts] == [True, True, True, False, False]
