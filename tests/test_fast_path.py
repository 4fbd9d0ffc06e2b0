"""The GPU fast path (channels-last, temporal convs as GEMMs, torch.compile) against the plain UNet3D.

The CUDA-graph replay cannot run here; what the CPU can check is that the
rewritten arithmetic and the compiled graph compute what the plain path does.
"""

import collections
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from modelscope_t2v import parse_request
from modelscope_t2v.config import TINY
from modelscope_t2v.models.autoencoder import AutoencoderKL
from modelscope_t2v.models.group_norm import GroupNorm, group_norm_per_channel_stats
from modelscope_t2v.models.unet3d import TemporalConv, UNet3D, frame_conv_as_gemm, frame_major_weight
from modelscope_t2v.text_to_video import TextToVideo, compile_mode, compile_options, use_torchs_ptxas
from reference import randomize_, rel_err

TOLERANCE = 3e-5  # float32, the same products summed in another order (worst seen: 8e-6)


def _models(seed=0):
    plain = randomize_(UNet3D(TINY.unet), seed).eval()
    fast = copy.deepcopy(plain).to_channels_last()
    return plain, fast


def _inputs(frames=16, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, frames, size, size, generator=g)
    context = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    return x, torch.tensor([981, 21]), context


@pytest.mark.parametrize('frames', [1, 2, 7])
@pytest.mark.parametrize('channels_last', [False, True])
def test_frame_conv_as_gemm_equals_conv3d(frames, channels_last):
    conv = randomize_(torch.nn.Conv3d(64, 96, (3, 1, 1), padding=(1, 0, 0)), seed=3)
    x = torch.randn(2, 64, frames, 5, 6, generator=torch.Generator().manual_seed(4))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    err = rel_err(frame_conv_as_gemm(x, conv), conv(x))
    print(f'temporal conv as GEMM, {frames} frames, channels_last={channels_last}: {err:.2e}')
    assert err < TOLERANCE


@pytest.mark.parametrize('shape', [(4, 64, 8, 8), (2, 64, 5, 6, 7)])
@pytest.mark.parametrize('offset,scale,tolerance', [(0.0, 1.0, 1e-6), (100.0, 0.1, 1e-4)])
def test_group_norm_per_channel_stats_equals_group_norm(shape, offset, scale, tolerance):
    """Against float64 GroupNorm; with a large mean (100, std 0.1) float32 itself errs by ~4e-5."""
    g = torch.Generator().manual_seed(7)
    per_channel_offsets = torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=g)
    x = (torch.randn(shape, generator=g) + per_channel_offsets) * scale + offset
    weight, bias = torch.randn(2, 64, generator=g)
    expected = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
    got = group_norm_per_channel_stats(x.contiguous(memory_format=_channels_last(x)), 32, weight, bias, 1e-6)
    native = F.group_norm(x, 32, weight, bias, 1e-6)
    errors = rel_err(got.double(), expected), rel_err(native.double(), expected)
    print(f'GroupNorm {shape}, mean {offset}: per-channel statistics {errors[0]:.1e}, native {errors[1]:.1e}')
    assert errors[0] < tolerance


def _channels_last(x):
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def test_to_channels_last_keeps_keys_and_values_and_stores_taps_first():
    plain, fast = _models()
    before, after = plain.state_dict(), fast.state_dict()
    assert list(before) == list(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    convs = [stage[-1] for m in fast.modules() if isinstance(m, TemporalConv)
             for stage in (m.conv1, m.conv2, m.conv3, m.conv4)]
    assert len(convs) == 4 * sum(isinstance(m, TemporalConv) for m in fast.modules()) > 0
    for conv in convs:  # the GEMM's (3 co, ci) weight is the parameter's own memory, not a copy
        gemm_weight = frame_major_weight(conv)
        assert gemm_weight.is_contiguous() and gemm_weight.data_ptr() == conv.weight.data_ptr()
    norms = [m for m in fast.modules() if isinstance(m, GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in fast.modules()) > 0
    assert all(norm.per_channel_stats for norm in norms)
    assert not any(norm.per_channel_stats for norm in plain.modules() if isinstance(norm, GroupNorm))


@pytest.mark.parametrize('frames,size', [(16, 32), (3, 24)])
def test_channels_last_unet_equals_plain(frames, size):
    plain, fast = _models()
    x, t, context = _inputs(frames, size)
    with torch.no_grad():
        expected, got = plain(x, t, context), fast(x, t, context)
    err = rel_err(got, expected)
    print(f'channels-last UNet3D, {frames} frames {size}x{size}: worst relative error {err:.2e}')
    assert got.is_contiguous()
    assert err < TOLERANCE


@pytest.mark.parametrize('channels_last', [False, True])
def test_every_linear_map_is_one_matrix_product(monkeypatch, channels_last):
    """No batched product of tiny matrices with a broadcast weight in the UNet's graph.

    torch.matmul picks one for permuted token views: on an H200 that took 18 ms of a
    53 ms step (docs/benchmarks.md). Which inputs are permuted depends on the layout
    GroupNorm returns (CUDA's returns NC... contiguous, so the test does the same) and on
    whether weights require grad (the engine's do not).
    """
    group_norm = F.group_norm
    monkeypatch.setattr(F, 'group_norm', lambda *args, **kwargs: group_norm(*args, **kwargs).contiguous())
    plain, fast = _models()
    x, t, context = _inputs(frames=4, size=8)
    graph = make_fx((fast if channels_last else plain).requires_grad_(False))(x, t, context)
    ops = collections.Counter(node.target for node in graph.graph.nodes if node.op == 'call_function')
    print('matrix products:', {str(op): n for op, n in ops.items() if 'mm' in str(op)})
    assert ops[torch.ops.aten.mm.default] + ops[torch.ops.aten.addmm.default] > 100
    assert ops[torch.ops.aten.bmm.default] == 0


@pytest.mark.slow
def test_compiled_channels_last_unet_equals_plain():
    plain, fast = _models()
    compiled = torch.compile(fast, dynamic=False, options=compile_options('default'))  # inductor's CPU backend
    x, t, context = _inputs(frames=8, size=16)
    x, t = x[:1], t[:1]    # as guidance calls it: one video, two texts
    with torch.no_grad():
        expected = plain(x, t, context)
        first, second = compiled(x, t, context), compiled(x, t + 100, context)
        expected_second = plain(x, t + 100, context)
    errors = rel_err(first, expected), rel_err(second, expected_second)
    print(f'compiled channels-last UNet3D: worst relative errors {errors[0]:.2e}, {errors[1]:.2e}')
    assert max(errors) < TOLERANCE


def test_compile_options_are_the_modes_deterministic():
    assert compile_options('reduce-overhead') == {'triton.cudagraphs': True, 'deterministic': True}
    assert compile_options('default') == {'deterministic': True}
    modes = [compile_mode(c) for c in (False, None, True, 'reduce-overhead')]
    assert modes == [None, None, 'default', 'reduce-overhead']


def test_triton_is_pointed_at_torchs_ptxas_before_compiling(tmp_path, monkeypatch):
    """The ptxas is part of Triton's cache key and inductor sets TRITON_PTXAS_PATH only when it first compiles:
    compile_networks sets it first, so our kernels compile alike in every process; a value set is kept."""
    monkeypatch.delenv('TRITON_PTXAS_PATH', raising=False)
    use_torchs_ptxas(str(tmp_path))   # no bin/ptxas in this torch: Triton keeps its own
    assert 'TRITON_PTXAS_PATH' not in os.environ
    ptxas = tmp_path / 'bin' / 'ptxas'
    ptxas.parent.mkdir()
    ptxas.write_text('#!/bin/sh\n')
    ptxas.chmod(0o755)
    use_torchs_ptxas(str(tmp_path))
    assert os.environ['TRITON_PTXAS_PATH'] == str(ptxas)
    monkeypatch.setenv('TRITON_PTXAS_PATH', '/opt/cuda/bin/ptxas')
    use_torchs_ptxas(str(tmp_path))
    assert os.environ['TRITON_PTXAS_PATH'] == '/opt/cuda/bin/ptxas'


def test_unknown_compile_mode_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"compile='fast' is not a torch.compile mode.*'reduce-overhead'"):
        TextToVideo.from_pretrained(str(tmp_path / 'no-model-here'), compile='fast')


@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_compiled_decoder_keeps_keys_and_decodes_as_eager(mode):
    """With CUDA graphs (mode reduce-overhead; inductor's CPU backend runs without them) the decoder's
    GroupNorms take per-channel statistics and each decode's output is a copy."""
    autoencoder = randomize_(AutoencoderKL(TINY.autoencoder), 3).eval()
    keys = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    latents = torch.randn(1, TINY.autoencoder.z_channels, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = autoencoder.decode_video(latents, 2)
        autoencoder.compile_decoder(compile_options(mode))  # CPU backend; chunks of 2 and 1 frames: two graphs
        compiled = autoencoder.decode_video(latents, 2)
    after = autoencoder.state_dict()
    assert list(after) == list(keys) and all(torch.equal(after[k], v) for k, v in keys.items())
    norms = [m for m in autoencoder.decoder.modules() if isinstance(m, GroupNorm)]
    graphs = mode == 'reduce-overhead'
    assert len(norms) > 0 and all(norm.per_channel_stats == graphs for norm in norms)
    assert autoencoder.copies_decoder_output == graphs
    err = rel_err(compiled, plain)
    print(f'compiled channels-last decoder ({mode}) against eager: worst relative error {err:.2e}')
    assert compiled.shape == plain.shape and err < TOLERANCE


def test_compiled_networks_generate_the_frames_of_the_plain_engine(tiny_model_dir, tiny_engine):
    """compile_networks as from_pretrained applies it on CUDA, here with inductor's CPU backend: the text
    encoder, the channels-last UNet and the decoder compiled give the plain engine's frames, within one
    uint8 level (float32 sums in another order), and keep their checkpoint keys."""
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    keys = {name: list(getattr(engine, name).state_dict()) for name in ('text_encoder', 'autoencoder')}
    engine.compile_networks('default')
    assert {name: list(getattr(engine, name).state_dict()) for name in keys} == keys
    small = {'num_frames': 4, 'height': 64, 'width': 64, 'num_inference_steps': 3, 'seed': 7, 'output_type': 'frames'}
    request = {'text': 'a panda playing the guitar'}
    got = engine(parse_request(request, engine.config, **small)).frames[0].astype(int)
    expected = tiny_engine(parse_request(request, tiny_engine.config, **small)).frames[0].astype(int)
    print(f'compiled engine against plain: {np.count_nonzero(got != expected)} of {got.size} uint8 values differ')
    assert got.shape == expected.shape == (4, 64, 64, 3)
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize('mode,low_memory,graphs', [('reduce-overhead', False, True), ('reduce-overhead', True, False),
                                                    ('default', False, False)])
def test_decoder_has_cuda_graphs_where_the_unet_has_unless_low_memory(tiny_model_dir, mode, low_memory, graphs):
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu', low_memory=low_memory)
    engine.compile_networks(mode)   # torch.compile wraps now and compiles at the first call: none here
    assert engine.autoencoder.copies_decoder_output == graphs


def test_compiled_networks_reshape_without_einops():
    """torch.compile traces einops' pattern parsing at every rearrange (models/layers.py): the UNet, plain and
    channels-last, and the text encoder reshape with torch's view ops, so einops' recipe cache sees no call."""
    import einops.einops
    from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder
    from modelscope_t2v.tokenizer import tokenize
    recipes = einops.einops._prepare_transformation_recipe
    plain, fast = _models()
    text_encoder = OpenCLIPTextEncoder(TINY.text).eval()
    calls_before = sum(recipes.cache_info()[:2])   # hits + misses
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 77, TINY.unet.context_dim, generator=g)
    with torch.no_grad():
        for unet in (plain, fast):
            unet(x, torch.tensor([5]), context)
        text_encoder(tokenize(['a panda eating bamboo']))
    assert sum(recipes.cache_info()[:2]) == calls_before
