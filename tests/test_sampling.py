"""The DDIM-50 guided trajectory against ModelScope's GaussianDiffusion driving the same UNet."""

import torch

from modelscope_t2v.config import FULL, TINY, replace
from modelscope_t2v.models.unet3d import UNet3D
from modelscope_t2v.sampling import denoise, guided
from modelscope_t2v.schedulers import make_scheduler
from reference import randomize_, reference_unet, rel_err

TINY_1024 = replace(TINY.unet, context_dim=1024)
STEP_TOLERANCE = 1e-5     # one step from the same input
TRAJECTORY_TOLERANCE = 1e-4  # 50 steps: float32 rounding compounds through the UNet


def _reference_diffusion():
    from modelscope.models.multi_modal.video_synthesis.diffusion import GaussianDiffusion, beta_schedule
    d = FULL.diffusion
    betas = beta_schedule('linear_sd', d.num_timesteps, init_beta=d.beta_start, last_beta=d.beta_end)
    return GaussianDiffusion(betas=betas, mean_type='eps', var_type='fixed_small', loss_type='mse',
                             rescale_timesteps=False)


def test_ddim_timesteps_are_the_originals():
    scheduler = make_scheduler('ddim', FULL.diffusion)
    scheduler.set_timesteps(50)
    expected = (1 + torch.arange(0, 1000, 20)).clamp(0, 999).flip(0)
    assert scheduler.timesteps.tolist() == expected.tolist()


def test_guided_ddim_trajectory_matches_reference():
    ref_unet = randomize_(reference_unet(TINY_1024), seed=3, std=0.03)
    ours = UNet3D(TINY_1024).eval()
    ours.load_state_dict(ref_unet.state_dict(), strict=True)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 4, 8, 16, 16, generator=g)
    text, empty = torch.randn(2, 1, 77, 1024, generator=g)

    # the reference loop of GaussianDiffusion.ddim_sample_loop, one step at a time
    diffusion = _reference_diffusion()
    ref_path, x = [], noise
    with torch.no_grad():
        for step in (1 + torch.arange(0, 1000, 20)).clamp(0, 999).flip(0):
            t = torch.full((1,), int(step), dtype=torch.long)
            x, _ = diffusion.ddim_sample(x, t, ref_unet, [{'y': text}, {'y': empty}],
                                         guide_scale=9.0, ddim_timesteps=50, eta=0.0)
            ref_path.append(x)

    our_path = []
    with torch.no_grad():
        denoise(guided(ours, 9.0), noise, torch.cat([empty, text]), make_scheduler('ddim', FULL.diffusion), 50,
                callback=lambda i, t, lat: our_path.append(lat))
    errors = [rel_err(a, b) for a, b in zip(our_path, ref_path)]
    print(f'DDIM-50 trajectory: first step {errors[0]:.2e}, worst {max(errors):.2e}, '
          f'final {errors[-1]:.2e}')
    assert len(our_path) == 50
    assert errors[0] < STEP_TOLERANCE
    assert max(errors) < TRAJECTORY_TOLERANCE
