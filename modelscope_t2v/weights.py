"""Read the original checkpoint files safely and load them strictly.

Every file is opened with `torch.load(weights_only=True, mmap=True)`: no code
is unpickled and tensors stay on disk until used. VQGAN_autoencoder.pth is a
whole latent-diffusion training checkpoint whose pickle may name Lightning
classes; when `weights_only` refuses it, a restricted unpickler stands an
inert placeholder in for every class outside torch's own safe list, so the
tensors load without importing, let alone running, what the pickle names.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import types
import zipfile
from typing import Callable, Dict

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ModelConfig
from .models.autoencoder import AutoencoderKL
from .models.text_encoder import OpenCLIPTextEncoder, is_text_tower_key
from .models.unet3d import UNet3D

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

AUTOENCODER_PREFIX = 'first_stage_model.'  # the autoencoder's keys in the training checkpoint
MAX_KEYS_SHOWN = 5
CLIP_EXTRA_KEYS = ('text_projection', 'logit_scale', 'attn_mask')


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the network."""


# -- reading ---------------------------------------------------------------------------------

class _Placeholder(dict):
    """Stands in for any class a checkpoint names that loading does not need; does nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _safe_globals() -> dict:
    """torch's own allow-list for weights_only loading: tensor rebuilders, dtypes, OrderedDict."""
    from torch import _weights_only_unpickler
    return _weights_only_unpickler._get_allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only torch's safe globals; every other name becomes an inert placeholder."""

    def find_class(self, module: str, name: str):
        safe = _safe_globals().get(f'{module}.{name}')
        if safe is not None:
            return safe
        logger.debug('checkpoint names %s.%s; replaced by a placeholder', module, name)
        return type(name, (_Placeholder,), {'__module__': '<placeholder>'})


_restricted_pickle = types.ModuleType('restricted_pickle')
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.__name__ = 'restricted_pickle'


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The object saved in a .pth/.bin/.safetensors file, tensors memory-mapped on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} not found')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        return _guard(path, lambda: load_file(path, device='cpu'), SafetensorError)
    mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be memory-mapped
    load = lambda **kw: torch.load(path, map_location='cpu', mmap=mmap, **kw)  # noqa: E731
    try:
        return _guard(path, lambda: load(weights_only=True))
    except CheckpointError as error:
        if not isinstance(error.__cause__, pickle.UnpicklingError):
            raise
        logger.info('%s pickles more than tensors; reading it with a restricted unpickler', path)
        return _guard(path, lambda: load(weights_only=False, pickle_module=_restricted_pickle))


def _guard(path: str, read: Callable[[], dict], *reader_errors: type) -> dict:
    """Run `read`, turning any failure into a CheckpointError that names the file."""
    try:
        return read()
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, KeyError,
            *reader_errors) as error:
        raise CheckpointError(f'checkpoint {path} could not be read (truncated, corrupt '
                              f'or not a torch checkpoint): {error}') from error


# -- selecting the keys of one network -----------------------------------------------------

def unet_state_dict(path) -> StateDict:
    """text2video_pytorch_model.pth: a bare state dict of the UNet."""
    return tensors_only(read_checkpoint(path), path)


def autoencoder_state_dict(path) -> StateDict:
    """VQGAN_autoencoder.pth: the `first_stage_model.` keys of its `state_dict`.

    A bare autoencoder state dict (as written by a conversion cache) is taken as is.
    """
    checkpoint = read_checkpoint(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('state_dict'), dict):
        full = checkpoint['state_dict']
        selected = {k[len(AUTOENCODER_PREFIX):]: v for k, v in full.items()
                    if k.startswith(AUTOENCODER_PREFIX)}
        if not selected:
            raise CheckpointError(f'checkpoint {path} has no {AUTOENCODER_PREFIX}* keys in its '
                                  f'state_dict; first keys: {_first(full)}')
        return tensors_only(selected, path)
    return tensors_only(checkpoint, path)


def text_state_dict(path, keep: Callable[[str], bool], unused: Callable[[str], bool]) -> StateDict:
    """open_clip_pytorch_model.bin: the keys `keep` accepts; the rest must be known `unused` ones."""
    return select_text_keys(tensors_only(read_checkpoint(path), path), keep, unused, path)


def select_text_keys(clip_state: StateDict, keep: Callable[[str], bool], unused: Callable[[str], bool],
                     source) -> StateDict:
    """The keys of an OpenCLIP state dict that `keep` accepts; the rest must be known `unused` ones."""
    strangers = [k for k in clip_state if not keep(k) and not unused(k)]
    if strangers:
        raise CheckpointError(f'checkpoint {source} has keys that belong to no part of an OpenCLIP '
                              f'model: {strangers[:MAX_KEYS_SHOWN]}')
    return {k: v for k, v in clip_state.items() if keep(k)}


def tensors_only(checkpoint, path) -> StateDict:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint {path} is not a state dict of tensors '
                              f'(got {type(checkpoint).__name__})')
    odd = [f'{k!r}: {type(v).__name__}' for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f'checkpoint {path} is not a state dict of tensors: {len(odd)} values '
                              f'are not tensors, e.g. {odd[:MAX_KEYS_SHOWN]}')
    return checkpoint


def _first(keys) -> list:
    return sorted(keys)[:MAX_KEYS_SHOWN]


# -- strict loading ------------------------------------------------------------------------

def load_strict(module: nn.Module, state_dict: StateDict, path) -> nn.Module:
    """Load every key, checking names and shapes first; errors name the file and the keys.

    The checks read attributes only (keep_vars: no detached copies; dtype.is_floating_point, not the method):
    each torch call would give up the GIL (empty_networks says why that matters)."""
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f'{k}: file {tuple(state_dict[k].shape)} != model {tuple(v.shape)}'
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    # an integer tensor would be assigned as it is and fail in the first layer that multiplies it
    kinds = [f'{k}: {state_dict[k].dtype}' for k, v in expected.items()
             if k in state_dict and v.dtype.is_floating_point and not state_dict[k].dtype.is_floating_point]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys, e.g. {_first(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys, e.g. {_first(unexpected)}')
    if wrong:
        problems.append(f'{len(wrong)} shape mismatches, e.g. {wrong[:MAX_KEYS_SHOWN]}')
    if kinds:
        problems.append(f'{len(kinds)} tensors that are not floating point, e.g. {kinds[:MAX_KEYS_SHOWN]}')
    if problems:
        raise CheckpointError(f'checkpoint {path} does not fit {type(module).__name__}: '
                              + '; '.join(problems)
                              + ' (does configuration.json describe this checkpoint?)')
    # assign=True keeps the file's (memory-mapped) tensors: no copy, no random init to undo
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def text_key_rules(config: ModelConfig):
    """(keep, unused) predicates over a CLIP checkpoint's keys for the penultimate-layer encoder.

    Unused: the image tower, the projections and the last text block, which it never runs.
    """
    keep = lambda k: is_text_tower_key(k, config.text)  # noqa: E731
    in_tower = lambda k: is_text_tower_key(k, config.text, config.text.layers)  # noqa: E731
    unused = lambda k: k.startswith('visual.') or k in CLIP_EXTRA_KEYS or in_tower(k)  # noqa: E731
    return keep, unused


# -- the three networks ---------------------------------------------------------------------

def build_networks(config: ModelConfig, text: StateDict, unet: StateDict, autoencoder: StateDict,
                   sources=('text encoder', 'UNet', 'autoencoder')):
    """(text encoder, UNet, autoencoder) holding these tensors; errors name the `sources`."""
    networks = empty_networks(config)
    for network, state, source in zip(networks, (text, unet, autoencoder), sources):
        load_strict(network, state, source)
    return networks


def empty_networks(config: ModelConfig):
    """(text encoder, UNet, autoencoder) with every tensor on the meta device, to load a state dict into.

    Their initialisers are skipped, not run on meta tensors: each is a torch call, which gives up the GIL,
    and in a warm start the main thread builds the networks while two other threads run Python (the compile
    cache's loads, diffusers' import), so every call waited for the GIL again (docs/decisions.md)."""
    with torch.device('meta'), _SkipInitialisers():
        return OpenCLIPTextEncoder(config.text), UNet3D(config.unet), AutoencoderKL(config.autoencoder)


class _SkipInitialisers(TorchFunctionMode):
    """In this thread, torch.nn.init's in-place initialisers and a tensor's own (fill_, zero_, normal_,
    uniform_) return their tensor untouched; the other torch calls run as usual."""
    SKIPPED = frozenset([torch.Tensor.fill_, torch.Tensor.zero_, torch.Tensor.normal_, torch.Tensor.uniform_, *(
        getattr(nn.init, name) for name in dir(nn.init) if name.endswith('_') and not name.startswith('_'))])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs['tensor']
        return func(*args, **(kwargs or {}))


def placed(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module` with its floating-point tensors in `dtype` and all on `device`. Module.to is called only where a
    tensor is elsewhere: it makes two torch calls a tensor even where none moves, and each gives up the GIL
    (weights.empty_networks says why that matters)."""
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())   # where .to('cuda') puts a tensor
    if all(t.device == device and (t.dtype == dtype or not t.dtype.is_floating_point)
           for t in itertools.chain(module.parameters(), module.buffers())):
        return module
    return module.to(device, dtype)
