"""What a model folder holds: its layout, its configuration and its three networks' weight files.

Two layouts (model_zoo.py lists the known models of each):
- original: configuration.json beside text2video_pytorch_model.pth, VQGAN_autoencoder.pth and
  open_clip_pytorch_model.bin, as ModelScope released them. A folder with only some of these
  (zeroscope's zs2_576w/: the UNet and the text tower) takes the others from `base_model`.
- diffusers: model_index.json with unet/, vae/ and text_encoder/ (config.json and weights, in
  safetensors or .bin, whole or sharded, optionally an fp16 variant), tokenizer/ and scheduler/.

Either way the weights are read safely and memory-mapped (weights.read_checkpoint), diffusers'
names are mapped to the original's (diffusers_format.py) and every network loads strictly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import config as config_lib
from . import diffusers_format, weights
from .config import CONFIG_FILE, DiffusionConfig, ModelConfig, replace
from .model_zoo import known_model_of
from .weights import CheckpointError

logger = logging.getLogger(__name__)

ORIGINAL, DIFFUSERS = 'original', 'diffusers'
MODEL_INDEX = 'model_index.json'
# network -> its folder in the diffusers layout, in load order (text encoder, UNet, autoencoder)
DIFFUSERS_FOLDERS = {'text_encoder': 'text_encoder', 'unet': 'unet', 'autoencoder': 'vae'}
# (folder, extension) -> file stem; diffusers names its models' weights one way, transformers another
_STEMS = {('text_encoder', 'safetensors'): 'model', ('text_encoder', 'bin'): 'pytorch_model'}
# a diffusers scheduler class (and its options) -> this package's sampler name (schedulers.SAMPLERS)
_SAMPLER_OF = {'DDIMScheduler': 'ddim', 'DPMSolverMultistepScheduler': 'dpm++2m', 'UniPCMultistepScheduler': 'unipc',
               'EulerDiscreteScheduler': 'euler', 'EulerAncestralDiscreteScheduler': 'euler-a',
               'HeunDiscreteScheduler': 'heun', 'LMSDiscreteScheduler': 'lms'}


@dataclass(frozen=True)
class ModelFolder:
    path: str
    layout: str                        # ORIGINAL or DIFFUSERS
    config: ModelConfig                # the networks' shapes and the generation defaults
    weights: Tuple[Tuple[str, ...], ...]   # per network (text encoder, UNet, autoencoder): its files


def open_folder(path: str, base_model: Optional[str] = None, half: bool = False) -> ModelFolder:
    """Recognise the layout of `path` and find its files; `half` prefers fp16 weight files where a diffusers
    folder has both. A partial original-format folder takes its missing files from `base_model`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f'model folder {path!r} does not exist')
    if os.path.isfile(os.path.join(path, MODEL_INDEX)):
        folder = _diffusers_folder(path, half)
    else:
        folder = _original_folder(path, base_model)
    known = known_model_of(path)
    if known is None:
        return folder
    hub_id, model = known
    logger.info('%s is %s: %dx%d, %d frames by default', path, hub_id, model.width, model.height, model.frames)
    config = replace(folder.config, width=model.width, height=model.height, max_frames=model.frames)
    return dataclasses.replace(folder, config=config)


def is_model_folder(path: str) -> bool:
    """Whether `path` holds a model in either layout, or part of one in the original layout."""
    names = ModelConfig()
    return os.path.isfile(os.path.join(path, MODEL_INDEX)) or any(
        os.path.isfile(os.path.join(path, name)) for name in (CONFIG_FILE, names.ckpt_unet, names.ckpt_clip))


def load_networks(folder: ModelFolder):
    """(text encoder, UNet, autoencoder) holding the folder's tensors (memory-mapped), on the CPU."""
    return weights.build_networks(folder.config, *read_state_dicts(folder),
                                  sources=tuple(files[0] for files in folder.weights))


def read_state_dicts(folder: ModelFolder) -> tuple:
    """The (text encoder, UNet, autoencoder) state dicts under the original's key names; the text encoder's
    holds the blocks the model runs."""
    text_files, unet_files, vae_files = folder.weights
    if folder.layout == ORIGINAL:
        keep, unused = weights.text_key_rules(folder.config)
        return (weights.text_state_dict(text_files[0], keep, unused), weights.unet_state_dict(unet_files[0]),
                weights.autoencoder_state_dict(vae_files[0]))
    return (diffusers_format.text_from_diffusers(_read_all(text_files)),
            diffusers_format.unet_from_diffusers(_read_all(unet_files)),
            diffusers_format.autoencoder_from_diffusers(_read_all(vae_files)))


# -- the original layout ---------------------------------------------------------------------

def _original_folder(path: str, base_model: Optional[str]) -> ModelFolder:
    """configuration.json and the three checkpoints, each from `path` or else from `base_model`."""
    config_file = _from(path, base_model, CONFIG_FILE)
    config = config_lib.load(os.path.dirname(config_file)) if config_file else ModelConfig()
    names = (config.ckpt_clip, config.ckpt_unet, config.ckpt_autoencoder)
    files = [_from(path, base_model, name) for name in names]
    missing = [name for name, file in zip((CONFIG_FILE,) + names, [config_file] + files) if file is None]
    if len(missing) == 4:
        raise FileNotFoundError(f'{path!r} is not a model folder: it holds neither {MODEL_INDEX} (diffusers '
                                f'layout) nor any of {CONFIG_FILE}, {", ".join(names)} (original layout)')
    if missing:
        where = f'nor in base_model={base_model!r}' if base_model else 'and no base_model was given'
        raise CheckpointError(
            f'{path!r} is a partial original-format folder: {", ".join(missing)} not found there {where}. '
            "Take them from the original model's folder or hub id with base_model= (command line: "
            "--base-model), e.g. base_model='damo-vilab/modelscope-damo-text-to-video-synthesis'")
    return ModelFolder(path, ORIGINAL, config, tuple((file,) for file in files))


def _from(path: str, base_model: Optional[str], name: str) -> Optional[str]:
    """`path/name` if it exists, else `base_model/name` if that exists, else None."""
    for folder in (path, base_model):
        if folder and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


# -- the diffusers layout --------------------------------------------------------------------

def _diffusers_folder(path: str, half: bool) -> ModelFolder:
    configs = {network: _read_json(os.path.join(path, sub, 'config.json'))
               for network, sub in DIFFUSERS_FOLDERS.items()}
    files = []
    for network, sub in DIFFUSERS_FOLDERS.items():
        names = weight_files(sub, set(os.listdir(os.path.join(path, sub))), half)
        if not names:
            raise CheckpointError(f'{os.path.join(path, sub)} holds no weights: expected '
                                  f'{_stem(sub, "safetensors")}[.fp16].safetensors or {_stem(sub, "bin")}[.fp16].bin')
        files.append(_expand_shards(os.path.join(path, sub), names))
    return ModelFolder(path, DIFFUSERS, _diffusers_config(path, configs), tuple(files))


def _diffusers_config(path: str, configs: Dict[str, dict]) -> ModelConfig:
    """The networks' shapes from their config.json; the default size from the UNet's sample_size; the
    training schedule and default sampler from scheduler/scheduler_config.json. Errors name the file."""
    sections = {}
    for network, read in (('unet', diffusers_format.unet_config_from_diffusers),
                          ('autoencoder', diffusers_format.autoencoder_config_from_diffusers),
                          ('text_encoder', diffusers_format.text_config_from_diffusers)):
        source = os.path.join(path, DIFFUSERS_FOLDERS[network], 'config.json')
        sections[network] = _named(source, lambda: read(configs[network]))
    sample = configs['unet'].get('sample_size', 32)
    height, width = (sample, sample) if isinstance(sample, int) else sample
    scheduler_file = os.path.join(path, 'scheduler', 'scheduler_config.json')
    diffusion, sampler = (_named(scheduler_file, lambda: _schedule(_read_json(scheduler_file), scheduler_file))
                          if os.path.isfile(scheduler_file) else (DiffusionConfig(), 'ddim'))
    cell = sections['autoencoder'].downsample
    return _named(os.path.join(path, 'unet', 'config.json'), lambda: ModelConfig(
        unet=sections['unet'], autoencoder=sections['autoencoder'], text=sections['text_encoder'],
        diffusion=diffusion, height=height * cell, width=width * cell, sampler=sampler))


def _named(source: str, build):
    """build(), its configuration errors prefixed with the file `source` they come from. A missing key or a
    value of the wrong kind fails inside diffusers_format as KeyError, IndexError, ZeroDivisionError or
    AttributeError: those become ValueError."""
    try:
        return build()
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, AttributeError) as error:
        kind = TypeError if isinstance(error, TypeError) else ValueError
        plain = type(error) in (ValueError, TypeError)
        raise kind(f'{source}: {"" if plain else type(error).__name__ + ": "}{error}') from None


def _schedule(raw: dict, source: str) -> Tuple[DiffusionConfig, str]:
    """(training schedule, default sampler) of a diffusers scheduler configuration."""
    for key, wanted in (('beta_schedule', 'scaled_linear'), ('prediction_type', 'epsilon')):
        if raw.get(key, wanted) != wanted:
            raise CheckpointError(f'{source}: {key}={raw[key]!r} is not supported; this model family '
                                  f'uses {key}={wanted!r}')
    diffusion = DiffusionConfig(num_timesteps=raw.get('num_train_timesteps', 1000),
                                beta_start=raw.get('beta_start', 0.00085), beta_end=raw.get('beta_end', 0.012))
    name = raw.get('_class_name')
    sampler = _SAMPLER_OF.get(name)
    if sampler == 'dpm++2m':
        sampler = ('dpm++sde' if 'sde' in raw.get('algorithm_type', '') else
                   'dpm++2m-karras' if raw.get('use_karras_sigmas') else sampler)
    if sampler is None:
        logger.warning('%s names scheduler %r, which has no sampler here; the default is ddim', source, name)
    return diffusion, sampler or 'ddim'


def weight_files(folder: str, names: set, half: bool) -> List[str]:
    """The weight files of one diffusers folder to read, from the `names` it holds: an fp16 variant first
    when `half` (else last), safetensors before .bin; a sharded checkpoint is its index file."""
    for variant in (('.fp16', '') if half else ('', '.fp16')):
        for ext in ('safetensors', 'bin'):
            stem = _stem(folder, ext)
            for name in (f'{stem}{variant}.{ext}', f'{stem}.{ext}.index{variant}.json'):
                if name in names:
                    return [name]
    return []


def files_to_download(names, half: bool) -> Optional[List[str]]:
    """The files of a hub repo (its listing `names`) that loading needs: of a diffusers layout the index,
    configs, tokenizer, scheduler and each network's chosen weights (weight_files, with their shards);
    of the original layout the top-level files (not its samples or extra folders); else None: all."""
    names = set(names)
    if MODEL_INDEX in names:
        configs = {f'{sub}/config.json' for sub in DIFFUSERS_FOLDERS.values()}
        keep = {name for name in names if name in configs or name.startswith(('tokenizer/', 'scheduler/'))}
        for sub in DIFFUSERS_FOLDERS.values():
            inside = {name[len(sub) + 1:] for name in names if name.startswith(sub + '/')}
            for chosen in weight_files(sub, inside, half):
                keep.add(f'{sub}/{chosen}')
                if chosen.endswith('.json'):   # an index: its shards are STEM[.fp16]-0000i-of-0000n.EXT
                    stem, ext = chosen.split('.')[:2]
                    prefix = stem + ('.fp16-' if chosen.endswith('.fp16.json') else '-')
                    keep.update(f'{sub}/{n}' for n in inside if n.startswith(prefix) and n.endswith(f'.{ext}'))
        return sorted(keep | {MODEL_INDEX})
    if CONFIG_FILE in names:
        return sorted(name for name in names if '/' not in name)
    return None


def _stem(folder: str, ext: str) -> str:
    return _STEMS.get((folder, ext), 'diffusion_pytorch_model')


def _expand_shards(folder: str, names: List[str]) -> Tuple[str, ...]:
    """Paths of the files to read; an index file stands for the shards its weight_map names."""
    paths = []
    for name in names:
        if name.endswith('.json'):
            index = os.path.join(folder, name)
            shards = _named(index, lambda: sorted(set(_read_json(index)['weight_map'].values())))
            paths.extend(os.path.join(folder, shard) for shard in shards)
        else:
            paths.append(os.path.join(folder, name))
    return tuple(paths)


def _read_all(files) -> weights.StateDict:
    """One state dict from the files of a (possibly sharded) checkpoint."""
    state = {}
    for file in files:
        state.update(weights.tensors_only(weights.read_checkpoint(file), file))
    return state


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f'{path} not found: a diffusers model folder holds unet/, vae/ and text_encoder/, '
                              'each with config.json and weights')
    try:
        with open(path, encoding='utf-8') as f:
            raw = json.load(f)
    except ValueError as error:
        raise CheckpointError(f'{path} is not valid JSON: {error}') from None
    if not isinstance(raw, dict):
        raise CheckpointError(f'{path} must hold a JSON object, not a {type(raw).__name__}')
    return raw
