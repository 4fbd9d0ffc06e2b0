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
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Mapping, Tuple

CONFIG_FILE = 'configuration.json'
PLUGIN_TYPE = 'modelscope-t2v'                    # model/pipeline type that selects this plugin
BUILTIN_TYPE = 'latent-text-to-video-synthesis'   # the original's type, which the plugin replaces
PLUGIN_DISTRIBUTION = 'modelscope-t2v'            # what a configuration's `plugins` key names
MAX_FRAMES = 1024       # frames of one video (request.py's range of num_frames)
MAX_SIDE = 4096         # pixels along a side (request.py's range of height and width)
GROUPS = 32             # every GroupNorm of the UNet and the autoencoder has 32 groups
TOKENIZER_VOCAB = 49408  # ids the CLIP tokenizer emits: a text embedding needs at least as many rows


# -- what a configuration may hold: every network can be built from it and run --------------------------

# field -> rule: ('int', low) an int >= low; a finite number that is ('positive',) > 0, ('unit',) in (0, 1) or
# ('fraction',) in [0, 1); ('ints',) a non-empty list of ints >= 1; ('scales',) a list of numbers in (0, 1];
# ('bool',); ('str',)
_RULES = {
    'UNetConfig': {'in_dim': ('int', 1), 'dim': ('int', GROUPS), 'y_dim': ('int', 1), 'context_dim': ('int', 1),
                   'out_dim': ('int', 1), 'dim_mult': ('ints',), 'num_heads': ('int', 1), 'head_dim': ('int', 1),
                   'res_blocks': ('int', 1), 'attn_scales': ('scales',), 'dropout': ('fraction',),
                   'temporal_attention': ('bool',)},
    'AutoencoderConfig': {'ch': ('int', 1), 'ch_mult': ('ints',), 'res_blocks': ('int', 1), 'z_channels': ('int', 1),
                          'in_channels': ('int', 1), 'scale_factor': ('positive',)},
    'TextEncoderConfig': {'vocab_size': ('int', TOKENIZER_VOCAB), 'context_length': ('int', 2), 'width': ('int', 1),
                          'heads': ('int', 1), 'layers': ('int', 2), 'mlp_ratio': ('positive',)},
    'DiffusionConfig': {'num_timesteps': ('int', 1), 'beta_start': ('unit',), 'beta_end': ('unit',),
                        'mean_type': ('str',), 'var_type': ('str',)},
}
_REAL_RANGES = {'positive': ('> 0', lambda v: v > 0), 'unit': ('in (0, 1)', lambda v: 0 < v < 1),
                'fraction': ('in [0, 1)', lambda v: 0 <= v < 1)}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_value(value: Any, rule: tuple, name: str) -> None:
    """Raise TypeError/ValueError naming `name` when `value` breaks `rule` (see _RULES)."""
    kind = rule[0]
    if kind == 'int' and not _is_int(value):
        raise TypeError(f'{name}={value!r} must be an integer of at least {rule[1]}')
    if kind == 'int' and value < rule[1]:
        raise ValueError(f'{name}={value!r} must be at least {rule[1]}')
    if kind in _REAL_RANGES:
        bounds, within = _REAL_RANGES[kind]
        if not _is_real(value):
            raise TypeError(f'{name}={value!r} must be a finite number {bounds}')
        if not within(value):
            raise ValueError(f'{name}={value!r} must be a number {bounds}')
    if kind == 'ints' and not (isinstance(value, (list, tuple)) and value and all(_is_int(v) and v >= 1 for v in value)):
        raise ValueError(f'{name}={value!r} must be a non-empty list of integers of at least 1')
    if kind == 'scales' and not (isinstance(value, (list, tuple)) and all(_is_real(v) and 0 < v <= 1 for v in value)):
        raise ValueError(f'{name}={value!r} must be a list of numbers in (0, 1]')
    if kind == 'bool' and not isinstance(value, bool):
        raise TypeError(f'{name}={value!r} must be true or false')
    if kind == 'str' and not isinstance(value, str):
        raise TypeError(f'{name}={value!r} must be a string')


def check_section(cls, values: Mapping[str, Any], names: Mapping[str, str] = None) -> None:
    """Check the fields of one network's configuration (`values`: field -> value, the others at their
    defaults); errors name names[field] (configuration.json's key), else the field."""
    names = names or {}
    for field, value in values.items():
        check_value(value, _RULES[cls.__name__][field], names.get(field, field))
    v = {f.name: f.default for f in dataclasses.fields(cls)} | dict(values)
    name = lambda field: names.get(field, field)  # noqa: E731
    if cls is UNetConfig and v['dim'] % GROUPS:
        raise ValueError(f"{name('dim')}={v['dim']} must be a multiple of {GROUPS}, the GroupNorms' groups")
    if cls is UNetConfig and v['head_dim'] > v['dim']:
        raise ValueError(f"{name('head_dim')}={v['head_dim']} must be at most {name('dim')}={v['dim']}: an "
                         'attention layer of width c has c // head_dim heads')
    if cls is AutoencoderConfig and any(v['ch'] * m % GROUPS for m in v['ch_mult']):
        raise ValueError(f"{name('ch')}={v['ch']} times each of {name('ch_mult')}={list(v['ch_mult'])} must be a "
                         f"multiple of {GROUPS}, the GroupNorms' groups")
    if cls is TextEncoderConfig and v['width'] % v['heads']:
        raise ValueError(f"{name('width')}={v['width']} must be a multiple of {name('heads')}={v['heads']}")
    if cls is DiffusionConfig and v['mean_type'] != 'eps':
        raise ValueError(f"{name('mean_type')}={v['mean_type']!r} is not supported; only 'eps'")
    if cls is DiffusionConfig and v['beta_start'] >= v['beta_end']:
        raise ValueError(f"{name('beta_start')}={v['beta_start']} must be below {name('beta_end')}={v['beta_end']}")


def check_checkpoint_name(value: Any, name: str) -> None:
    """A checkpoint's file name from a configuration: a path inside the model folder, never outside it."""
    if not isinstance(value, str) or not value:
        raise TypeError(f'{name}={value!r} must be the name of a file in the model folder')
    parts = value.replace('\\', '/').split('/')
    if '\0' in value or os.path.isabs(value) or value.startswith('\\') or '..' in parts or ':' in parts[0]:
        raise ValueError(f"{name}={value!r} must name a file inside the model folder: a relative path without "
                         "'..', like 'text2video_pytorch_model.pth'")


def check_model(config: 'ModelConfig') -> None:
    """What the three networks and the generation defaults need of each other."""
    for name in ('ckpt_unet', 'ckpt_autoencoder', 'ckpt_clip'):
        check_checkpoint_name(getattr(config, name), name)
    check_value(config.max_frames, ('int', 1), 'max_frames')
    if config.max_frames > MAX_FRAMES:
        raise ValueError(f'max_frames={config.max_frames} must be at most {MAX_FRAMES}')
    cell = config.autoencoder.downsample
    for name in ('height', 'width'):
        value = getattr(config, name)
        check_value(value, ('int', cell), name)
        if value % cell or value > MAX_SIDE:
            raise ValueError(f'{name}={value} must be a multiple of {cell} up to {MAX_SIDE}')
    if config.unet.context_dim != config.text.width:
        raise ValueError(f"the UNet's context_dim={config.unet.context_dim} must equal the text encoder's "
                         f'width={config.text.width}: its cross-attention reads the text embeddings')
    if not config.unet.in_dim == config.unet.out_dim == config.autoencoder.z_channels:
        raise ValueError(f"the UNet's in_dim={config.unet.in_dim} and out_dim={config.unet.out_dim} must equal "
                         f"the autoencoder's z_channels={config.autoencoder.z_channels}: all are latent channels")


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

    def __post_init__(self):
        check_section(type(self), dataclasses.asdict(self))


@dataclass(frozen=True)
class AutoencoderConfig:
    ch: int = 128                      # base channel width
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)  # one level each; 2**(n-1) downsampling
    res_blocks: int = 2                # resnet blocks per encoder level
    z_channels: int = 4                # latent channels
    in_channels: int = 3               # RGB
    scale_factor: float = 0.18215      # latent = scale_factor * posterior sample

    def __post_init__(self):
        check_section(type(self), dataclasses.asdict(self))

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

    def __post_init__(self):
        check_section(type(self), dataclasses.asdict(self))

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

    def __post_init__(self):
        check_section(type(self), dataclasses.asdict(self))


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

    def __post_init__(self):
        check_model(self)


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
    """One network's configuration from model_cfg; errors name configuration.json's keys."""
    values = {}
    for key, field in keys.items():
        if key not in cfg:
            continue
        values[field] = _as_bool(cfg[key], key) if field == 'temporal_attention' else cfg[key]
    check_section(cls, values, {field: key for key, field in keys.items()})   # the values as the file has them
    return cls(**{field: tuple(v) if isinstance(v, list) else v for field, v in values.items()})


def from_dict(raw: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the parsed configuration.json; ValueError/TypeError name the key."""
    if not isinstance(raw, Mapping):
        raise TypeError(f"{CONFIG_FILE} must hold a JSON object like {{\"model\": {{...}}}}, not a "
                        f'{type(raw).__name__}')
    model = raw.get('model')
    if not isinstance(model, Mapping):
        raise ValueError(f"{CONFIG_FILE} has no 'model' section")
    cfg = model.get('model_cfg', {})
    args = model.get('model_args', {})
    for name, section in (('model_cfg', cfg), ('model_args', args)):
        if not isinstance(section, Mapping):
            raise TypeError(f'model.{name} must be a JSON object, not {section!r}')
    known = set(_UNET_KEYS) | set(_VAE_KEYS) | set(_TEXT_KEYS) | set(_DIFFUSION_KEYS) | _IGNORED_KEYS
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f'{CONFIG_FILE} model_cfg has unknown keys {unknown}; '
                         f'known keys are {sorted(known)}')
    defaults = ModelConfig()
    files = {key: args.get(key, getattr(defaults, key)) for key in ('ckpt_unet', 'ckpt_autoencoder', 'ckpt_clip')}
    for key, name in files.items():
        check_checkpoint_name(name, f'model_args.{key}')
    max_frames = args.get('max_frames', defaults.max_frames)
    check_value(max_frames, ('int', 1), 'model_args.max_frames')
    return ModelConfig(
        unet=_section(UNetConfig, cfg, _UNET_KEYS),
        autoencoder=_section(AutoencoderConfig, cfg, _VAE_KEYS),
        text=_section(TextEncoderConfig, cfg, _TEXT_KEYS),
        diffusion=_section(DiffusionConfig, cfg, _DIFFUSION_KEYS),
        max_frames=max_frames, **files,
    )


def load(model_dir: str | os.PathLike) -> ModelConfig:
    """Read `model_dir/configuration.json`; every error names the file."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: a model dir holds {CONFIG_FILE} '
                                'beside the three checkpoint files')
    raw = read_json(path)
    try:
        return from_dict(raw)
    except (ValueError, TypeError) as error:
        raise (TypeError if isinstance(error, TypeError) else ValueError)(f'{path}: {error}') from None


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in the file `path`; ValueError naming the file when it holds anything else."""
    try:
        with open(path, encoding='utf-8') as f:
            raw = json.load(f)
    except ValueError as error:   # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f'{os.fspath(path)} is not valid JSON: {error}') from None
    if not isinstance(raw, dict):
        raise ValueError(f'{os.fspath(path)} must hold a JSON object like {{"model": {{...}}}}, not a '
                         f'{type(raw).__name__}')
    return raw


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
