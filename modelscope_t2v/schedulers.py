"""Samplers: diffusers' scheduler classes configured from this model's training schedule.

The model was trained with 1000 steps of the 'scaled linear' schedule
(betas 0.00085 -> 0.012, linear in sqrt(beta)) to predict the noise eps.
'ddim' reproduces the original sampler exactly: timesteps 981, 961, ..., 1
('leading' spacing with offset 1) and alpha_cumprod[0] after the last step
(set_alpha_to_one=False), where the original clamps t - stride at 0.
"""

from __future__ import annotations

import importlib

from .config import DiffusionConfig

# short name -> (diffusers class, extra configuration)
SAMPLERS = {
    'ddim': ('DDIMScheduler', {'clip_sample': False, 'set_alpha_to_one': False}),
    'dpm++2m': ('DPMSolverMultistepScheduler', {'algorithm_type': 'dpmsolver++', 'solver_order': 2}),
    'dpm++2m-karras': ('DPMSolverMultistepScheduler',
                       {'algorithm_type': 'dpmsolver++', 'solver_order': 2, 'use_karras_sigmas': True}),
    'dpm++sde': ('DPMSolverMultistepScheduler', {'algorithm_type': 'sde-dpmsolver++', 'solver_order': 2}),
    'unipc': ('UniPCMultistepScheduler', {}),
    'euler': ('EulerDiscreteScheduler', {}),
    'euler-a': ('EulerAncestralDiscreteScheduler', {}),
    'heun': ('HeunDiscreteScheduler', {}),
    'lms': ('LMSDiscreteScheduler', {}),
}
DEFAULT_SAMPLER = 'ddim'
STOCHASTIC_SAMPLERS = ('euler-a', 'dpm++sde')   # add fresh noise at every step (ddim too when eta > 0)


def training_schedule(diffusion: DiffusionConfig) -> dict:
    """The scheduler configuration every sampler shares."""
    return {
        'num_train_timesteps': diffusion.num_timesteps,
        'beta_start': diffusion.beta_start,
        'beta_end': diffusion.beta_end,
        'beta_schedule': 'scaled_linear',
        'prediction_type': 'epsilon',
        'timestep_spacing': 'leading',
        'steps_offset': 1,
    }


def check_sampler(sampler) -> None:
    """Raise ValueError/TypeError for a sampler that make_scheduler would refuse."""
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ValueError(f'sampler={sampler!r} is unknown; choose one of {sorted(SAMPLERS)} '
                             'or pass a diffusers scheduler instance')
    elif not (hasattr(sampler, 'set_timesteps') and hasattr(sampler, 'step')):
        raise TypeError(f'sampler must be a name or a diffusers scheduler, not {type(sampler).__name__}')


def draws_step_noise(sampler, eta: float) -> bool:
    """Whether the result depends on noise drawn during sampling (assumed for a scheduler instance)."""
    if not isinstance(sampler, str):
        return True
    return eta > 0 if sampler == 'ddim' else sampler in STOCHASTIC_SAMPLERS


def make_scheduler(sampler, diffusion: DiffusionConfig):
    """A fresh diffusers scheduler for a short name; an instance is returned as is."""
    check_sampler(sampler)
    if not isinstance(sampler, str):
        return sampler
    class_name, extra = SAMPLERS[sampler]
    cls = getattr(importlib.import_module('diffusers'), class_name)
    return cls.from_config({**training_schedule(diffusion), **extra})
