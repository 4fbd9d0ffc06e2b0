"""Autoencoder: parity with ModelScope's AutoencoderKL, chunked video decode, full-size keys."""

import time

import pytest
import torch
from reference import reference_autoencoder, rel_err

from modelscope_t2v.config import FULL, TINY, AutoencoderConfig
from modelscope_t2v.models.autoencoder import AutoencoderKL

# float32 on the CPU; ours differs from the reference only in summation order
# (scaled_dot_product_attention vs bmm-softmax-bmm), so 1e-5 relative to the
# largest output element is ample.
PARITY_TOL = 1e-5


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter, the zero-initialised ones too, keeping activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() > 1:  # conv weight: unit gain on a unit input
            p.copy_(noise / p[0].numel() ** 0.5)
        elif name.split('.')[-2].startswith('norm'):  # GroupNorm affine
            p.copy_((1.0 + 0.1 * noise) if name.endswith('weight') else 0.1 * noise)
        else:  # conv bias
            p.copy_(0.02 * noise)


def _pair(config: AutoencoderConfig, seed: int = 0):
    """Ours and the reference, in eval mode, holding the same random weights."""
    ours, ref = AutoencoderKL(config).eval(), reference_autoencoder(config).eval()
    _randomize(ref, seed)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@torch.no_grad()
def test_tiny_parity_decode_and_encode():
    ours, ref = _pair(TINY.autoencoder)
    d = TINY.autoencoder.downsample
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, TINY.autoencoder.z_channels, 64 // d, 64 // d, generator=gen)
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1

    decoded, decoded_ref = ours.decode(z), ref.decode(z)
    assert decoded.shape == (3, 3, 64, 64)
    posterior = ref.encode(x)
    mean, logvar = ours.encode_moments(x)
    errors = {'decode': rel_err(decoded, decoded_ref),
              'encode mean': rel_err(ours.encode(x), posterior.mean),
              'encode logvar': rel_err(logvar, posterior.logvar)}
    print('tiny worst relative errors:', errors)
    assert torch.equal(mean, ours.encode(x))
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back the other way
    assert max(errors.values()) < PARITY_TOL, errors
    assert decoded_ref.abs().max() > 0.1  # the comparison is not of near-zeros


@pytest.mark.slow
@torch.no_grad()
def test_full_parity_decode():
    config = FULL.autoencoder
    ours, ref = _pair(config)
    # 128x128 pixels, not 256: at 256 the two decodes took ~110 s on 2 shared cores
    z = torch.randn(2, config.z_channels, 16, 16, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    decoded, decoded_ref = ours.decode(z), ref.decode(z)
    err = rel_err(decoded, decoded_ref)
    print(f'full decode 2x128x128: worst relative error {err:.3g}, '
          f'{time.perf_counter() - start:.1f} s for both models')
    assert decoded.shape == (2, 3, 128, 128)
    assert err < PARITY_TOL


@torch.no_grad()
def test_decode_video_chunks_match_whole():
    config = TINY.autoencoder
    model = AutoencoderKL(config).eval()
    _randomize(model, seed=3)
    latents = torch.randn(2, config.z_channels, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    whole = model.decode_video(latents)
    chunked = model.decode_video(latents, chunk_frames=2)  # chunks of 2, 2, 2 folded frames
    d = config.downsample
    assert whole.shape == (2, 3, 3, 4 * d, 5 * d)
    err = (whole - chunked).abs().max().item()
    print('decode_video chunk_frames=2 vs None, max abs diff:', err)
    assert err <= 1e-6
    # frame 2 of video 1 is the plain decode of the unscaled latent; a batch of one
    # may take another conv kernel, so this compares within float32 rounding
    frame = model.decode(latents[1, :, 2][None] / config.scale_factor)
    assert rel_err(whole[1, :, 2][None], frame) < PARITY_TOL


def test_decode_video_rejects_bad_chunk():
    model = AutoencoderKL(TINY.autoencoder)
    with pytest.raises(ValueError, match='chunk_frames=0'):
        model.decode_video(torch.zeros(1, 4, 2, 2, 2), chunk_frames=0)


def test_full_structure_matchesreference_autoencoder():
    with torch.device('meta'):
        ours = AutoencoderKL(FULL.autoencoder)
        ref = reference_autoencoder(FULL.autoencoder)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    n_params = sum(p.numel() for p in ours.parameters())
    print(f'full autoencoder: {len(ours_shapes)} tensors, {n_params} parameters')
    assert n_params == sum(p.numel() for p in ref.parameters())
    assert len(ours_shapes) == len(ref_shapes) > 200
