"""Samplers: diffusers' scheduler classes configured from this model's training schedule.

The model was trained with 1000 steps of the 'scaled linear' schedule
(betas 0.00085 -> 0.012, linear in sqrt(beta)) to predict the noise eps.
'ddim' reproduces the original sampler exactly: timesteps 981, 961, ..., 1
('leading' spacing with offset 1) and alpha_cumprod[0] after the last step
(set_alpha_to_one=False), where the original clamps t - stride at 0.
Every sampler takes that 'leading' spacing where it fits the trained
timesteps, and 'trailing' spacing where it does not (at 999 and 1000 steps:
see schedule_spacing), so every count 1..1000 works with every sampler.
"""

from __future__ import annotations

import importlib
import threading

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
    # latent consistency models (Luo et al. 2023), for few-step UNets (MCM, T2V-Turbo): its own timesteps, taken
    # from a 50-step schedule (original_inference_steps), so 1..50 steps; no classifier-free guidance
    'lcm': ('LCMScheduler', {'set_alpha_to_one': False}),
}
# these space steps + 1 points and drop the last one (diffusers' set_timesteps)
MULTISTEP_CLASSES = ('DPMSolverMultistepScheduler', 'UniPCMultistepScheduler')
DEFAULT_SAMPLER = 'ddim'
STOCHASTIC_SAMPLERS = ('euler-a', 'dpm++sde', 'lcm')   # add fresh noise at every step (ddim too when eta > 0)
FEW_STEP_SAMPLERS = {'lcm': 4}   # sampler -> its default steps; these run without classifier-free guidance
LCM_MAX_STEPS = 50               # LCMScheduler's original_inference_steps: its timesteps are picked from these


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


def schedule_spacing(class_name: str, num_steps: int, num_timesteps: int) -> dict:
    """{} where the original's 'leading' timesteps (offset 1) fit the trained range 0..T-1, else the
    configuration of 'trailing' timesteps, T/n apart down from T-1 (Lin et al. 2023, Table 2), which fit
    every count up to T.

    Leading spacing puts p points T // p apart from timestep 1 up (p = n, or n + 1 for the multistep
    solvers), so its top is (T // p) (p - 1) + 1. With T = 1000 that is 1000 at n = 1000 (n = 999 for the
    multistep solvers): DDIM indexes alpha_cumprod[1000] (IndexError); the sigma samplers clamp it to
    sigma(999), so two steps share a sigma and LMS's integration divides by zero (NaN); DPM-Solver and UniPC
    take a step of h = 0 (NaN). At n = 1000 their stride T // 1001 is 0: every timestep is 1 (IndexError,
    AssertionError). Below those counts the schedules stay as they were: seeds made before make the same videos.
    """
    points = num_steps + 1 if class_name in MULTISTEP_CLASSES else num_steps
    stride = num_timesteps // points
    if stride >= 1 and stride * (points - 1) + 1 <= num_timesteps - 1:
        return {}
    return {'timestep_spacing': 'trailing', 'steps_offset': 0}


def check_sampler(sampler) -> None:
    """Raise ValueError/TypeError for a sampler that make_scheduler would refuse."""
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ValueError(f'sampler={sampler!r} is unknown; choose one of {sorted(SAMPLERS)} '
                             'or pass a diffusers scheduler instance')
    elif not (hasattr(sampler, 'set_timesteps') and hasattr(sampler, 'step')):
        raise TypeError(f'sampler must be a name or a diffusers scheduler, not {type(sampler).__name__}')


def default_steps(sampler) -> int:
    """num_inference_steps when the request gives none: 4 for the few-step samplers, else the original's 50."""
    return FEW_STEP_SAMPLERS.get(sampler, 50) if isinstance(sampler, str) else 50


def max_steps(sampler, num_timesteps: int) -> int:
    """The most steps `sampler` takes: LCM picks its timesteps from a 50-step schedule."""
    return LCM_MAX_STEPS if sampler == 'lcm' else num_timesteps


def uses_guidance(sampler, guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs (two texts per video): scale > 1 and not a few-step sampler, whose
    distilled UNets take w as an embedding instead (layers.guidance_embedding) or were distilled with it."""
    return guidance_scale > 1.0 and not (isinstance(sampler, str) and sampler in FEW_STEP_SAMPLERS)


def draws_step_noise(sampler, eta: float) -> bool:
    """Whether the result depends on noise drawn during sampling (assumed for a scheduler instance)."""
    if not isinstance(sampler, str):
        return True
    return eta > 0 if sampler == 'ddim' else sampler in STOCHASTIC_SAMPLERS


def import_diffusers_meanwhile() -> threading.Thread:
    """Start importing diffusers on a thread of its own; join() it before this thread imports anything else
    (two threads importing at once may deadlock on circular imports). Its import lists every installed package
    (importlib.metadata): 1.6 s of a warm start on an H100, which the loading of the weights, much of it
    outside the GIL, hides. An import that fails here fails again, with its error, in make_scheduler."""
    def run():
        try:
            importlib.import_module('diffusers')
        except Exception:   # noqa: BLE001 - raised again where make_scheduler imports it
            pass
    thread = threading.Thread(target=run, name='import diffusers', daemon=True)
    thread.start()
    return thread


def make_scheduler(sampler, diffusion: DiffusionConfig, num_steps: int | None = None):
    """A fresh diffusers scheduler for a short name, spaced for `num_steps` (None: the original's leading
    spacing); an instance is returned as is."""
    check_sampler(sampler)
    if not isinstance(sampler, str):
        return sampler
    class_name, extra = SAMPLERS[sampler]
    cls = getattr(importlib.import_module('diffusers'), class_name)
    spacing = ({} if num_steps is None or sampler == 'lcm'
               else schedule_spacing(class_name, num_steps, diffusion.num_timesteps))
    # the constructor, not from_config: that one first imports every compatible scheduler (a second at start-up)
    return cls(**{**training_schedule(diffusion), **extra, **spacing})
