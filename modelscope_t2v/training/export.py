"""A run's results as files others read: the LoRA in stable_lora and PEFT/diffusers formats, or (a full fine-tune)
a model folder in the original layout.

Each export is a new folder OUTPUT_DIR/exports/step-NNNNNN, written under a temporary name and renamed when
complete (convert.py's way); an earlier export of the same step is replaced whole.
- LoRA: lora.safetensors (stable_lora: sd-webui-text2video and Text-To-Video-Finetuning read it) and peft/
  (adapter_model.safetensors + adapter_config.json on diffusers' names; the text encoder's in peft/text_encoder/),
  both from one LoraWeights (targets.lora_weights) by lora/formats.py's writers.
- full: configuration.json and text2video_pytorch_model.pth of the trained UNet, with VQGAN_autoencoder.pth and
  open_clip_pytorch_model.bin copied from the source model (the text tower written anew if it was trained). A source
  in diffusers' layout has no such files to copy: its networks are written as convert.py writes them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Dict

import torch

from .. import config as config_lib
from .. import convert, scratch
from ..lora.formats import LoraWeights, write_peft_lora, write_stable_lora
from ..model_folder import ORIGINAL, ModelFolder
from .targets import base_state_dict, lora_weights

logger = logging.getLogger(__name__)

STABLE_LORA_FILE = 'lora.safetensors'
PEFT_FOLDER = 'peft'


def export_folder(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, 'exports', f'step-{step:06d}')


def run_lora_weights(module) -> LoraWeights:
    """The run's LoRA (its moving average where it keeps one) as LoraWeights."""
    config = module.config
    return lora_weights(module.export_tensors(), config.lora_rank if config.lora_alpha is None else config.lora_alpha)


def trained_network_states(module) -> Dict[str, Dict[str, torch.Tensor]]:
    """{'unet': ..., 'text_encoder': ...}: the full state dicts (original keys) of the networks a full fine-tune
    trained, with the exported tensors (the moving average) in place."""
    exported = module.export_tensors()
    states = {}
    for name in ('unet', 'text_encoder'):
        network = getattr(module, name)
        state = base_state_dict(network)
        mine = {k[len(name) + 1:]: v for k, v in exported.items() if k.startswith(name + '.')}
        if mine:
            states[name] = {k: (mine[k].to(v.dtype) if k in mine else v).detach().cpu() for k, v in state.items()}
    return states


def export(module, folder: ModelFolder, target: str) -> str:
    """Write the module's exports (module.config.export_formats) into the new folder `target`; returns it."""
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    temp = scratch.temporary_sibling(target)
    try:
        if module.config.target == 'lora':
            _write_lora(temp, run_lora_weights(module), module)
        else:
            _write_original(temp, folder, trained_network_states(module), module)
        os.chmod(temp, 0o755)
        _replace(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    logger.info('exported %s', target)
    return target


def _write_lora(path: str, weights: LoraWeights, module) -> None:
    formats = module.config.export_formats
    if 'stable_lora' in formats:
        write_stable_lora(os.path.join(path, STABLE_LORA_FILE), weights)
    if 'peft' in formats:
        write_peft_lora(os.path.join(path, PEFT_FOLDER), weights, module.model_config)


def _write_original(path: str, folder: ModelFolder, trained: dict, module) -> None:
    """The original layout: the trained networks written, the others copied from an original-layout source."""
    config = folder.config
    if folder.layout != ORIGINAL:
        text = trained.get('text_encoder') or base_state_dict(module.text_encoder)
        states = (text, trained['unet'], base_state_dict(module.autoencoder))
        convert.write_original(path, config, tuple({k: v.cpu() for k, v in s.items()} for s in states), False)
        return
    with open(os.path.join(path, config_lib.CONFIG_FILE), 'w', encoding='utf-8') as f:
        json.dump(config_lib.configuration_json(config, 'original'), f, indent=2)
    text_file, unet_file, vae_file = (files[0] for files in folder.weights)
    convert.save_state_dict(trained['unet'], os.path.join(path, config.ckpt_unet))
    shutil.copy2(vae_file, os.path.join(path, config.ckpt_autoencoder))
    if 'text_encoder' in trained:
        convert.save_state_dict(trained['text_encoder'], os.path.join(path, config.ckpt_clip))
    else:
        shutil.copy2(text_file, os.path.join(path, config.ckpt_clip))


def _replace(temp: str, target: str) -> None:
    """Rename `temp` to `target`; an existing target is moved aside first and removed after."""
    if not os.path.lexists(target):
        os.rename(temp, target)
        return
    old = scratch.temporary_sibling(target)
    os.rmdir(old)
    os.rename(target, old)
    os.rename(temp, target)
    scratch.remove_quietly(old)
