"""The Triton GEGLU kernel against F.linear + F.gelu.

No GPU here: Triton's interpreter runs the same kernel code with NumPy.
"""

import pytest
import torch
from interpreted import UNET_LATENTS, run_interpreted, tiny_unet_kernel_vs_plain

from modelscope_t2v.models import geglu as geglu_lib


def test_kernel_equals_float32_geglu():
    # (rows, input width, output width): several tiles per program, ragged last row tile, an input width
    # that is no multiple of BLOCK_K (zero-filled loads), output widths under MAX_HALF
    out = run_interpreted('''
        import torch
        from modelscope_t2v.models import geglu
        geglu.processors = lambda device: 3   # fewer programs than tiles: each loops
        torch.manual_seed(0)
        for m, k, n in [(300, 64, 256), (40, 200, 48), (129, 320, 128)]:
            x = torch.randn(m, k).half()
            weight, bias = (torch.randn(2 * n, k) / k ** 0.5).half(), (torch.randn(2 * n) * 0.1).half()
            out = torch.ops.modelscope_t2v.geglu(x, weight, bias)
            assert out.shape == (m, n) and out.dtype == torch.float16
            ref = geglu.plain_geglu(x.float(), weight.float(), bias.float())
            print(((out.float() - ref).abs().max() / ref.abs().max()).item())
        # x a view 6 bytes into its storage (TMA needs 16-byte aligned starts): the same result
        shifted = torch.cat([torch.zeros(3).half(), x.flatten()])[3:].view(m, k)
        assert shifted.data_ptr() % 16 and torch.equal(torch.ops.modelscope_t2v.geglu(shifted, weight, bias), out)
    ''')
    errors = [float(line) for line in out.split()]
    print('max |kernel - float32 GEGLU| / max |GEGLU| per shape:', errors)
    assert len(errors) == 3 and max(errors) < 2e-3   # float16 inputs and output: rounding ~5e-4


def test_kernel_gelu_equals_exact_erf_gelu():
    # a = 1 (zero a rows, bias 1) and g = x (identity g rows), in float32: the output is the kernel's gelu alone
    out = run_interpreted('''
        import torch
        import modelscope_t2v.models.geglu   # registers the op
        g = torch.linspace(-10, 10, 16 * 1024).view(-1, 16)
        weight = torch.cat([torch.zeros(16, 16), torch.eye(16)])
        bias = torch.cat([torch.ones(16), torch.zeros(16)])
        out = torch.ops.modelscope_t2v.geglu(g, weight, bias).double()
        exact = 0.5 * g.double() * (1 + torch.erf(g.double() / 2 ** 0.5))
        print((out - exact).abs().max().item(), ((out - exact).abs() / exact.abs())[exact.abs() > 1e-3].max().item())
    ''')
    absolute, relative = (float(v) for v in out.split())
    print(f'kernel gelu vs float64 erf gelu on [-10, 10]: max abs {absolute:.1e}, '
          f'max rel {relative:.1e} where |gelu| > 1e-3')
    assert absolute < 1e-6 and relative < 2.5e-4   # erfc to 1.5e-7 (A&S 7.1.26); float16 resolves 4.9e-4


@pytest.mark.parametrize('latents', UNET_LATENTS)
def test_unet_with_kernel_equals_unet_with_linear(latents):
    err, calls = tiny_unet_kernel_vs_plain(
        'from modelscope_t2v.models import geglu; calls = []; '
        'geglu.kernel_serves = lambda x, weight: calls.append(x.shape) or True', report='len(calls)',
        latents=UNET_LATENTS[latents])
    print(f'tiny UNet3D (float32), {calls:.0f} GEGLU calls in the kernel vs F.linear: {err:.2e}')
    assert calls > 0 and err < 1e-5


def test_cpu_runs_linear_unchanged():
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(3, 5, 32, generator=g), torch.randn(64, 32, generator=g), torch.randn(64, generator=g)
    assert not geglu_lib.kernel_serves(x, weight)
    a, gate = (x @ weight.T + bias).chunk(2, dim=-1)
    torch.testing.assert_close(geglu_lib.geglu(x, weight, bias), a * torch.nn.functional.gelu(gate))


def test_output_columns_per_tile():
    assert [geglu_lib.output_columns_per_tile(n) for n in (1280, 2560, 5120, 48, 16)] == [128, 128, 128, 16, 16]
