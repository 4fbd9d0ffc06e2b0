"""Key and config mapping between the original layout and the diffusers layout of the fine-tunes.

The original (ModelScope's release) | diffusers / transformers (zeroscope, potat1, text-to-video-ms-1.7b)
UNetSD keys (`temopral_conv`, ...)  | unet/: diffusers' UNet3DConditionModel
LDM autoencoder keys                | vae/: diffusers' AutoencoderKL
open_clip text tower, used blocks   | text_encoder/: transformers' CLIPTextModel of those blocks

Tensors pass unchanged except three kinds:
- a temporal transformer's proj_in/proj_out is a 1x1 Conv1d (c, c, 1) in the original, a Linear (c, c) in diffusers;
- the autoencoder's mid-block attention q/k/v/proj_out are 1x1 Conv2d (c, c, 1, 1), Linear in diffusers;
- open_clip's fused attn.in_proj_{weight,bias} (3c, ...) are CLIP's self_attn.{q,k,v}_proj.
A key neither side knows raises a ValueError that names it. Only torch and the config module are imported.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch

from .config import AutoencoderConfig, TextEncoderConfig, UNetConfig

StateDict = Dict[str, torch.Tensor]
# original leaf module -> (diffusers leaf module, the trailing unit dims of its weight in the original: a 1x1 Conv1d
# (1) or Conv2d (2) there is a Linear in diffusers; 0: same shape)
Table = Dict[str, Tuple[str, int]]
PARAMS = ('weight', 'bias')
MAX_KEYS_SHOWN = 5


# -- shared machinery ----------------------------------------------------------------------------

def _raise_unknown(unknown: List[str], what: str) -> None:
    if unknown:
        more = f' and {len(unknown) - MAX_KEYS_SHOWN} more' if len(unknown) > MAX_KEYS_SHOWN else ''
        raise ValueError(f'{len(unknown)} keys are not {what} parameters: {unknown[:MAX_KEYS_SHOWN]}{more}')


def _count(keys: Iterable[str], prefix: str) -> int:
    """How many distinct indices follow `prefix` ('down_blocks.' -> the number of levels)."""
    return len({key[len(prefix):].split('.')[0] for key in keys if key.startswith(prefix)})


def _apply(state: StateDict, table: Table, to_diffusers: bool, what: str) -> StateDict:
    """Rename every key `leaf.param` by `table` (read backwards from diffusers), 1x1 convs <-> Linear."""
    if not to_diffusers:
        table = {new: (old, dims) for old, (new, dims) in table.items()}
    out, unknown = {}, []
    for key, value in state.items():
        leaf, _, param = key.rpartition('.')
        if leaf not in table or param not in PARAMS:
            unknown.append(key)
            continue
        new, dims = table[leaf]
        if dims and param == 'weight':   # (o, i, 1[, 1]) <-> (o, i)
            value = value.reshape(value.shape[:2]) if to_diffusers else value.reshape(*value.shape, *(1,) * dims)
        out[f'{new}.{param}'] = value
    _raise_unknown(unknown, what)
    return out


# -- UNet: UNetSD <-> UNet3DConditionModel -------------------------------------------------------

_UNET_TOP = {'time_embed.0': 'time_embedding.linear_1', 'time_embed.2': 'time_embedding.linear_2',
             'input_blocks.0.0': 'conv_in', 'out.0': 'conv_norm_out', 'out.2': 'conv_out'}
_RESNET = {'in_layers.0': 'norm1', 'in_layers.2': 'conv1', 'emb_layers.1': 'time_emb_proj',
           'out_layers.0': 'norm2', 'out_layers.3': 'conv2', 'skip_connection': 'conv_shortcut'}
_TEMPORAL_CONV = ('conv1.0', 'conv1.2', 'conv2.0', 'conv2.3', 'conv3.0', 'conv3.3', 'conv4.0', 'conv4.3')
_TRANSFORMER = ('norm', 'proj_in', 'proj_out') + tuple(
    f'transformer_blocks.0.{leaf}' for leaf in (
        'norm1', 'norm2', 'norm3', 'ff.net.0.proj', 'ff.net.2',
        *(f'attn{i}.{p}' for i in (1, 2) for p in ('to_q', 'to_k', 'to_v', 'to_out.0'))))
_TEMPORAL_LINEAR = ('proj_in', 'proj_out')   # Conv1d in the original's temporal transformers


def _add_resnet(table: Table, ours: str, block: str, index: int) -> None:
    """ResBlock `ours` (its temporal conv inside) -> `block`.resnets.index and `block`.temp_convs.index."""
    table.update({f'{ours}.{o}': (f'{block}.resnets.{index}.{d}', 0) for o, d in _RESNET.items()})
    table.update({f'{ours}.temopral_conv.{leaf}': (f'{block}.temp_convs.{index}.{leaf}', 0)
                  for leaf in _TEMPORAL_CONV})


def _add_transformer(table: Table, ours: str, theirs: str, temporal: bool) -> None:
    table.update({f'{ours}.{leaf}': (f'{theirs}.{leaf}', int(temporal and leaf in _TEMPORAL_LINEAR))
                  for leaf in _TRANSFORMER})


def _add_layer(table: Table, ours: str, block: str, index: int, attention: bool) -> None:
    """One UNetSD block [ResBlock, SpatialTransformer, TemporalTransformer] -> layer `index` of `block`."""
    _add_resnet(table, f'{ours}.0', block, index)
    if attention:
        _add_transformer(table, f'{ours}.1', f'{block}.attentions.{index}', temporal=False)
        _add_transformer(table, f'{ours}.2', f'{block}.temp_attentions.{index}', temporal=True)


def _unet_table(levels: int, res_blocks: int, attention: Tuple[bool, ...]) -> Table:
    """Every leaf of a UNet with `levels` levels (attention[level]: has transformers), shallowest first."""
    table = {ours: (theirs, 0) for ours, theirs in _UNET_TOP.items()}
    _add_transformer(table, 'input_blocks.0.1', 'transformer_in', temporal=True)
    per_level = res_blocks + 1                  # blocks a level: ResBlocks and a Downsample in, one more ResBlock out
    for level in range(levels):
        first = 1 + level * per_level
        for r in range(res_blocks):
            _add_layer(table, f'input_blocks.{first + r}', f'down_blocks.{level}', r, attention[level])
        if level < levels - 1:
            table[f'input_blocks.{first + res_blocks}.op'] = (f'down_blocks.{level}.downsamplers.0.conv', 0)
    _add_resnet(table, 'middle_block.0', 'mid_block', 0)
    _add_transformer(table, 'middle_block.1', 'mid_block.attentions.0', temporal=False)
    _add_transformer(table, 'middle_block.2', 'mid_block.temp_attentions.0', temporal=True)
    _add_resnet(table, 'middle_block.3', 'mid_block', 1)
    for up in range(levels):                    # up_blocks.0 is the deepest level
        with_attention = attention[levels - 1 - up]
        for j in range(per_level):
            _add_layer(table, f'output_blocks.{up * per_level + j}', f'up_blocks.{up}', j, with_attention)
        if up < levels - 1:                     # the Upsample follows the last block's layers
            last = f'output_blocks.{up * per_level + res_blocks}.{3 if with_attention else 1}'
            table[f'{last}.conv'] = (f'up_blocks.{up}.upsamplers.0.conv', 0)
    return table


def _unet_layout(state: StateDict, diffusers: bool) -> Tuple[int, int, Tuple[bool, ...]]:
    """(levels, res_blocks, attention per level) of a UNet state dict in either layout."""
    if diffusers:
        levels, res_blocks = _count(state, 'down_blocks.'), _count(state, 'down_blocks.0.resnets.')
        first_attention = [f'down_blocks.{level}.attentions.0' for level in range(levels)]
    else:   # a level: res_blocks + 1 output blocks; all levels but the last: a Downsample (`op`)
        levels, outputs = 1 + sum(key.endswith('.op.weight') for key in state), _count(state, 'output_blocks.')
        res_blocks = outputs // levels - 1 if outputs % levels == 0 else 0
        first_attention = [f'input_blocks.{1 + level * (res_blocks + 1)}.1' for level in range(levels)]
    if levels < 1 or res_blocks < 1:
        raise ValueError(f'not a UNet3D state dict in the {"diffusers" if diffusers else "original"} layout: '
                         f'found {levels} levels of {res_blocks} blocks')
    return levels, res_blocks, tuple(f'{prefix}.norm.weight' in state for prefix in first_attention)


def unet_leaf_table(config: UNetConfig) -> Table:
    """Every leaf module of a UNet of `config`'s architecture: our name -> (diffusers name, unit dims of ours)."""
    attention = tuple(0.5 ** level in config.attn_scales for level in range(len(config.dim_mult)))
    return _unet_table(len(config.dim_mult), config.res_blocks, attention)


def unet_to_diffusers(state: StateDict) -> StateDict:
    """Original UNetSD keys -> diffusers UNet3DConditionModel keys."""
    layout = _unet_layout(state, diffusers=False)
    if 'input_blocks.0.1.norm.weight' not in state:
        raise ValueError('the UNet has no temporal attention (temporal_attention=False), which diffusers\' '
                         'UNet3DConditionModel always has')
    return _apply(state, _unet_table(*layout), True, 'original UNet')


def unet_from_diffusers(state: StateDict) -> StateDict:
    """Diffusers UNet3DConditionModel keys -> original UNetSD keys."""
    return _apply(state, _unet_table(*_unet_layout(state, diffusers=True)), False, 'UNet3DConditionModel')


# -- autoencoder: latent diffusion's AutoencoderKL <-> diffusers' AutoencoderKL ------------------

_VAE_RESNET = {'norm1': 'norm1', 'conv1': 'conv1', 'norm2': 'norm2', 'conv2': 'conv2',
               'nin_shortcut': 'conv_shortcut'}
_VAE_ATTENTION = {'norm': ('group_norm', 0), 'q': ('to_q', 2), 'k': ('to_k', 2), 'v': ('to_v', 2),
                  'proj_out': ('to_out.0', 2)}
# older diffusers' names of the mid-block attention (its AttentionBlock), which early vae/ files hold
_VAE_DEPRECATED = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _add_vae_resnet(table: Table, ours: str, theirs: str) -> None:
    table.update({f'{ours}.{o}': (f'{theirs}.{d}', 0) for o, d in _VAE_RESNET.items()})


def _autoencoder_table(levels: int, blocks: int) -> Table:
    """Every leaf of an autoencoder of `levels` levels and at most `blocks` resnets a level.

    The decoder's levels are stored shallowest first in the original (up.0 is full size), deepest first in
    diffusers (up_blocks.0 follows the mid block).
    """
    table = {leaf: (leaf, 0) for leaf in ('quant_conv', 'post_quant_conv')}
    for part in ('encoder', 'decoder'):
        table.update({f'{part}.{leaf}': (f'{part}.{leaf}', 0) for leaf in ('conv_in', 'conv_out')})
        table[f'{part}.norm_out'] = (f'{part}.conv_norm_out', 0)
        _add_vae_resnet(table, f'{part}.mid.block_1', f'{part}.mid_block.resnets.0')
        _add_vae_resnet(table, f'{part}.mid.block_2', f'{part}.mid_block.resnets.1')
        table.update({f'{part}.mid.attn_1.{o}': (f'{part}.mid_block.attentions.0.{d}', dims)
                      for o, (d, dims) in _VAE_ATTENTION.items()})
    for level in range(levels):
        down, up = f'encoder.down_blocks.{level}', f'decoder.up_blocks.{levels - 1 - level}'
        for j in range(blocks):
            _add_vae_resnet(table, f'encoder.down.{level}.block.{j}', f'{down}.resnets.{j}')
            _add_vae_resnet(table, f'decoder.up.{level}.block.{j}', f'{up}.resnets.{j}')
        table[f'encoder.down.{level}.downsample.conv'] = (f'{down}.downsamplers.0.conv', 0)
        table[f'decoder.up.{level}.upsample.conv'] = (f'{up}.upsamplers.0.conv', 0)
    return table


def autoencoder_to_diffusers(state: StateDict) -> StateDict:
    """Our autoencoder keys (latent diffusion's, without `first_stage_model.`) -> diffusers AutoencoderKL keys."""
    table = _autoencoder_table(_count(state, 'decoder.up.'), _count(state, 'decoder.up.0.block.'))
    return _apply(state, table, True, 'original autoencoder')


def autoencoder_from_diffusers(state: StateDict) -> StateDict:
    """Diffusers AutoencoderKL keys (also older diffusers' names of the mid-block attention) -> ours."""
    def current(key: str) -> str:
        head, sep, tail = key.partition('.mid_block.attentions.0.')
        name, _, param = tail.rpartition('.')
        return f'{head}{sep}{_VAE_DEPRECATED[name]}.{param}' if name in _VAE_DEPRECATED else key

    state = {current(key): value for key, value in state.items()}
    table = _autoencoder_table(_count(state, 'decoder.up_blocks.'), _count(state, 'decoder.up_blocks.0.resnets.'))
    return _apply(state, table, False, 'diffusers AutoencoderKL')


# -- text tower: open_clip <-> transformers' CLIPTextModel ---------------------------------------

HF_TEXT_PREFIX = 'text_model.'   # CLIPTextModel's keys in files of transformers < 5 (which loads either way)
_TEXT_TOP = {'token_embedding.weight': 'embeddings.token_embedding.weight',
             'positional_embedding': 'embeddings.position_embedding.weight',
             'ln_final.weight': 'final_layer_norm.weight', 'ln_final.bias': 'final_layer_norm.bias'}
_TEXT_BLOCK = {'ln_1': 'layer_norm1', 'attn.out_proj': 'self_attn.out_proj', 'ln_2': 'layer_norm2',
               'mlp.c_fc': 'mlp.fc1', 'mlp.c_proj': 'mlp.fc2'}
_TEXT_BUFFER = 'embeddings.position_ids'   # an arange that transformers < 4.31 saved; no parameter


def _text_tables(layers: int) -> Tuple[Dict[str, str], Dict[str, Tuple[str, str, str]]]:
    """(renames, splits) for `layers` blocks: open_clip key -> CLIP key; fused in_proj key -> its q, k, v keys."""
    renames = {ours: HF_TEXT_PREFIX + theirs for ours, theirs in _TEXT_TOP.items()}
    splits = {}
    for i in range(layers):
        ours, theirs = f'transformer.resblocks.{i}', f'{HF_TEXT_PREFIX}encoder.layers.{i}'
        for param in PARAMS:
            renames.update({f'{ours}.{o}.{param}': f'{theirs}.{d}.{param}' for o, d in _TEXT_BLOCK.items()})
            splits[f'{ours}.attn.in_proj_{param}'] = tuple(f'{theirs}.self_attn.{x}_proj.{param}' for x in 'qkv')
    return renames, splits


def text_to_diffusers(state: StateDict) -> StateDict:
    """open_clip text-tower keys of the used blocks (OpenCLIPTextEncoder's) -> CLIPTextModel keys."""
    renames, splits = _text_tables(_count(state, 'transformer.resblocks.'))
    out, unknown = {}, []
    for key, value in state.items():
        if key in renames:
            out[renames[key]] = value
        elif key in splits:   # rows q, k, v; copies, as three views of one storage cannot go into safetensors
            out.update(zip(splits[key], (part.clone() for part in value.chunk(3))))
        else:
            unknown.append(key)
    _raise_unknown(unknown, 'open_clip text tower')
    return out


def text_from_diffusers(state: StateDict) -> StateDict:
    """CLIPTextModel keys, with or without `text_model.` (transformers >= 5 saves none) -> open_clip keys."""
    given = {key if key.startswith(HF_TEXT_PREFIX) else HF_TEXT_PREFIX + key: key
             for key in state if not key.endswith(_TEXT_BUFFER)}          # prefixed key -> the key as given
    renames, splits = _text_tables(_count(given, f'{HF_TEXT_PREFIX}encoder.layers.'))
    back = {theirs: ours for ours, theirs in renames.items()}
    split_keys = {part for parts in splits.values() for part in parts}
    _raise_unknown([key for name, key in given.items() if name not in back and name not in split_keys],
                   'CLIPTextModel')
    out = {back[name]: state[key] for name, key in given.items() if name in back}
    for ours, parts in splits.items():
        missing = [part for part in parts if part not in given]
        if missing:
            raise ValueError(f'CLIPTextModel state dict lacks {missing}')
        out[ours] = torch.cat([state[given[part]] for part in parts])
    return out


# -- configs -------------------------------------------------------------------------------------

# the same in every published config.json; a file that differs describes a network these modules are not
_UNET_FIXED = {'_class_name': 'UNet3DConditionModel', 'act_fn': 'silu', 'norm_num_groups': 32, 'norm_eps': 1e-05,
               'downsample_padding': 1, 'mid_block_scale_factor': 1, 'num_attention_heads': None,
               'time_cond_proj_dim': None}
_VAE_FIXED = {'_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'norm_num_groups': 32, 'use_quant_conv': True,
              'use_post_quant_conv': True, 'mid_block_add_attention': True, 'latents_mean': None,
              'latents_std': None, 'shift_factor': None}
_TEXT_FIXED = {'model_type': 'clip_text_model', 'hidden_act': 'gelu', 'layer_norm_eps': 1e-05}
# the published text_encoder/config.json's other fields (CLIPTextModel runs no projection; the ids pool only)
_TEXT_PUBLISHED = {'architectures': ['CLIPTextModel'], 'attention_dropout': 0.0, 'dropout': 0.0,
                   'bos_token_id': 0, 'eos_token_id': 2, 'pad_token_id': 1, 'initializer_factor': 1.0,
                   'initializer_range': 0.02, 'projection_dim': 512}
TEMPORAL_IN_HEADS = 8   # diffusers builds the first temporal transformer (transformer_in) with 8 heads, always
UNET_SAMPLE_SIZE = 32   # published: 256 pixels / 8; a writer that knows the default size replaces it
VAE_SAMPLE_SIZE = 512   # published; diffusers reads it only to tile


def _check(raw: dict, required: Tuple[str, ...], fixed: dict, source: str) -> None:
    """`required` keys present, `fixed` ones absent or at their only supported value."""
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f'{source} config lacks {missing}')
    for key, value in fixed.items():
        if raw.get(key, value) != value:
            raise ValueError(f'{source} config has {key}={raw[key]!r}; only {value!r} is supported')


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """unet/config.json of the UNet3DConditionModel with `config`'s architecture."""
    if not config.temporal_attention:
        raise ValueError('temporal_attention=False: diffusers\' UNet3DConditionModel always has temporal attention')
    if config.num_heads != TEMPORAL_IN_HEADS:
        raise ValueError(f'num_heads={config.num_heads}: diffusers\' UNet3DConditionModel gives its first '
                         f'temporal transformer {TEMPORAL_IN_HEADS} heads, always')
    if config.dim_mult[0] != 1:
        raise ValueError(f'dim_mult={config.dim_mult}: diffusers\' conv_in gives the first level its width, '
                         'so dim_mult[0] must be 1')
    attention = [0.5 ** level in config.attn_scales for level in range(len(config.dim_mult))]
    return {**_UNET_FIXED,
            'attention_head_dim': config.head_dim,                    # per head; heads = width // head_dim
            'block_out_channels': [config.dim * mult for mult in config.dim_mult],
            'cross_attention_dim': config.context_dim,
            'down_block_types': ['CrossAttnDownBlock3D' if a else 'DownBlock3D' for a in attention],
            'in_channels': config.in_dim,
            'layers_per_block': config.res_blocks,
            'out_channels': config.out_dim,
            'sample_size': UNET_SAMPLE_SIZE,
            'up_block_types': ['CrossAttnUpBlock3D' if a else 'UpBlock3D' for a in reversed(attention)]}


def unet_config_from_diffusers(raw: dict) -> UNetConfig:
    """UNetConfig of a UNet3DConditionModel's config.json (y_dim and dropout, which it lacks, at defaults)."""
    _check(raw, ('attention_head_dim', 'block_out_channels', 'cross_attention_dim', 'down_block_types',
                 'in_channels', 'layers_per_block', 'out_channels', 'up_block_types'), _UNET_FIXED, 'unet')
    channels, down = list(raw['block_out_channels']), list(raw['down_block_types'])
    attention = [kind == 'CrossAttnDownBlock3D' for kind in down]
    up = ['CrossAttnUpBlock3D' if a else 'UpBlock3D' for a in reversed(attention)]
    if (any(kind not in ('CrossAttnDownBlock3D', 'DownBlock3D') for kind in down)
            or list(raw['up_block_types']) != up or len(channels) != len(down)):
        raise ValueError(f'unet config has down_block_types={down}, up_block_types={raw["up_block_types"]}, '
                         f'block_out_channels={channels}: expected one of CrossAttnDownBlock3D/DownBlock3D a '
                         f'level and the mirrored up blocks ({up})')
    if any(width % channels[0] for width in channels) or not isinstance(raw['attention_head_dim'], int):
        raise ValueError(f'unet config has block_out_channels={channels} and attention_head_dim='
                         f'{raw["attention_head_dim"]!r}: expected multiples of the first and one int')
    return UNetConfig(in_dim=raw['in_channels'], dim=channels[0], context_dim=raw['cross_attention_dim'],
                      out_dim=raw['out_channels'], dim_mult=tuple(width // channels[0] for width in channels),
                      num_heads=TEMPORAL_IN_HEADS, head_dim=raw['attention_head_dim'],
                      res_blocks=raw['layers_per_block'],
                      attn_scales=tuple(0.5 ** level for level, a in enumerate(attention) if a))


def autoencoder_config_to_diffusers(config: AutoencoderConfig) -> dict:
    """vae/config.json of the AutoencoderKL with `config`'s architecture."""
    if config.ch_mult[0] != 1:
        raise ValueError(f'ch_mult={config.ch_mult}: diffusers\' conv_in gives the first level its width, '
                         'so ch_mult[0] must be 1')
    levels = len(config.ch_mult)
    return {**_VAE_FIXED,
            'block_out_channels': [config.ch * mult for mult in config.ch_mult],
            'down_block_types': ['DownEncoderBlock2D'] * levels,
            'in_channels': config.in_channels,
            'latent_channels': config.z_channels,
            'layers_per_block': config.res_blocks,               # the decoder has one more, in both layouts
            'out_channels': config.in_channels,
            'sample_size': VAE_SAMPLE_SIZE,
            'scaling_factor': config.scale_factor,
            'up_block_types': ['UpDecoderBlock2D'] * levels}


def autoencoder_config_from_diffusers(raw: dict) -> AutoencoderConfig:
    """AutoencoderConfig of an AutoencoderKL's config.json."""
    _check(raw, ('block_out_channels', 'down_block_types', 'in_channels', 'latent_channels', 'layers_per_block',
                 'out_channels', 'up_block_types'), _VAE_FIXED, 'vae')
    channels = list(raw['block_out_channels'])
    levels = len(channels)
    if (list(raw['down_block_types']) != ['DownEncoderBlock2D'] * levels
            or list(raw['up_block_types']) != ['UpDecoderBlock2D'] * levels
            or any(width % channels[0] for width in channels) or raw['out_channels'] != raw['in_channels']):
        raise ValueError(f'vae config has block_out_channels={channels}, down_block_types='
                         f'{raw["down_block_types"]}, up_block_types={raw["up_block_types"]}, in/out_channels '
                         f'{raw["in_channels"]}/{raw["out_channels"]}: expected DownEncoderBlock2D and '
                         'UpDecoderBlock2D a level, widths multiples of the first, as many channels out as in')
    return AutoencoderConfig(ch=channels[0], ch_mult=tuple(width // channels[0] for width in channels),
                             res_blocks=raw['layers_per_block'], z_channels=raw['latent_channels'],
                             in_channels=raw['in_channels'],
                             scale_factor=raw.get('scaling_factor', AutoencoderConfig.scale_factor))


def text_config_to_diffusers(config: TextEncoderConfig) -> dict:
    """text_encoder/config.json (a CLIPTextConfig) of the blocks the model runs: all but the last."""
    return {**_TEXT_PUBLISHED, **_TEXT_FIXED,
            'hidden_size': config.width,
            'intermediate_size': int(config.width * config.mlp_ratio),
            'max_position_embeddings': config.context_length,
            'num_attention_heads': config.heads,
            'num_hidden_layers': config.used_layers,
            'vocab_size': config.vocab_size}


def text_config_from_diffusers(raw: dict) -> TextEncoderConfig:
    """TextEncoderConfig of a CLIPTextConfig: `layers` counts the checkpoint's unused last block too."""
    _check(raw, ('hidden_act', 'hidden_size', 'intermediate_size', 'num_attention_heads', 'num_hidden_layers'),
           _TEXT_FIXED, 'text_encoder')
    return TextEncoderConfig(vocab_size=raw.get('vocab_size', TextEncoderConfig.vocab_size),
                             context_length=raw.get('max_position_embeddings', TextEncoderConfig.context_length),
                             width=raw['hidden_size'], heads=raw['num_attention_heads'],
                             layers=raw['num_hidden_layers'] + 1,
                             mlp_ratio=raw['intermediate_size'] / raw['hidden_size'])
