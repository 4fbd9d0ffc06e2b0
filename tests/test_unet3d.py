"""UNet3D against ModelScope's UNetSD, run side by side with identical random weights."""

import pytest
import torch

from modelscope_t2v.config import FULL, TINY, replace
from modelscope_t2v.models.layers import FeedForward, addmm_
from modelscope_t2v.models.unet3d import UNet3D
from reference import randomize_, reference_unet, rel_err

# The original's decoder hard-codes context_dim 1024: parity runs use that width.
TINY_1024 = replace(TINY.unet, context_dim=1024)
TOLERANCE = 1e-5  # float32, same operations up to summation order


def _pair(config, seed=0):
    ref = randomize_(reference_unet(config), seed)
    ours = UNet3D(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize('frames,size', [(16, 32), (5, 16)])
def test_forward_matches_reference(frames, size):
    ours, ref = _pair(TINY_1024)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, size, size, generator=g)
    t = torch.tensor([981, 21])
    context = torch.randn(2, 77, 1024, generator=g)
    with torch.no_grad():
        expected = ref(x, t, y=context)
        got = ours(x, t, context)
    err = rel_err(got, expected)
    print(f'UNet3D tiny forward f={frames} {size}x{size}: worst relative error {err:.2e}')
    assert got.shape == expected.shape
    assert err < TOLERANCE


def test_without_temporal_attention_matches_reference():
    ours, ref = _pair(replace(TINY_1024, temporal_attention=False))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 4, 16, 16, generator=g)
    context = torch.randn(1, 77, 1024, generator=g)
    with torch.no_grad():
        err = rel_err(ours(x, torch.tensor([500]), context), ref(x, torch.tensor([500]), y=context))
    assert err < TOLERANCE


@pytest.mark.parametrize('channels_last', [False, True])
def test_two_texts_per_video_equal_two_passes_and_share_the_layers_before_the_text(channels_last):
    """Guidance's batch: the layers before the first cross-attention run once per video."""
    model = randomize_(UNet3D(TINY.unet).eval(), seed=5)
    if channels_last:
        model.to_channels_last()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 8, 8, generator=g)
    t = torch.tensor([981, 500])
    texts = torch.randn(4, 77, TINY.unet.context_dim, generator=g)   # text-major: 2 texts x 2 videos
    rows_seen = []
    hook = model.input_blocks[1][0].register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    with torch.no_grad():
        shared = model(x, t, texts)
        hook.remove()
        per_text = torch.cat([model(x, t, texts[:2]), model(x, t, texts[2:])])
    err = rel_err(shared, per_text)
    print(f'two texts per video in one pass against one pass per text: {err:.2e}')
    assert shared.shape == (4, 4, 5, 8, 8)
    assert rows_seen == [2 * 5]            # the first ResBlock ran on b f rows, not k b f
    assert err < TOLERANCE
    with pytest.raises(ValueError, match='3 texts for 2 videos'):
        model(x, t, texts[:3])


def test_odd_latent_size_runs():
    """A 40x24 latent (320x192 pixels) does not divide by 2**levels everywhere in FULL, but
    in the tiny model 2 levels: 13x7 latents exercise the skip-size upsampling."""
    model = randomize_(UNet3D(TINY.unet).eval())
    x = torch.randn(1, 4, 3, 13, 7)
    with torch.no_grad():
        out = model(x, torch.tensor([10]), torch.randn(1, 77, TINY.unet.context_dim))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_full_size_structure_matches_reference():
    with torch.device('meta'):
        ours = UNet3D(FULL.unet)
        ref = reference_unet(FULL.unet)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    n = sum(v.numel() for v in ours.state_dict().values())
    print(f'UNet3D full size: {n / 1e6:.1f} M parameters')
    assert 1.3e9 < n < 1.5e9


def test_feed_forward_adds_its_residual_in_place_of_its_gemm_output():
    g = torch.Generator().manual_seed(3)
    ff = randomize_(FeedForward(16), 3)
    x, residual = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ff(x, residual), ff.net(x) + residual, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(f().sum(), ff.net[2].weight)[0] for f in (lambda: ff(x, residual),
                                                                           lambda: ff.net(x) + residual)]
    torch.testing.assert_close(*grads, rtol=1e-6, atol=1e-6)   # with gradients on, out of place
    acc, a, b = torch.randn(4, 3, generator=g), torch.randn(4, 6, generator=g), torch.randn(6, 3, generator=g)
    expected, storage = acc + a @ b, acc.data_ptr()
    addmm_(acc, a, b)
    assert acc.data_ptr() == storage
    torch.testing.assert_close(acc, expected, rtol=1e-6, atol=1e-6)


def test_remembered_text_equals_the_text_passed_at_each_call():
    """A generation projects its texts' keys and values once (remember_text), then calls without a context."""
    model = randomize_(UNet3D(TINY.unet).eval(), seed=7)
    g = torch.Generator().manual_seed(8)
    x, t = torch.randn(1, 4, 5, 8, 8, generator=g), torch.tensor([981])
    first, second = (torch.randn(2, 77, TINY.unet.context_dim, generator=g) for _ in range(2))
    with torch.no_grad():
        with pytest.raises(ValueError, match='remember_text'):
            model(x, t)
        model.remember_text(first)
        assert torch.equal(model(x, t), model(x, t, first))
        keys = model.input_blocks[1][1].transformer_blocks[0].attn2.text_k
        storage = keys.data_ptr()
        model.remember_text(second)   # same shape: written in place, where a CUDA graph reads them
        assert keys.data_ptr() == storage and model.remembered_texts == 2
        assert torch.equal(model(x, t), model(x, t, second))
    assert set(model.state_dict()) == set(UNet3D(TINY.unet).state_dict())   # not saved with the weights


def test_temporal_window_set_again_keeps_the_attention_functions():
    """Setting the window a generation already has changes nothing, so a compiled UNet keeps its graph; each
    temporal attention gets the new function when the window changes, and the trained one back with None."""
    model = UNet3D(TINY.unet)
    blocks = [m.transformer_blocks[0] for m in model.modules() if type(m).__name__ == 'TemporalTransformer']
    trained = blocks[0].attn1.attend
    model.set_temporal_window(8, 2)
    windowed = blocks[0].attn1.attend
    assert windowed is not trained
    model.set_temporal_window(8, 2)
    assert all(b.attn1.attend is windowed and b.attn2.attend is windowed for b in blocks)
    model.set_temporal_window(None)
    assert all(b.attn1.attend is trained and b.attn2.attend is trained for b in blocks)
    assert len(blocks) == len(model.temporal_blocks) > 0
