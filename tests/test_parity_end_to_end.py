"""The whole generation against ModelScope's own classes, from the same files and seed.

The reference side is what TextToVideoSynthesis does, driven directly (its
pipeline no longer runs on current torchvision and open_clip): noise from
torch.manual_seed, open_clip's text tower at the penultimate layer, UNetSD,
GaussianDiffusion.ddim_sample_loop with guidance 9 and the empty negative
prompt, then AutoencoderKL.decode of latents / 0.18215.
"""

import os

import numpy as np
import pytest
import torch
from einops import rearrange
from reference import reference_autoencoder, reference_clip, reference_penultimate, reference_unet, rel_err

from modelscope_t2v import TextToVideo, parse_request
from modelscope_t2v.config import TINY, replace
from modelscope_t2v.text_to_video import to_uint8_frames
from modelscope_t2v.tokenizer import tokenize
from modelscope_t2v.tools.make_random_model import write_model_dir

# The reference decoder hard-codes a 1024-wide context: the text tower here is 1024 wide.
CONFIG = replace(TINY, unet=replace(TINY.unet, context_dim=1024),
                 text=replace(TINY.text, width=1024, heads=16, layers=2))
PROMPT = 'A panda eating bamboo on a rock.'
SEED, FRAMES, SIZE = 7, 4, 64
LATENT_TOLERANCE = 1e-4   # 50 guided steps in float32 compound rounding differences
VIDEO_TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return write_model_dir(str(tmp_path_factory.mktemp('tiny-1024')), CONFIG)


@pytest.fixture(scope='module')
def reference(model_dir):
    return reference_generation(model_dir)


def reference_generation(model_dir):
    """Latents (1, 4, f, h, w) and decoded video (1, 3, f, H, W) the original's way."""
    from modelscope.models.multi_modal.video_synthesis.diffusion import GaussianDiffusion, beta_schedule
    path = lambda name: os.path.join(model_dir, name)  # noqa: E731

    clip = reference_clip(CONFIG.text)
    clip_sd = torch.load(path(CONFIG.ckpt_clip), weights_only=True)
    text_sd = {k: v for k, v in clip_sd.items() if k.startswith(('token_', 'positional_', 'transformer.', 'ln_final'))}
    missing, unexpected = clip.load_state_dict(text_sd, strict=False)
    assert not unexpected and all(k.startswith(('visual.', 'text_projection', 'logit_scale')) for k in missing)
    with torch.no_grad():
        text = reference_penultimate(clip, tokenize([PROMPT]))
        empty = reference_penultimate(clip, tokenize(['']))

    unet = reference_unet(CONFIG.unet)
    unet.load_state_dict(torch.load(path(CONFIG.ckpt_unet), weights_only=True), strict=True)
    d = CONFIG.diffusion
    diffusion = GaussianDiffusion(betas=beta_schedule('linear_sd', d.num_timesteps, init_beta=d.beta_start,
                                                      last_beta=d.beta_end),
                                  mean_type='eps', var_type='fixed_small', loss_type='mse')
    torch.manual_seed(SEED)
    noise = torch.randn(1, 4, FRAMES, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        latents = diffusion.ddim_sample_loop(noise=noise, model=unet,
                                             model_kwargs=[{'y': text}, {'y': empty}],
                                             guide_scale=9.0, ddim_timesteps=50, eta=0.0)
        vae = reference_autoencoder(CONFIG.autoencoder, ckpt_path=path(CONFIG.ckpt_autoencoder))
        video = vae.decode(rearrange(latents / 0.18215, 'b c f h w -> (b f) c h w'))
    return latents, rearrange(video, '(b f) c h w -> b c f h w', b=1)


@pytest.mark.slow
def test_generation_matches_reference(model_dir, reference):
    engine = TextToVideo.from_pretrained(model_dir, device='cpu')
    request = parse_request({'text': PROMPT, 'seed': SEED}, engine.config, num_frames=FRAMES,
                            height=SIZE, width=SIZE, output_type='latents')
    assert (request.num_inference_steps, request.guidance_scale, request.sampler) == (50, 9.0, 'ddim')
    latents = engine(request).latents
    with torch.no_grad():
        video = engine.autoencoder.decode_video(latents)

    ref_latents, ref_video = reference
    latent_err, video_err = rel_err(latents, ref_latents), rel_err(video, ref_video)
    frames, ref_frames = to_uint8_frames(video)[0], to_uint8_frames(ref_video)[0]
    level_diff = np.abs(frames.astype(int) - ref_frames.astype(int))
    print(f'end to end: latents worst relative error {latent_err:.2e}, decoded video {video_err:.2e}, '
          f'uint8 frames max diff {level_diff.max()} on {np.mean(level_diff > 0):.4%} of values')
    assert latent_err < LATENT_TOLERANCE
    assert video_err < VIDEO_TOLERANCE
    assert level_diff.max() <= 1 and np.mean(level_diff > 0) < 0.01


@pytest.mark.slow
def test_torch_manual_seed_then_pipeline_matches_reference(model_dir, reference):
    """The Studio app's way: torch.manual_seed(seed), then pipeline() with no seed of its own. The
    reference draws its noise as ModelScope's built-in does, torch.randn after that manual_seed."""
    from modelscope.pipelines import pipeline
    pipe = pipeline('text-to-video-synthesis', model_dir, device='cpu')
    torch.manual_seed(SEED)
    out = pipe({'text': PROMPT}, num_frames=FRAMES, height=SIZE, width=SIZE, output_type='latents')
    latent_err = rel_err(out['latents'], reference[0])
    print(f'torch.manual_seed + pipeline: latents worst relative error {latent_err:.2e}')
    assert latent_err < LATENT_TOLERANCE
    assert out['parameters']['seed'] == SEED
