"""The names LoRA files give their target layers, mapped onto ours; the shapes of our targets.

Our names (the keys of LoraWeights, formats.py) are module names inside the networks with a component prefix:
- 'unet.<UNet3D module>', e.g. 'unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q'; 'unet.time_cond_proj' is the
  guidance embedding's projection (UNet3D.add_guidance_embedding), which a guidance-distilled LoRA brings;
- 'text.<OpenCLIPTextEncoder module>', e.g. 'text.transformer.resblocks.0.mlp.c_fc'. The fused attention projection
  (in_proj_weight, rows q, k, v) has one name per row block: 'text.transformer.resblocks.N.attn.in_proj.q' (.k, .v);
  'text.token_embedding' is the token Embedding, 'text.positional_embedding' the position table (a Parameter).

The files name them in three other vocabularies:
- ModelScope's original keys (UNetSD, open_clip): stable_lora / sd-webui-text2video files;
- diffusers' UNet3DConditionModel and transformers' CLIPTextModel: PEFT / diffusers files and, by position, the
  list files of cloneofsimo's LoRA (their order is the order those classes register their layers: injection_order).
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import diffusers_format
from ..config import ModelConfig, TextEncoderConfig, UNetConfig

UNET, TEXT = 'unet.', 'text.'
GUIDANCE = UNET + 'time_cond_proj'
GUIDANCE_DIFFUSERS = 'time_embedding.cond_proj'   # diffusers' TimestepEmbedding.cond_proj
QKV = 'qkv'
TOKEN, POSITION = TEXT + 'token_embedding', TEXT + 'positional_embedding'
EMBEDDINGS = (TOKEN, POSITION)   # weights (rows, width): a LoRA's delta is (B @ A) transposed in loralib and peft


def unet_from_diffusers(config: UNetConfig) -> Dict[str, str]:
    """diffusers UNet3DConditionModel module name -> ours (diffusers_format's table, read backwards)."""
    names = {theirs: UNET + ours for ours, (theirs, _) in diffusers_format.unet_leaf_table(config).items()}
    names[GUIDANCE_DIFFUSERS] = GUIDANCE
    return names


def unet_linear_in_diffusers(config: UNetConfig) -> set:
    """Our UNet names whose 1x1 convolution is a Linear in diffusers (the temporal transformers' proj_in/out)."""
    return {UNET + ours for ours, (_, dims) in diffusers_format.unet_leaf_table(config).items() if dims}


def text_from_clip(layers: int) -> Dict[str, str]:
    """transformers CLIPTextModel module name, without 'text_model.' -> ours."""
    names = {'embeddings.token_embedding': TOKEN, 'embeddings.position_embedding': POSITION}
    for i in range(layers):
        theirs, ours = f'encoder.layers.{i}', f'{TEXT}transformer.resblocks.{i}'
        names.update({f'{theirs}.self_attn.{x}_proj': f'{ours}.attn.in_proj.{x}' for x in QKV})
        names.update({f'{theirs}.self_attn.out_proj': f'{ours}.attn.out_proj',
                      f'{theirs}.mlp.fc1': f'{ours}.mlp.c_fc', f'{theirs}.mlp.fc2': f'{ours}.mlp.c_proj'})
    return names


def text_from_stable_lora(layers: int) -> Dict[str, str]:
    """Text names in stable_lora files -> ours. The trainer renames CLIPTextModel's LoRA keys with its text
    converter (Text-To-Video-Finetuning, utils/convert_diffusers_to_original_ms_text_to_video.py:
    'text_model.encoder.layers.' -> 'resblocks.', '.self_attn' -> '.attn', '.fc1.' -> '.c_fc.', '.fc2.' -> '.c_proj.'),
    which leaves q/k/v unfused ('resblocks.N.attn.q_proj') and the embeddings' names as CLIP's."""
    names = {'text_model.embeddings.token_embedding': TOKEN, 'text_model.embeddings.position_embedding': POSITION}
    for i in range(layers):
        theirs, ours = f'resblocks.{i}', f'{TEXT}transformer.resblocks.{i}'
        names.update({f'{theirs}.attn.{x}_proj': f'{ours}.attn.in_proj.{x}' for x in QKV})
        names.update({f'{theirs}.{leaf}': f'{ours}.{leaf}' for leaf in ('attn.out_proj', 'mlp.c_fc', 'mlp.c_proj')})
    return names


# -- shapes of our targets -------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def target_shapes(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Our name -> the shape of the weight (or row block) a LoRA on it changes; the guidance projection, whose
    input width the LoRA chooses, is left out (check_guidance). Built on the meta device: no memory, no time."""
    from ..models.text_encoder import OpenCLIPTextEncoder
    from ..models.unet3d import UNet3D
    with torch.device('meta'):
        unet, text = UNet3D(config.unet), OpenCLIPTextEncoder(config.text)
    shapes = {UNET + name: tuple(m.weight.shape) for name, m in unet.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    shapes.update({TEXT + name: tuple(m.weight.shape) for name, m in text.named_modules()
                   if isinstance(m, (nn.Linear, nn.Embedding))})
    shapes[POSITION] = tuple(text.positional_embedding.shape)
    width = config.text.width
    for i in range(len(text.transformer.resblocks)):
        shapes.update({f'{TEXT}transformer.resblocks.{i}.attn.in_proj.{x}': (width, width) for x in QKV})
    return shapes


# -- cloneofsimo's injection order -----------------------------------------------------------------

# The ancestor classes cloneofsimo-style trainers inject into. Text-To-Video-Finetuning (utils/lora_handler.py) and
# T2V-Turbo (app_ms.py) use ['UNet3DConditionModel'] (every Linear/Conv2d/Conv3d of the UNet) and ['CLIPEncoderLayer'];
# cloneofsimo/lora's defaults are the attention sets (lora_diffusion/lora.py, UNET_DEFAULT/EXTENDED_TARGET_REPLACE).
UNET_TARGETS = (('UNet3DConditionModel',), ('CrossAttention', 'Attention', 'GEGLU'),
                ('ResnetBlock2D', 'CrossAttention', 'Attention', 'GEGLU'))
TEXT_TARGETS = (('CLIPEncoderLayer',), ('CLIPAttention',))
# transformers registers CLIPAttention's k_proj, v_proj, q_proj, out_proj in that order, then CLIPMLP's fc1, fc2
_CLIP_ATTENTION = ('self_attn.k_proj', 'self_attn.v_proj', 'self_attn.q_proj', 'self_attn.out_proj')
_CLIP_LAYER_ORDER = {'CLIPEncoderLayer': _CLIP_ATTENTION + ('mlp.fc1', 'mlp.fc2'), 'CLIPAttention': _CLIP_ATTENTION}


@functools.lru_cache(maxsize=16)
def unet_injection_order(config: UNetConfig, targets: Tuple[str, ...], cond_proj_dim: Optional[int]) -> List[str]:
    """Our names of the layers cloneofsimo's injector finds under `targets`, in its order: the order in which
    diffusers' UNet3DConditionModel registers them (module tree order; built on the meta device). With
    cond_proj_dim the UNet has the guidance projection (T2V-Turbo builds it with time_cond_proj_dim=256)."""
    from diffusers import UNet3DConditionModel
    # diffusers gives transformer_in 8 heads whatever the config says; names and order do not depend on heads
    raw = diffusers_format.unet_config_to_diffusers(_with_eight_heads(config))
    raw['time_cond_proj_dim'] = cond_proj_dim
    with torch.device('meta'):
        model = UNet3DConditionModel.from_config(raw)
    names, ours = [], unet_from_diffusers(config)
    for prefix, ancestor in model.named_modules():
        if type(ancestor).__name__ not in targets:
            continue
        for name, module in ancestor.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                names.append(ours[f'{prefix}.{name}'.strip('.')])
    return names


def text_injection_order(config: TextEncoderConfig, targets: Tuple[str, ...]) -> List[str]:
    """Our names of the text layers cloneofsimo's injector finds under `targets`, layer by layer."""
    clip = text_from_clip(config.used_layers)
    return [clip[f'encoder.layers.{i}.{leaf}'] for i in range(config.used_layers)
            for target in targets for leaf in _CLIP_LAYER_ORDER.get(target, ())]


def _with_eight_heads(config: UNetConfig) -> UNetConfig:
    from ..config import replace
    return replace(config, num_heads=diffusers_format.TEMPORAL_IN_HEADS)
