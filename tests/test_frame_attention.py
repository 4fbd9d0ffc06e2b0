"""The Triton temporal-attention kernel against SDPA.

No GPU here: Triton's interpreter runs the same kernel code with NumPy.
"""

import subprocess
import sys

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


def test_windows_kernel_equals_float32_windowed_attention():
    # (pixels, frames, heads, head size, window, stride): FreeNoise's 16 and 4, the last window off the stride;
    # windows shorter than a block (masked rows and keys) and longer than 16 rows
    out = run_interpreted('''
        import torch
        from modelscope_t2v.models.frame_attention import multi_head_sdpa
        from modelscope_t2v.models.frame_windows import window_scales, windowed
        torch.manual_seed(0)
        for n, frames, heads, d, window, stride in [(2, 25, 2, 64, 16, 4), (3, 40, 1, 32, 16, 4),
                                                    (2, 20, 3, 16, 5, 3), (1, 33, 1, 64, 20, 7)]:
            q, k, v = (t.unflatten(-1, (heads, d)) for t in torch.randn(n, frames, 3 * heads * d).half().chunk(3, -1))
            scales = window_scales(frames, window, stride)
            out = torch.ops.modelscope_t2v.frame_attention_in_windows(q, k, v, scales, stride)
            assert out.shape == q.shape and out.is_contiguous()
            ref = windowed(multi_head_sdpa, window, stride)(q.float(), k.float(), v.float())
            print((out.float() - ref).abs().max().item())
    ''')
    errors = [float(line) for line in out.split()]
    print('max |kernel - float32 windowed attention| per shape:', errors)
    assert len(errors) == 4 and max(errors) < 4e-3  # float16 inputs and output: rounding ~1e-3


def test_unet_in_windows_with_kernel_equals_unet_with_sdpa():
    # 24 frames in windows of 8, 3 apart: starts 0, 3, .., 15 and 16
    err, = tiny_unet_kernel_vs_plain(
        'from modelscope_t2v.models import frame_attention; '
        'frame_attention.kernel_serves = lambda q, length=None: True',
        latents=UNET_LATENTS['24x5x9'], setup='unet.set_temporal_window(8, 3)')
    print(f'tiny UNet3D, windowed temporal attention in the kernel vs SDPA (float32): {err:.2e}')
    assert err < 1e-5


def test_cpu_runs_sdpa_unchanged():
    q, k, v = torch.randn(3, 4, 16, 2, 32, generator=torch.Generator().manual_seed(2)).unbind(0)
    assert not fa.kernel_serves(q)
    assert torch.equal(fa.frame_attention(q, k, v), fa.multi_head_sdpa(q, k, v))


def test_windowed_unet_compiles_to_one_kernel_call_per_temporal_attention():
    # a long video's compiled UNet: one graph holding one windows-kernel call per temporal attention, not a
    # call and a blend per window (which made the graph thousands of calls at 256 frames)
    out = run_interpreted('''
        import collections
        import torch
        from modelscope_t2v.config import TINY
        from modelscope_t2v.models import frame_attention, unet3d
        from reference import randomize_, rel_err

        frame_attention.kernel_serves = lambda q, length=None: True
        unet = randomize_(unet3d.UNet3D(TINY.unet), 0).eval()
        unet.set_temporal_window(8, 3)
        calls = collections.Counter()

        def counting_backend(graph_module, inputs):
            calls.update(str(node.target) for node in graph_module.graph.nodes if node.op == 'call_function')
            return graph_module

        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 24, 5, 9, generator=g)
        context = torch.randn(1, 77, TINY.unet.context_dim, generator=g)
        t = torch.tensor([981])
        with torch.no_grad():
            eager = unet(x, t, context)
            compiled = torch.compile(unet, backend=counting_backend, fullgraph=True)(x, t, context)
        kernel_calls = sum(n for target, n in calls.items() if 'frame_attention_in_windows' in target)
        print(rel_err(compiled, eager), kernel_calls, 2 * len(unet.temporal_blocks), sum(calls.values()))
    ''')
    err, kernel_calls, temporal_attentions, graph_calls = (float(v) for v in out.split())
    print(f'compiled vs eager {err:.1e}; {kernel_calls:.0f} kernel calls for {temporal_attentions:.0f} temporal '
          f'attentions; {graph_calls:.0f} calls in the graph')
    assert err < 1e-6 and kernel_calls == temporal_attentions > 0


def test_ops_fake_shapes_match_the_kernels():
    # torch.library.opcheck: schema, fake (meta) outputs against the kernel's, and tracing by torch.compile
    out = run_interpreted('''
        import torch
        from modelscope_t2v.models.frame_windows import window_scales
        torch.manual_seed(0)
        q, k, v = (t.unflatten(-1, (2, 16)) for t in torch.randn(3, 20, 3 * 2 * 16).half().chunk(3, -1))
        torch.library.opcheck(torch.ops.modelscope_t2v.frame_attention, (q, k, v))
        torch.library.opcheck(torch.ops.modelscope_t2v.frame_attention_in_windows, (q, k, v, window_scales(20, 8, 3), 3))
        print('checked')
    ''')
    assert out.split() == ['checked']


def test_importing_the_package_leaves_inductor_unimported():
    # the kernels' ops register without torch.compile's machinery (0.9 s of import on the project's CPU)
    script = ('import sys, modelscope_t2v, modelscope_t2v.models.frame_attention; '
              'print(sorted(name for name in ("torch._dynamo", "torch._inductor") if name in sys.modules))')
    imported = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True).stdout
    assert imported.strip().splitlines()[-1] == '[]'
