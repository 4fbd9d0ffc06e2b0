"""Validation videos during training: the package's own sampler over the weights being trained."""

from __future__ import annotations

import logging
import os
from typing import List

import numpy as np
import pytorch_lightning as pl
import torch

from .. import tokenizer, video_io
from ..sampling import denoise, guided
from ..schedulers import make_scheduler
from ..text_to_video import to_uint8_frames

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_frames(module, prompts: List[str], frames: int, width: int, height: int, steps: int, guidance: float,
                  sampler: str, seed: int) -> np.ndarray:
    """uint8 videos (n, f, h, w, 3) of `prompts` from the module's networks as they are now (the engine's
    arithmetic: guided UNet, `sampler`, noise drawn on the CPU from `seed`); the module's mode is restored."""
    modes = {m: m.training for m in module.modules()}   # the frozen autoencoder stays in eval mode after
    module.eval()
    try:
        config = module.model_config
        n, negatives = len(prompts), [''] * len(prompts)
        texts = list(prompts) + (negatives if guidance > 1.0 else [])
        tokens = tokenizer.tokenize(texts, context_length=config.text.context_length).to(module.device)
        embeddings = module.text_encoder(tokens)
        context = torch.cat([embeddings[n:], embeddings[:n]]) if guidance > 1.0 else embeddings   # unconditional first
        cell = config.autoencoder.downsample
        noise = torch.randn((n, config.unet.in_dim, frames, height // cell, width // cell),
                            generator=torch.Generator().manual_seed(seed))
        dtype = next(module.unet.parameters()).dtype
        scheduler = make_scheduler(sampler, config.diffusion, steps)
        latents = denoise(guided(module.unet, guidance), noise.to(module.device, dtype), context.to(dtype),
                          scheduler, steps)
        video = module.autoencoder.decode_video(latents.to(next(module.autoencoder.parameters()).dtype), 4)
        return to_uint8_frames(video)
    finally:
        for m, training in modes.items():
            m.train(training)


class ValidationVideos(pl.Callback):
    """Every `every` optimizer steps, rank zero writes one video per validation prompt to
    OUTPUT_DIR/validation/step-NNNNNN-i.mp4 and logs its path."""

    def __init__(self, config):
        self.config = config
        self.last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, c = trainer.global_step, self.config
        if step == self.last_step or step % c.validation_every_n_steps or not trainer.is_global_zero:
            return
        self.last_step = step
        with trainer.strategy.precision_plugin.forward_context():
            videos = sample_frames(pl_module, list(c.validation_prompts), c.validation_frames or c.n_sample_frames,
                                   c.width, c.height, c.validation_inference_steps, c.validation_guidance_scale,
                                   c.validation_sampler, c.seed)
        folder = os.path.join(c.output_dir, 'validation')
        os.makedirs(folder, exist_ok=True)
        for i, (prompt, video) in enumerate(zip(c.validation_prompts, videos)):
            path = video_io.write_video(video, os.path.join(folder, f'step-{step:06d}-{i}.mp4'), fps=8,
                                        metadata={'comment': f'step {step}: {prompt}'})
            logger.info('validation video of step %d: %s', step, path)
