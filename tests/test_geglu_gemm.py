"""The one-kernel GEGLU (projection, gate and product in one Triton kernel) against linear + gelu.

No GPU here: Triton's interpreter runs the same kernel code with NumPy.
"""

import warnings

import torch
from interpreted import run_interpreted

from modelscope_t2v.models import geglu_gemm as gg


def test_kernel_equals_float32_geglu():
    # (rows, input width, output width): whole tiles; rows and columns past a tile's end (masked)
    out = run_interpreted('''
        import torch
        from modelscope_t2v.models.geglu_gemm import geglu_reference
        torch.manual_seed(0)
        for m, k, n in [(256, 128, 128), (200, 64, 40), (3, 192, 130)]:
            x = torch.randn(m, k).half()
            w, b = (torch.randn(2 * n, k) / k ** 0.5).half(), torch.randn(2 * n).half()
            out = torch.ops.modelscope_t2v.geglu_gemm(x, w, b)
            assert out.shape == (m, n) and out.dtype == torch.float16
            ref = geglu_reference(x.float(), w.float(), b.float())
            print((out.float() - ref).abs().max().item() / ref.abs().max().item())
    ''')
    errors = [float(line) for line in out.split()]
    print('max |kernel - float32 GEGLU| / max |GEGLU| per shape:', errors)
    assert len(errors) == 3 and max(errors) < 1e-3  # float16 output: half an ulp is 2.4e-4 of the value


def test_unet_with_kernel_equals_unet_with_linear_and_gelu():
    out = run_interpreted('''
        import torch
        from modelscope_t2v.config import TINY
        from modelscope_t2v.models import geglu_gemm
        from modelscope_t2v.models.unet3d import UNet3D
        from reference import randomize_, rel_err
        unet = randomize_(UNet3D(TINY.unet), 0).eval()
        g = torch.Generator().manual_seed(1)
        x, context = torch.randn(2, 4, 16, 8, 8, generator=g), torch.randn(2, 77, TINY.unet.context_dim, generator=g)
        t = torch.tensor([981, 21])
        with torch.no_grad():
            plain = unet(x, t, context)
            geglu_gemm.BLOCK_K = 32                              # the tiny model's widths are 32 and 64
            geglu_gemm.kernel_serves = lambda x, weight: True    # the kernel on the CPU, interpreted
            print(rel_err(unet(x, t, context), plain))
    ''')
    err = float(out)
    print(f'tiny UNet3D, GEGLU in the kernel vs linear + gelu (float32): {err:.2e}')
    assert err < 1e-5


def test_cpu_runs_linear_and_gelu_unchanged():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(5, 64, generator=g), torch.randn(2 * 16, 64, generator=g), torch.randn(2 * 16, generator=g)
    assert not gg.kernel_serves(x, w)
    out = gg.geglu(x, w, b)
    a, gate = (x @ w.T + b).chunk(2, dim=-1)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out, a * torch.nn.functional.gelu(gate), rtol=1e-6, atol=1e-6)


def test_a_kernel_that_cannot_run_warns_and_leaves_linear_and_gelu():
    gg.kernel_works.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert gg.kernel_works(torch.device('cpu')) is False   # Triton has no CPU driver
    assert any('runs as linear + gelu' in str(w.message) for w in caught)
