"""The denoising loop and classifier-free guidance; the scheduler only steps.

A model is any `model_fn(x, t, context) -> eps` on `b c f h w` latents. Its
context may hold k texts per video, `(k b, 77, d)` text-major; it then
returns one eps per text, `(k b, c, f, h, w)`, as UNet3D does. The context
may be None for a model that remembers its texts (UNet3D.remember_text).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
# callback(step, timestep, latents) after each step
StepCallback = Callable[[int, int, torch.Tensor], None]


def guided(model_fn: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + s (eps_c - eps_u).

    The model's context holds two texts per video, the unconditional ones
    first: `(2 b, 77, d)`, both branches in one batch (UNet3D runs the layers
    before the text once for both). With s <= 1 guidance is off: the model
    returns the conditional eps alone (one text per video, one UNet pass).
    """
    if scale <= 1.0:
        return model_fn

    def fn(x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        # x: (b, c, f, h, w); context: (2 b, 77, d), or None where the model remembers its texts
        eps_u, eps_c = model_fn(x, t, context).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return fn


def denoise(model_fn: ModelFn, noise: torch.Tensor, context: Optional[torch.Tensor], scheduler,
            num_steps: int, eta: float = 0.0, generator: Optional[torch.Generator] = None,
            callback: Optional[StepCallback] = None, progress: Callable = iter,
            init: Optional[torch.Tensor] = None, strength: float = 1.0,
            held: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the reverse diffusion from `noise` (b c f h w, unit variance) to clean latents.

    init: clean latents (b c f h w) to start from instead (SDEdit, Meng et al. 2022): the last `strength`
        of the steps run, from `init` noised to the first of them, as diffusers' VideoToVideoSDPipeline.
    held: clean latents (b c f' h w) of the first f' frames, put back after every step, noised to the
        next step's timestep with their share of `noise` (the inpainting of a model not trained for it).
    """
    # Timesteps stay on the CPU, as the scheduler's tables do: reading one then
    # costs no GPU sync, so the host queues the next step while the GPU runs this one.
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps
    if init is None:
        x = noise * scheduler.init_noise_sigma
    else:
        skip = (num_steps - min(int(num_steps * strength), num_steps)) * scheduler.order
        timesteps = timesteps[skip:]
        if hasattr(scheduler, 'set_begin_index'):
            scheduler.set_begin_index(skip)
        x = scheduler.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))
    step_kwargs = _step_kwargs(scheduler, eta, generator)
    for i, t in enumerate(progress(timesteps)):
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps = model_fn(scheduler.scale_model_input(x, t), t_batch, context)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        if held is not None:
            x = _hold(x, held, noise, scheduler, timesteps[i + 1] if i + 1 < len(timesteps) else None)
        if callback is not None:
            callback(i, int(t), x)
    return x


def _hold(x: torch.Tensor, held: torch.Tensor, noise: torch.Tensor, scheduler, t_next) -> torch.Tensor:
    """x with its first frames replaced by `held`, noised to t_next (clean after the last step)."""
    f = held.shape[2]
    if t_next is not None:
        held = scheduler.add_noise(held, noise[:, :, :f], torch.tensor([int(t_next)]).repeat(held.shape[0]))
    return torch.cat([held.to(x.dtype), x[:, :, f:]], dim=2)


def reschedule_noise(noise: torch.Tensor, window: int, stride: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """FreeNoise's noise rescheduling (Qiu et al., ICLR 2024, Sec. 3.2): frames from `window` on take the
    noise of the frames `window` earlier, `stride` at a time, in a shuffled order: (b c f h w) -> the same.

    Each window then starts from noise like the first's, which keeps a long video's content consistent;
    the shuffle keeps neighbouring windows from repeating. The order comes from `generator` (torch's
    global generator when None).
    """
    noise = noise.clone()
    frames = noise.shape[2]
    for start in range(window, frames, stride):
        count = min(stride, frames - start)
        device = generator.device if generator is not None else 'cpu'
        order = torch.randperm(stride, generator=generator, device=device)[:count].cpu() + start - window
        noise[:, :, start:start + count] = noise[:, :, order]
    return noise


def _step_kwargs(scheduler, eta: float, generator) -> dict:
    """eta and generator for the schedulers whose step() takes them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if 'eta' in params:
        kwargs['eta'] = eta
    if 'generator' in params:
        kwargs['generator'] = generator
    return kwargs
