"""Typed configuration read once from a model dir's configuration.json.

The original file (see the model card) holds `model.model_cfg` with `unet_*`
keys and `model.model_args` with checkpoint names. The autoencoder and the
text tower are hard-coded in the original; here they may be described by the
optional `vae_*` and `text_*` keys of `model_cfg`, defaulting to the real
sizes, so that tiny random models can be built for tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Tuple

CONFIG_FILE = 'configuration.json'
PLUGIN_TYPE = 'modelscope-t2v'                    # model/pipeline type that selects this plugin
BUILTIN_TYPE = 'latent-text-to-video-synthesis'   # the original's type, which the plugin replaces
PLUGIN_DISTRIBUTION = 'modelscope-t2v'            # what a configuration's `plugins` key names


@dataclass(frozen=True)
class UNetConfig:
    in_dim: int = 4                    # latent channels in
    dim: int = 320                     # base channel width
    y_dim: int = 768                   # unused by the network; kept from the file
    context_dim: int = 1024            # width of the text embedding
    out_dim: int = 4                   # latent channels out (eps)
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)   # width multiplier per level
    num_heads: int = 8                 # heads of the first temporal transformer
    head_dim: int = 64                 # channels per attention head
    res_blocks: int = 2                # residual blocks per level
    attn_scales: Tuple[float, ...] = (1.0, 0.5, 0.25)  # levels with attention
    dropout: float = 0.1               # training only; inference ignores it
    temporal_attention: bool = True    # temporal transformers on or off


@dataclass(frozen=True)
class AutoencoderConfig:
    ch: int = 128                      # base channel width
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)  # one level each; 2**(n-1) downsampling
    res_blocks: int = 2                # resnet blocks per encoder level
    z_channels: int = 4                # latent channels
    in_channels: int = 3               # RGB
    scale_factor: float = 0.18215      # latent = scale_factor * posterior sample

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along one side (8 for the real model)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408            # CLIP BPE vocabulary
    context_length: int = 77           # tokens per prompt
    width: int = 1024                  # ViT-H-14 text width
    heads: int = 16
    layers: int = 24                   # blocks in the checkpoint
    mlp_ratio: float = 4.0

    @property
    def used_layers(self) -> int:
        """The original takes the penultimate layer: every block but the last."""
        return self.layers - 1


@dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = 1000          # training steps
    beta_start: float = 0.00085        # 'linear_sd' (scaled linear) schedule
    beta_end: float = 0.012
    mean_type: str = 'eps'             # the network predicts noise
    var_type: str = 'fixed_small'


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = UNetConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    ckpt_unet: str = 'text2video_pytorch_model.pth'
    ckpt_autoencoder: str = 'VQGAN_autoencoder.pth'
    ckpt_clip: str = 'open_clip_pytorch_model.bin'
    max_frames: int = 16               # default frame count
    height: int = 256                  # default size in pixels (fine-tunes: model_zoo.KNOWN_MODELS)
    width: int = 256
    sampler: str = 'ddim'              # default sampler (a diffusers folder's scheduler may choose another)


# A model small enough for CPU tests: every feature of the real one, few channels.
TINY = ModelConfig(
    unet=UNetConfig(dim=32, context_dim=64, dim_mult=(1, 2), num_heads=2,
                    head_dim=16, res_blocks=1, attn_scales=(1.0, 0.5)),
    autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 1), res_blocks=1),
    text=TextEncoderConfig(width=64, heads=2, layers=3),
    max_frames=16,
)
FULL = ModelConfig()


def _as_bool(value: Any, key: str) -> bool:
    """The original writes booleans as the strings "True"/"False"."""
    if isinstance(value, bool):
        return value
    if value in ('True', 'true'):
        return True
    if value in ('False', 'false'):
        return False
    raise ValueError(f'{key}={value!r} is not a boolean; use true or false')


# configuration.json key -> (section, field); the only place file names meet code names.
_UNET_KEYS = {
    'unet_in_dim': 'in_dim', 'unet_dim': 'dim', 'unet_y_dim': 'y_dim',
    'unet_context_dim': 'context_dim', 'unet_out_dim': 'out_dim',
    'unet_dim_mult': 'dim_mult', 'unet_num_heads': 'num_heads',
    'unet_head_dim': 'head_dim', 'unet_res_blocks': 'res_blocks',
    'unet_attn_scales': 'attn_scales', 'unet_dropout': 'dropout',
    'temporal_attention': 'temporal_attention',
}
_VAE_KEYS = {'vae_ch': 'ch', 'vae_ch_mult': 'ch_mult', 'vae_res_blocks': 'res_blocks',
             'vae_z_channels': 'z_channels', 'vae_scale_factor': 'scale_factor'}
_TEXT_KEYS = {'text_vocab_size': 'vocab_size', 'text_context_length': 'context_length',
              'text_width': 'width', 'text_heads': 'heads', 'text_layers': 'layers',
              'text_mlp_ratio': 'mlp_ratio'}
_DIFFUSION_KEYS = {'num_timesteps': 'num_timesteps', 'mean_type': 'mean_type',
                   'var_type': 'var_type', 'beta_start': 'beta_start', 'beta_end': 'beta_end'}
_IGNORED_KEYS = {'loss_type'}  # training only


def _section(cls, cfg: Mapping[str, Any], keys: Mapping[str, str]):
    values = {}
    for key, field in keys.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if field == 'temporal_attention':
            value = _as_bool(value, key)
        elif isinstance(value, list):
            value = tuple(value)
        values[field] = value
    return cls(**values)


def from_dict(raw: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the parsed configuration.json."""
    model = raw.get('model')
    if not isinstance(model, Mapping):
        raise ValueError("configuration.json has no 'model' section")
    cfg = model.get('model_cfg', {})
    args = model.get('model_args', {})
    known = set(_UNET_KEYS) | set(_VAE_KEYS) | set(_TEXT_KEYS) | set(_DIFFUSION_KEYS) | _IGNORED_KEYS
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f'configuration.json model_cfg has unknown keys {unknown}; '
                         f'known keys are {sorted(known)}')
    if cfg.get('mean_type', 'eps') != 'eps':
        raise ValueError(f"mean_type={cfg['mean_type']!r} is not supported; only 'eps'")
    defaults = ModelConfig()
    return ModelConfig(
        unet=_section(UNetConfig, cfg, _UNET_KEYS),
        autoencoder=_section(AutoencoderConfig, cfg, _VAE_KEYS),
        text=_section(TextEncoderConfig, cfg, _TEXT_KEYS),
        diffusion=_section(DiffusionConfig, cfg, _DIFFUSION_KEYS),
        ckpt_unet=args.get('ckpt_unet', defaults.ckpt_unet),
        ckpt_autoencoder=args.get('ckpt_autoencoder', defaults.ckpt_autoencoder),
        ckpt_clip=args.get('ckpt_clip', defaults.ckpt_clip),
        max_frames=int(args.get('max_frames', defaults.max_frames)),
    )


def load(model_dir: str | os.PathLike) -> ModelConfig:
    """Read `model_dir/configuration.json`."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: a model dir holds {CONFIG_FILE} '
                                'beside the three checkpoint files')
    with open(path, encoding='utf-8') as f:
        return from_dict(json.load(f))


def configuration_json(config: ModelConfig, kind: str = 'original') -> dict:
    """configuration.json describing `config`: the original's layout ('original') or one that selects this
    plugin ('plugin'). FULL gives exactly the released file."""
    if kind not in ('original', 'plugin'):
        raise ValueError(f"kind={kind!r} is not 'original' or 'plugin'")
    model_cfg = to_model_cfg(config)
    if config.unet == FULL.unet and config.autoencoder == FULL.autoencoder and config.text == FULL.text \
            and config.diffusion == FULL.diffusion:   # exactly the released keys
        model_cfg = {k: v for k, v in model_cfg.items() if not k.startswith(('vae_', 'text_', 'beta_'))}
    model_cfg['loss_type'] = 'mse'
    model_type = PLUGIN_TYPE if kind == 'plugin' else BUILTIN_TYPE
    out = {
        'framework': 'pytorch',
        'task': 'text-to-video-synthesis',
        'model': {
            'type': model_type,
            'model_args': {'ckpt_clip': config.ckpt_clip, 'ckpt_unet': config.ckpt_unet,
                           'ckpt_autoencoder': config.ckpt_autoencoder,
                           'max_frames': config.max_frames, 'tiny_gpu': 1},
            'model_cfg': model_cfg,
        },
        'pipeline': {'type': model_type},
    }
    if kind == 'plugin':
        out['preprocessor'] = {'type': model_type}
        out['plugins'] = [PLUGIN_DISTRIBUTION]
    return out


def virtual_configuration_json() -> dict:
    """What ModelScope reads as configuration.json of a model folder without one that this plugin loads."""
    return {'framework': 'pytorch', 'task': 'text-to-video-synthesis',
            'model': {'type': PLUGIN_TYPE}, 'pipeline': {'type': PLUGIN_TYPE}}


def to_model_cfg(config: ModelConfig) -> dict:
    """The `model_cfg` dict of configuration.json that describes `config`."""
    out = {}
    for keys, section in ((_UNET_KEYS, config.unet), (_VAE_KEYS, config.autoencoder),
                          (_TEXT_KEYS, config.text), (_DIFFUSION_KEYS, config.diffusion)):
        for key, field in keys.items():
            value = getattr(section, field)
            out[key] = list(value) if isinstance(value, tuple) else value
    out['temporal_attention'] = 'True' if config.unet.temporal_attention else 'False'
    return out


def replace(config, **changes):
    """dataclasses.replace, re-exported so callers need one import."""
    return dataclasses.replace(config, **changes)
