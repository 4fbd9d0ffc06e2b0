"""What a run trains: peft LoRA adapters on chosen layers, or whole networks; and the trained LoRA as LoraWeights.

LoRA targets (peft's LoraConfig + inject_adapter_in_model, in place, so every module keeps its name):
- UNet, by `lora_modules`: 'spatial_attention' and 'temporal_attention' are to_q, to_k, to_v and to_out.0 of both
  attentions (attn1, attn2) of every spatial / temporal transformer block; 'ff' is every transformer block's
  feed-forward, net.0.proj (GEGLU's projection) and net.2.
- text encoder (train_text_encoder): every block's attn.out_proj, mlp.c_fc and mlp.c_proj. Its q/k/v live in one
  fused Parameter (in_proj_weight), which peft cannot wrap; they stay frozen.
A peft-wrapped projection is called as a module by our layers (layers.is_plain), so the fast paths step aside.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..lora.formats import LoraPair, LoraWeights
from ..lora.names import TEXT, UNET
from ..models.unet3d import SpatialTransformer, TemporalTransformer

ADAPTER = 'default'   # peft's adapter name
_ATTENTION_LEAVES = ('to_q', 'to_k', 'to_v', 'to_out.0')
_FF_LEAVES = ('ff.net.0.proj', 'ff.net.2')
_TEXT_LEAVES = ('attn.out_proj', 'mlp.c_fc', 'mlp.c_proj')
_LORA_KEY = re.compile(r'(?P<module>.+)\.lora_(?P<ab>[AB])\.' + ADAPTER + r'\.weight')
# the LightningModule's attribute -> LoraWeights' component prefix (lora/names.py)
COMPONENTS = {'unet.': UNET, 'text_encoder.': TEXT}


def unet_lora_targets(unet: nn.Module, modules: Sequence[str]) -> List[str]:
    """Module names of the UNet's LoRA targets for `lora_modules` (see the module docstring)."""
    names = []
    for prefix, module in unet.named_modules():
        kind = ('spatial_attention' if isinstance(module, SpatialTransformer) else
                'temporal_attention' if isinstance(module, TemporalTransformer) else None)
        if kind is None:
            continue
        for i, _ in enumerate(module.transformer_blocks):
            block = f'{prefix}.transformer_blocks.{i}'
            if kind in modules:
                names += [f'{block}.{attn}.{leaf}' for attn in ('attn1', 'attn2') for leaf in _ATTENTION_LEAVES]
            if 'ff' in modules:
                names += [f'{block}.{leaf}' for leaf in _FF_LEAVES]
    return names


def text_lora_targets(text_encoder: nn.Module) -> List[str]:
    """Module names of the text encoder's LoRA targets: each block's out_proj, c_fc and c_proj."""
    return [f'transformer.resblocks.{i}.{leaf}' for i in range(len(text_encoder.transformer.resblocks))
            for leaf in _TEXT_LEAVES]


def inject_lora(network: nn.Module, targets: List[str], rank: int, alpha: Optional[float], dropout: float) -> nn.Module:
    """Freeze `network` and give each target a peft LoRA adapter (lora_B starts at zero: the network is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model
    if not targets:
        raise ValueError('no LoRA target in this network (lora_modules chose none it has)')
    network.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=targets, bias='none')
    inject_adapter_in_model(config, network, adapter_name=ADAPTER)
    for name, p in network.named_parameters():
        p.requires_grad_('.lora_' in name)
    return network


def lora_weights(state: Dict[str, torch.Tensor], alpha: float) -> LoraWeights:
    """LoraWeights of the peft adapters in `state` (the LightningModule's names: 'unet.<module>.lora_A.default.weight'
    ...), keyed 'unet.<module>' / 'text.<module>', each with the run's alpha."""
    parts: Dict[str, dict] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            continue
        module = match['module']
        prefix = next((p for p in COMPONENTS if module.startswith(p)), None)
        assert prefix is not None, f'a LoRA outside the trained networks: {key}'
        name = COMPONENTS[prefix] + module[len(prefix):]
        parts.setdefault(name, {})[match['ab']] = tensor.detach().float().cpu()
    weights = {}
    for name, ab in sorted(parts.items()):
        assert set(ab) == {'A', 'B'}, f'{name} has lora_{sorted(ab)} only'
        weights[name] = LoraPair(down=ab['A'], up=ab['B'], alpha=float(alpha))
    return weights


def merged_state_dict(network_state: Dict[str, torch.Tensor], weights: LoraWeights, component: str) -> dict:
    """A plain network's state dict (original keys) with each LoRA's delta added to its layer's weight: what
    peft's merge gives. `component` is 'unet.' or 'text.'."""
    merged = dict(network_state)
    for name, pair in weights.items():
        if name.startswith(component):
            key = name[len(component):] + '.weight'
            merged[key] = (merged[key].float() + pair.delta(merged[key].shape)).to(merged[key].dtype)
    return merged


def base_state_dict(network: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict of a peft-wrapped network under its original keys, without the adapters."""
    return {key.replace('.base_layer.', '.'): value for key, value in network.state_dict().items()
            if '.lora_' not in key}
