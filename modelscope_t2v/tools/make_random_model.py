"""Write a complete model dir with random weights, in the original file format.

    python -m modelscope_t2v.tools.make_random_model DIR --size tiny|full [--config original|plugin]

tiny: a few MB, for CPU tests; full: the real 1.7B shapes, for GPU benchmarks.
The files are laid out as the released ones: the UNet as a bare state dict,
the autoencoder under `state_dict` with the `first_stage_model.` prefix beside
other networks' keys and training state, the text tower inside a whole CLIP
state dict (with its last block, projection and a token of the visual tower).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .. import config as config_lib
from ..models.autoencoder import AutoencoderKL
from ..models.text_encoder import OpenCLIPTextEncoder
from ..models.unet3d import UNet3D
from ..weights import AUTOENCODER_PREFIX

SIZES = {'tiny': config_lib.TINY, 'full': config_lib.FULL}


def _scale_init_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), biases small, norms near 1: activations stay of order one."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                centre = 1.0 if name.endswith('weight') else 0.0
                p.copy_(centre + 0.02 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
    return module


def clip_state_dict(config: config_lib.ModelConfig, generator) -> dict:
    text = OpenCLIPTextEncoder(config.text, layers=config.text.layers)
    text.reset_parameters(generator)
    sd = dict(text.state_dict())
    width = config.text.width
    sd['text_projection'] = torch.randn(width, width, generator=generator) * width ** -0.5
    sd['logit_scale'] = torch.tensor(4.6052)
    sd['visual.class_embedding'] = torch.randn(1280, generator=generator)  # one visual key of ViT-H-14
    return sd


def autoencoder_checkpoint(config: config_lib.ModelConfig, generator) -> dict:
    vae = _scale_init_(AutoencoderKL(config.autoencoder), generator)
    state = {AUTOENCODER_PREFIX + k: v for k, v in vae.state_dict().items()}
    state['model.diffusion_model.input_blocks.0.0.weight'] = torch.zeros(8, 4, 3, 3)  # another network's key
    return {'state_dict': state, 'epoch': 0, 'global_step': 0, 'pytorch-lightning_version': '1.4.2'}


def make_random_model(model_dir: str, size: str = 'tiny', kind: str = 'original', seed: int = 0) -> str:
    """Write configuration.json and the three checkpoint files of a preset size; returns model_dir."""
    if size not in SIZES:
        raise ValueError(f'size={size!r} is not one of {sorted(SIZES)}')
    return write_model_dir(model_dir, SIZES[size], kind, seed)


def write_model_dir(model_dir: str, config: config_lib.ModelConfig, kind: str = 'original',
                    seed: int = 0) -> str:
    """Write a random model of any architecture `config` describes; returns model_dir."""
    if kind not in ('original', 'plugin'):
        raise ValueError(f"kind={kind!r} is not 'original' or 'plugin'")
    os.makedirs(model_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    unet = _scale_init_(UNet3D(config.unet), generator)
    torch.save(unet.state_dict(), os.path.join(model_dir, config.ckpt_unet))
    del unet
    torch.save(autoencoder_checkpoint(config, generator), os.path.join(model_dir, config.ckpt_autoencoder))
    torch.save(clip_state_dict(config, generator), os.path.join(model_dir, config.ckpt_clip))
    with open(os.path.join(model_dir, config_lib.CONFIG_FILE), 'w', encoding='utf-8') as f:
        json.dump(config_lib.configuration_json(config, kind), f, indent=4)
    return model_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model_dir', help='folder to write (created if missing)')
    parser.add_argument('--size', choices=sorted(SIZES), default='tiny')
    parser.add_argument('--config', choices=['original', 'plugin'], default='original',
                        help="configuration.json as released ('original') or selecting this plugin")
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    print(make_random_model(args.model_dir, args.size, args.config, args.seed))


if __name__ == '__main__':
    main()
