"""Every sampler over the edges of the documented ranges: steps 1..1000, guidance 0..100, eta 0..1."""

import subprocess
import sys

import pytest
import torch

from modelscope_t2v import parse_request
from modelscope_t2v.config import FULL
from modelscope_t2v.schedulers import LCM_MAX_STEPS, MULTISTEP_CLASSES, SAMPLERS, make_scheduler, schedule_spacing

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py
T = FULL.diffusion.num_timesteps   # 1000
TINY_SIZE = {'height': 8, 'width': 8, 'num_frames': 2}
# counts around every change of leading spacing's stride T // p, and the top of the range
COUNTS = [*range(1, 40), *range(325, 340), *range(490, 510), *range(960, T + 1)]


def _alphas_cumprod(diffusion) -> torch.Tensor:
    """The training schedule's alpha_bar (T,): 'scaled linear' betas."""
    betas = torch.linspace(diffusion.beta_start ** 0.5, diffusion.beta_end ** 0.5, diffusion.num_timesteps) ** 2
    return torch.cumprod(1 - betas.double(), 0).float()


def test_leading_spacing_is_kept_exactly_where_diffusers_fits_it_in_0_to_999():
    switched = {}
    for name, (class_name, _) in SAMPLERS.items():
        if name in ('dpm++2m-karras', 'lcm'):   # timesteps from Karras sigmas / LCM's 50-step schedule
            continue
        for n in COUNTS:
            leading = make_scheduler(name, FULL.diffusion)   # no count: the original's spacing
            leading.set_timesteps(n)
            t = leading.timesteps.tolist()
            fits = 0 <= min(t) and max(t) <= T - 1 and len(set(t)) == n
            assert (schedule_spacing(class_name, n, T) == {}) == fits, (name, n, max(t), len(set(t)))
            if not fits:
                switched.setdefault(name, []).append(n)
    assert switched == {'ddim': [1000], 'dpm++2m': [999, 1000], 'dpm++sde': [999, 1000], 'unipc': [999, 1000],
                        'euler': [1000], 'euler-a': [1000], 'heun': [1000], 'lms': [1000]}


def test_the_default_ddim_50_schedule_is_the_originals():
    scheduler = make_scheduler('ddim', FULL.diffusion, 50)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))


# the top of the range, and 999 for the multistep solvers, which failed there too
TOP_COUNTS = [(name, steps) for name in sorted(SAMPLERS) if name != 'lcm' for steps in (999, 1000)
              if steps == 1000 or SAMPLERS[name][0] in MULTISTEP_CLASSES] + [('lcm', LCM_MAX_STEPS)]


@pytest.mark.parametrize('sampler, steps', TOP_COUNTS)
def test_every_sampler_at_the_top_step_counts(tiny_engine, monkeypatch, sampler, steps):
    """Through the engine, its UNet replaced by the exact noise prediction for data that are all zero
    (x_t = sqrt(1 - alpha_bar_t) eps): every timestep in 0..999, latents that converge, finite frames."""
    alpha_bar, timesteps = _alphas_cumprod(tiny_engine.config.diffusion), []

    def exact_eps(x, t, context):
        timesteps.extend(t.tolist())
        return x / (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1, 1)
    monkeypatch.setattr(tiny_engine, 'guided_unet', lambda context, uncond, scale: exact_eps)
    result = tiny_engine(parse_request({'text': 'a', 'seed': 3}, tiny_engine.config, sampler=sampler,
                                       num_inference_steps=steps, output_type='latents', **TINY_SIZE))
    assert 0 <= min(timesteps) and max(timesteps) == T - 1
    assert len(timesteps) == steps * (2 if sampler == 'heun' else 1) - (1 if sampler == 'heun' else 0)
    # all samplers end at sigma 0 but DDIM, whose last step ends at alpha_bar[0]: sqrt(1 - 0.99915) |noise|
    worst = result.latents.abs().max().item()
    assert worst < (0.1 if sampler == 'ddim' else 1e-4), worst


@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_every_sampler_at_the_low_edges_and_guidance_eta_extremes(tiny_engine, sampler):
    """The real tiny networks: 1 step with guidance 100 and eta 1, 2 steps with guidance 0."""
    for options in ({'num_inference_steps': 1, 'guidance_scale': 100.0, 'eta': 1.0},
                    {'num_inference_steps': 2, 'guidance_scale': 0.0, 'eta': 0.0}):
        result = tiny_engine(parse_request({'text': 'a', 'seed': 5}, tiny_engine.config, sampler=sampler,
                                           output_type='frames', **options, **TINY_SIZE))
        [frames] = result.frames
        assert frames.shape == (2, 8, 8, 3) and 0 < frames.std() < 128, (options, frames.std())


def test_from_pretrained_imports_diffusers_on_a_thread_it_joins(tiny_model_dir):
    """A fresh process: from_pretrained returns with diffusers imported and its importing thread ended, so the
    first scheduler costs no import."""
    script = ('import sys, threading\n'
              'from modelscope_t2v import TextToVideo\n'
              'assert "diffusers" not in sys.modules\n'
              f'TextToVideo.from_pretrained({tiny_model_dir!r}, device="cpu")\n'
              'importing = [t.name for t in threading.enumerate() if t.name == "import diffusers"]\n'
              'print("diffusers" in sys.modules, importing)')
    out = subprocess.run([sys.executable, '-c', script], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == 'True []'
