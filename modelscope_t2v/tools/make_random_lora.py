"""Write random-weight LoRAs in every format lora/formats.py reads, for a model of a preset size.

    python -m modelscope_t2v.tools.make_random_lora DIR --size tiny|full [--format all] [--rank 4] [--seed 0]

The files are laid out as the real ones, so the tests and a tiny random model (make_random_model.py) exercise
every reader: stable_lora.safetensors (sd-webui-text2video), cloneofsimo_unet.pt / cloneofsimo_text_encoder.pt
(Text-To-Video-Finetuning), peft/ (a PEFT adapter per network, on diffusers' names), mcm/ (a PEFT adapter over the
UNet, as yhzhai/mcm's folders) and t2v-turbo/unet_lora.pt (cloneofsimo's list over every UNet layer, with the
guidance projection of time_cond_proj_dim 256, as T2V-Turbo-MS's). Random pairs change each weight by a few percent.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, Iterable, Optional

import torch

from ..config import ModelConfig
from ..lora import LoraPair, LoraWeights, write_cloneofsimo_lora, write_peft_lora, write_stable_lora
from ..lora import names as N
from .make_random_model import SIZES

FORMATS = ('stable', 'cloneofsimo', 'peft', 'mcm', 't2v-turbo')
GUIDANCE_DIM = 256   # T2V-Turbo's time_cond_proj_dim
# layer kinds by the end of our names
ATTENTION = ('.to_q', '.to_k', '.to_v', '.to_out.0', '.in_proj.q', '.in_proj.k', '.in_proj.v', '.attn.out_proj')
FEED_FORWARD = ('.ff.net.0.proj', '.ff.net.2', '.proj_in', '.proj_out', '.mlp.c_fc', '.mlp.c_proj')
RESNET = ('.in_layers.2', '.out_layers.3', '.emb_layers.1', '.skip_connection')


def random_lora(config: ModelConfig, names: Iterable[str], rank: int, generator: torch.Generator,
                alpha: Optional[float] = None, guidance_dim: int = GUIDANCE_DIM) -> LoraWeights:
    """Random pairs of `rank` on `names`: down ~ N(0, 1 / fan_in), up ~ N(0, 0.05^2 / rank), so a delta is a few
    percent of a weight of order 1 / sqrt(fan_in)."""
    shapes = N.target_shapes(config)
    weights = {}
    for name in names:
        shape = (config.unet.dim, guidance_dim) if name == N.GUIDANCE else shapes[name]
        r = min(rank, shape[0], torch.Size(shape[1:]).numel())
        down = torch.randn(r, *shape[1:], generator=generator) / torch.Size(shape[1:]).numel() ** 0.5
        up = torch.randn(shape[0], r, *[1] * (len(shape) - 2), generator=generator) * 0.05 / r ** 0.5
        weights[name] = LoraPair(down=down, up=up, alpha=alpha)
    return weights


def _names(config: ModelConfig, prefix: str, ends) -> list:
    return [name for name in N.target_shapes(config) if name.startswith(prefix) and name.endswith(ends)]


def make_random_loras(folder: str, config: ModelConfig, formats=FORMATS, rank: int = 4,
                      seed: int = 0) -> Dict[str, str]:
    """Write each format's random LoRA into `folder`; returns format -> the path read_lora takes."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = {}
    if 'stable' in formats:   # attention and feed-forward layers of both networks, resnet convs
        names = _names(config, N.UNET, ATTENTION + FEED_FORWARD + RESNET) + _names(config, N.TEXT, ATTENTION)
        paths['stable'] = os.path.join(folder, 'stable_lora.safetensors')
        write_stable_lora(paths['stable'], random_lora(config, names, rank, g))
    if 'cloneofsimo' in formats:   # every UNet layer, every text layer: the trainer's default targets
        names = (N.unet_injection_order(config.unet, N.UNET_TARGETS[0], None)
                 + N.text_injection_order(config.text, N.TEXT_TARGETS[0]))
        write_cloneofsimo_lora(os.path.join(folder, 'cloneofsimo'), random_lora(config, names, rank, g), config)
        paths['cloneofsimo'] = os.path.join(folder, 'cloneofsimo_unet.pt')
        paths['cloneofsimo-text'] = os.path.join(folder, 'cloneofsimo_text_encoder.pt')
    if 'peft' in formats:   # attention of both networks, alpha = 2 r
        names = _names(config, N.UNET, ATTENTION) + _names(config, N.TEXT, ATTENTION)
        paths['peft'] = os.path.join(folder, 'peft')
        write_peft_lora(paths['peft'], random_lora(config, names, rank, g, alpha=2.0 * rank), config)
    if 'mcm' in formats:   # the UNet's attention, feed-forward and resnet layers
        names = _names(config, N.UNET, ATTENTION + FEED_FORWARD + RESNET)
        paths['mcm'] = os.path.join(folder, 'mcm')
        write_peft_lora(paths['mcm'], random_lora(config, names, rank, g, alpha=float(rank)), config)
    if 't2v-turbo' in formats:   # every UNet layer and the guidance projection, in T2V-Turbo's order
        names = N.unet_injection_order(config.unet, N.UNET_TARGETS[0], GUIDANCE_DIM)
        os.makedirs(os.path.join(folder, 't2v-turbo'), exist_ok=True)
        stem = os.path.join(folder, 't2v-turbo', 'tmp')
        (written,) = write_cloneofsimo_lora(stem, random_lora(config, names, rank, g), config)
        paths['t2v-turbo'] = os.path.join(folder, 't2v-turbo', 'unet_lora.pt')
        os.replace(written, paths['t2v-turbo'])
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('folder', help='folder to write (created if missing)')
    parser.add_argument('--size', choices=sorted(SIZES), default='tiny')
    parser.add_argument('--format', choices=('all',) + FORMATS, default='all')
    parser.add_argument('--rank', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    formats = FORMATS if args.format == 'all' else (args.format,)
    for kind, path in make_random_loras(args.folder, SIZES[args.size], formats, args.rank, args.seed).items():
        print(f'{kind}: {path}')


if __name__ == '__main__':
    main()
