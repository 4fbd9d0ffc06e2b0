"""Convert a model folder between the original layout and diffusers'.

    modelscope-t2v convert SRC DST --to diffusers|original [--dtype float16] [--safetensors]

Tensors are copied as they are (cast only with --dtype), so original -> diffusers -> original gives
identical tensors. Of the text tower, both layouts hold the blocks the model runs; the original
release's unused last block, projection and image tower have no place in diffusers' text encoder.
DST is written as a temporary sibling folder renamed at the end, and must not exist.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from . import config as config_lib
from . import diffusers_format, model_folder, scratch, tokenizer
from .config import ModelConfig, replace
from .schedulers import SAMPLERS, training_schedule
from .weights import AUTOENCODER_PREFIX

LAYOUTS = (model_folder.ORIGINAL, model_folder.DIFFUSERS)
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
PIPELINE_CLASS = 'TextToVideoSDPipeline'


def convert(src: str, dst: str, to: str, dtype: Optional[str] = None, safetensors: bool = False,
            base_model: Optional[str] = None) -> str:
    """Write the model of folder `src` to the new folder `dst` in layout `to`; returns dst."""
    # 1. check everything before reading a weight
    if to not in LAYOUTS:
        raise ValueError(f'to={to!r} is not one of {LAYOUTS}')
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f'dtype={dtype!r} is not one of {sorted(DTYPES)}')
    if os.path.lexists(dst):
        raise ValueError(f'{dst!r} exists; converting never overwrites: name a new folder')
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ValueError(f'folder {parent!r} of {dst!r} does not exist')
    folder = model_folder.open_folder(src, base_model)

    # 2. read the state dicts (original names), cast, write them into a temporary sibling, rename it
    states = model_folder.read_state_dicts(folder)
    if dtype is not None:
        states = tuple({k: v.to(DTYPES[dtype]) for k, v in state.items()} for state in states)
    temp = scratch.temporary_sibling(dst)   # removes those of conversions killed before
    try:
        write = write_diffusers if to == model_folder.DIFFUSERS else write_original
        write(temp, folder.config, states, safetensors)
        os.chmod(temp, 0o755)
        os.rename(temp, dst)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return dst


def write_original(path: str, config: ModelConfig, states: tuple, safetensors: bool) -> None:
    """configuration.json and the three checkpoint files, as ModelScope released them (or as .safetensors)."""
    text, unet, autoencoder = states
    if safetensors:
        config = replace(config, ckpt_clip='open_clip_pytorch_model.safetensors',
                         ckpt_unet='text2video_pytorch_model.safetensors',
                         ckpt_autoencoder='VQGAN_autoencoder.safetensors')
        autoencoder_file = autoencoder   # a bare state dict, which weights.autoencoder_state_dict accepts
    else:
        autoencoder_file = {'state_dict': {AUTOENCODER_PREFIX + k: v for k, v in autoencoder.items()}}
    _write_json(os.path.join(path, config_lib.CONFIG_FILE), config_lib.configuration_json(config, 'original'))
    for name, state in ((config.ckpt_clip, text), (config.ckpt_unet, unet), (config.ckpt_autoencoder, autoencoder_file)):
        save_state_dict(state, os.path.join(path, name))


def write_diffusers(path: str, config: ModelConfig, states: tuple, safetensors: bool) -> None:
    """A folder diffusers' TextToVideoSDPipeline.from_pretrained loads: model_index.json, the three networks'
    config.json and weights, the tokenizer and the scheduler."""
    text, unet, autoencoder = states
    cell = config.autoencoder.downsample
    # diffusers' pipelines take sample_size for an int: the default height (and width) over the cell
    unet_config = {**diffusers_format.unet_config_to_diffusers(config.unet), 'sample_size': config.height // cell}
    networks = (
        ('text_encoder', diffusers_format.text_config_to_diffusers(config.text),
         diffusers_format.text_to_diffusers(text), 'model' if safetensors else 'pytorch_model'),
        ('unet', unet_config, diffusers_format.unet_to_diffusers(unet), 'diffusion_pytorch_model'),
        ('vae', diffusers_format.autoencoder_config_to_diffusers(config.autoencoder),
         diffusers_format.autoencoder_to_diffusers(autoencoder), 'diffusion_pytorch_model'),
    )
    for sub, sub_config, state, stem in networks:
        os.makedirs(os.path.join(path, sub))
        _write_json(os.path.join(path, sub, 'config.json'), sub_config)
        save_state_dict(state, os.path.join(path, sub, f'{stem}.{"safetensors" if safetensors else "bin"}'))
    os.makedirs(os.path.join(path, 'tokenizer'))
    for name, text_file in tokenizer.hf_tokenizer_files(config.text.context_length).items():
        with open(os.path.join(path, 'tokenizer', name), 'w', encoding='utf-8') as f:
            f.write(text_file)
    scheduler = scheduler_config(config)
    os.makedirs(os.path.join(path, 'scheduler'))
    _write_json(os.path.join(path, 'scheduler', 'scheduler_config.json'), scheduler)
    _write_json(os.path.join(path, model_folder.MODEL_INDEX), {
        '_class_name': PIPELINE_CLASS, 'scheduler': ['diffusers', scheduler['_class_name']],
        'text_encoder': ['transformers', 'CLIPTextModel'], 'tokenizer': ['transformers', 'CLIPTokenizer'],
        'unet': ['diffusers', 'UNet3DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL']})


def scheduler_config(config: ModelConfig) -> dict:
    """scheduler/scheduler_config.json: the default sampler's diffusers class on the training schedule."""
    class_name, extra = SAMPLERS[config.sampler]
    return {'_class_name': class_name, **training_schedule(config.diffusion), **extra}


def save_state_dict(state: dict, path: str) -> None:
    """A state dict as safetensors (by the extension) or a torch pickle."""
    if path.endswith('.safetensors'):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)


def _write_json(path: str, value: dict) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(value, f, indent=2)
