"""The LightningModule of a run (noise-prediction loss on latents) and its LightningDataModule.

The loss is the original's training objective (VideoFusion; DDPM, Ho et al. 2020, Eq. 14): latents z0 = 0.18215 x a
sample of the autoencoder's posterior of the frames, eps ~ N(0, I) (plus offset noise, Guttenberg 2023: s x N(0, 1) per
video and channel), t uniform in 0..T-1, z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps by diffusers' DDPMScheduler on the
model's schedule (schedulers.training_schedule), and loss = mean (UNet(z_t, t, text) - eps)^2.

Every draw of a step comes from a CPU generator seeded by (seed, global step, batch index, rank): a resumed run draws
what the uninterrupted one drew, on any device.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Dict, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import ModelConfig
from ..schedulers import training_schedule
from . import data
from .config import TrainConfig, to_dict
from .targets import inject_lora, text_lora_targets, unet_lora_targets

logger = logging.getLogger(__name__)

ENCODE_CHUNK_FRAMES = 8   # frames the autoencoder encodes at once: bounds its activations
LOSSES_READ_EVERY = 256   # steps between reads of the kept losses from the device (each read waits for it)


class EMA(nn.Module):
    """Exponential moving average of the trained tensors, as float32 buffers (they follow the module's device and
    are saved in its checkpoints): shadow <- decay shadow + (1 - decay) tensor after each optimizer step."""

    def __init__(self, named: Dict[str, torch.Tensor], decay: float):
        super().__init__()
        self.decay = decay
        self.names = list(named)
        for i, tensor in enumerate(named.values()):
            self.register_buffer(f'shadow_{i}', tensor.detach().float().clone())

    @torch.no_grad()
    def update(self, named: Dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            self.get_buffer(f'shadow_{i}').lerp_(named[name].detach().float(), 1.0 - self.decay)

    def averaged(self) -> Dict[str, torch.Tensor]:
        return {name: self.get_buffer(f'shadow_{i}') for i, name in enumerate(self.names)}


class TextToVideoTraining(pl.LightningModule):
    """The three networks; a LoRA (peft) or the whole UNet trained (and optionally the text encoder)."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, networks):
        super().__init__()
        from diffusers import DDPMScheduler
        self.config, self.model_config = config, model_config
        self.text_encoder, self.unet, self.autoencoder = networks
        self.autoencoder.requires_grad_(False).eval()
        # 1. what is trained
        if config.target == 'lora':
            inject_lora(self.unet, unet_lora_targets(self.unet, config.lora_modules), config.lora_rank,
                        config.lora_alpha, config.lora_dropout)
            if config.train_text_encoder:
                inject_lora(self.text_encoder, text_lora_targets(self.text_encoder), config.lora_rank,
                            config.lora_alpha, config.lora_dropout)
            else:
                self.text_encoder.requires_grad_(False)
        else:
            self.unet.requires_grad_(True)
            self.text_encoder.requires_grad_(config.train_text_encoder)
        self.unet.gradient_checkpointing = config.gradient_checkpointing
        # 2. the noise schedule, EMA; checkpoints hold only the trained tensors (strict_loading off)
        self.noise_schedule = DDPMScheduler.from_config(training_schedule(model_config.diffusion))
        self.ema = EMA(self.trained_tensors(), config.ema_decay) if config.ema_decay is not None else None
        self._ema_step = 0
        self.strict_loading = False
        self._losses, self._pending = [], []   # (global step, loss) of rank zero's batches: floats, and tensors

    def trained_tensors(self) -> Dict[str, torch.Tensor]:
        """name -> parameter of everything the optimizer updates."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def export_tensors(self) -> Dict[str, torch.Tensor]:
        """The trained tensors to export: their moving average where the run keeps one."""
        return self.ema.averaged() if self.ema is not None else self.trained_tensors()

    # -- the loss ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames (b, 3, f, H, W) in [-1, 1] -> the posterior's (mean, logvar) stacked on channels (b, 2 z, f, h, w)."""
        weight = next(self.autoencoder.parameters())
        x = rearrange(pixels.to(weight.device, weight.dtype), 'b c f h w -> (b f) c h w')
        moments = [torch.cat(self.autoencoder.encode_moments(part), dim=1) for part in x.split(ENCODE_CHUNK_FRAMES)]
        return rearrange(torch.cat(moments), '(b f) c h w -> b c f h w', b=pixels.shape[0])

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents (b, z, f, h, w): a posterior sample of each clip, from its cached moments or its frames."""
        moments = batch['moments'].to(self.device) if 'moments' in batch else self.encode_moments(batch['pixels'])
        mean, logvar = moments.float().chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + torch.exp(0.5 * logvar) * eps) * self.model_config.autoencoder.scale_factor

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The noise-prediction MSE of one batch, every draw from `generator` (module docstring)."""
        latents = self.latents(batch, generator)
        b, c = latents.shape[:2]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_text_encoder):
            context = self.text_encoder(batch['tokens'].to(self.device))
        noise = torch.randn(latents.shape, generator=generator)
        if self.config.offset_noise_strength > 0:
            noise = noise + self.config.offset_noise_strength * torch.randn((b, c, 1, 1, 1), generator=generator)
        t = torch.randint(0, self.model_config.diffusion.num_timesteps, (b,), generator=generator)
        noise = noise.to(latents.device)
        noisy = self.noise_schedule.add_noise(latents, noise, t)
        unet_dtype = next(self.unet.parameters()).dtype
        eps = self.unet(noisy.to(unet_dtype), t.to(self.device), context.to(unet_dtype))
        return F.mse_loss(eps.float(), noise)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The CPU generator of this step's draws: seeded by (seed, global step, batch index, rank)."""
        key = f'{self.config.seed}/{self.global_step}/{batch_idx}/{self.global_rank}'.encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, 'little') >> 1)

    # -- Lightning's hooks -------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.step_generator(batch_idx))
        self.log('train/loss', loss, prog_bar=True, batch_size=len(batch['prompts']))
        if self.trainer.is_global_zero:
            self._pending.append((self.global_step, loss.detach()))
            if len(self._pending) >= LOSSES_READ_EVERY:
                self.losses()
        return loss

    def losses(self) -> list:
        """(global step, loss) of every batch rank zero trained in this process (read from the device in bulk)."""
        if self._pending:
            values = torch.stack([loss for _, loss in self._pending]).float().tolist()
            self._losses += [(step, value) for (step, _), value in zip(self._pending, values)]
            self._pending = []
        return self._losses

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None and self.global_step != self._ema_step:   # after each optimizer step
            self.ema.update(self.trained_tensors())
            self._ema_step = self.global_step

    def configure_optimizers(self):
        params = list(self.trained_tensors().values())
        c = self.config
        if c.optimizer == 'adamw8bit':
            import bitsandbytes
            optimizer = bitsandbytes.optim.AdamW8bit(params, lr=c.learning_rate, betas=c.adam_betas,
                                                     weight_decay=c.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=c.learning_rate, betas=c.adam_betas, weight_decay=c.weight_decay)
        warmup = c.lr_warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': schedule, 'interval': 'step'}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping, except under FSDP, whose precision plugin clips by value only: there FSDP's own
        clip_grad_norm_ takes the norm over every rank's shard."""
        if gradient_clip_val and isinstance(self.trainer.strategy, pl.strategies.FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_fit_start(self) -> None:
        """Fill the latent cache: rank r encodes clips r, r + w, ...; then all ranks wait for each other."""
        dataset = getattr(getattr(self.trainer, 'datamodule', None), 'dataset', None)
        if dataset is None or dataset.cache_dir is None:   # other dataloaders than ClipDataModule's: no cache
            return
        indices = range(self.global_rank, len(dataset), self.trainer.world_size)
        written = dataset.fill_cache(self.encode_moments, indices)
        logger.info('latent cache %s: %d clips encoded, %d were there', dataset.cache_dir, written,
                    len(indices) - written)
        self.trainer.strategy.barrier('latent-cache')

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the trained tensors (and their average) only: the rest is the model folder's."""
        kept = set(self.trained_tensors())
        checkpoint['state_dict'] = {k: v for k, v in checkpoint['state_dict'].items()
                                    if k in kept or k.startswith('ema.')}
        checkpoint['modelscope_t2v'] = {'config': to_dict(self.config)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = set(self.trained_tensors()) - set(checkpoint['state_dict'])
        if missing:
            raise ValueError(f'the checkpoint lacks {len(missing)} trained tensors of this run, e.g. '
                             f'{sorted(missing)[0]!r}: was it made with another target, lora_modules or lora_rank?')


class ClipDataModule(pl.LightningDataModule):
    """The clips of a configuration, in batches of one aspect bucket, split over the ranks."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, autoencoder_id: str):
        super().__init__()
        self.config, self.model_config, self.autoencoder_id = config, model_config, autoencoder_id
        self.dataset: Optional[data.ClipDataset] = None

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            cache = self.config.latent_cache_dir if self.config.cache_latents else None
            self.dataset = data.ClipDataset(data.find_clips(self.config), cache, self.autoencoder_id)
            logger.info('%d clips in %d buckets', len(self.dataset),
                        len({clip.size for clip in self.dataset.clips}))

    def train_dataloader(self):
        import functools

        from torch.utils.data import DataLoader
        sampler = data.BucketBatchSampler([clip.size for clip in self.dataset.clips], self.config.batch_size,
                                          self.config.seed, self.trainer.global_rank, self.trainer.world_size)
        collate = functools.partial(data.collate, context_length=self.model_config.text.context_length)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.config.num_workers,
                          collate_fn=collate, persistent_workers=self.config.num_workers > 0)
