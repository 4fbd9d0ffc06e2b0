"""LoRAs applied to the networks for inference: a delta on each touched weight, in place, taken off bit-exactly.

Every path of the networks reads a layer's `.weight` (the fast paths read it directly: models/layers.py), so a LoRA
is applied to the weight itself: a touched weight holds  base + sum_i s_i x delta_i  over the LoRAs on it
(delta = (alpha / r) up @ down, formats.LoraPair), summed in float32 from its base and cast to its dtype; the text
tower's fused in_proj_weight gets q/k/v deltas on its row blocks. Weights are written with copy_, in their own
storage and strides, so channels-last and frame-major layouts and the CUDA graphs of a compiled UNet, which read
those storages, see the new values.

Restoring: before a weight is first touched its base is copied to the CPU, and only then. Taking LoRAs off
recomputes the weight from that copy; a weight that no LoRA touches any more gets its base back by copy_ (bit-exact)
and the copy is dropped. So the memory held is one host copy of the touched weights: for attention-only LoRAs a small
share of the model; for a LoRA over every layer (cloneofsimo's default target set, T2V-Turbo) nearly the UNet's
1.4 GB in half precision. Restoring from the checkpoint file instead would mean redoing the load's dtype conversion
or half cache exactly; the copy is simpler and as exact.

fuse / unfuse follow diffusers' fuse_lora / unfuse_lora: fuse makes the loaded LoRAs part of the weights (unload no
longer takes them off, a request's own LoRAs stack on top); unfuse takes the fused ones off again, which gives the
base weights bit-exactly when no other LoRA is loaded.

A LoRA that brings a guidance projection (T2V-Turbo) gives the UNet one (UNet3D.add_guidance_embedding, base zero)
while it is loaded.
"""

from __future__ import annotations

import collections
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import names as N
from .formats import MAX_LISTED, LoraWeights, fits

# a weight a pair changes: (parameter key, the parameter, rows [start, stop) or None for all, the changed shape)
Target = Tuple[str, torch.Tensor, Optional[Tuple[int, int]], Tuple[int, ...]]


@dataclass
class Loaded:
    weights: LoraWeights
    scale: float
    fused: bool = False


class LoraStack:
    """The LoRAs on a UNet and a text encoder, by name, in load order."""

    def __init__(self, networks: Callable[[], Dict[str, nn.Module]]):
        self._networks = networks   # () -> {'unet': UNet3D, 'text': OpenCLIPTextEncoder}, looked up at each use
        self.loaded: 'collections.OrderedDict[str, Loaded]' = collections.OrderedDict()
        self._bases: Dict[str, torch.Tensor] = {}   # parameter key -> its weight before any LoRA, on the CPU
        self._added_guidance = False                # the UNet's guidance projection came with a LoRA

    def active(self) -> Dict[str, float]:
        """name -> scale of every LoRA in the weights, fused ones included."""
        return {name: entry.scale for name, entry in self.loaded.items()}

    @torch.no_grad()
    def load(self, weights: LoraWeights, scale: float, name: str) -> None:
        """Add a LoRA's deltas at `scale`; checked whole against the live networks before any weight changes."""
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise TypeError(f'lora scale must be a finite number, not {scale!r}')
        if name in self.loaded:
            raise ValueError(f'a LoRA named {name!r} is loaded already; unload it first or choose another name')
        self._check(weights, name)
        self._ensure_guidance(weights)
        self.loaded[name] = Loaded(weights, float(scale))
        self._refresh(self._keys(weights))

    @torch.no_grad()
    def unload(self, name: Optional[str] = None) -> None:
        """Take off the LoRA `name`, or every LoRA not fused (None)."""
        if name is not None and name not in self.loaded:
            raise ValueError(f'no LoRA named {name!r} is loaded; loaded: {list(self.loaded)}')
        gone = [n for n, entry in self.loaded.items() if (n == name if name is not None else not entry.fused)]
        self._remove(gone)

    def fuse(self) -> None:
        """Make the loaded LoRAs part of the weights: unload() keeps them."""
        for entry in self.loaded.values():
            entry.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        """Take the fused LoRAs off the weights."""
        self._remove([n for n, entry in self.loaded.items() if entry.fused])

    # -- internals ---------------------------------------------------------------------------------

    def _remove(self, gone: List[str]) -> None:
        keys = set()
        for name in gone:
            keys |= self._keys(self.loaded.pop(name).weights)
        self._refresh(keys)
        if self._added_guidance and not any(N.GUIDANCE in e.weights for e in self.loaded.values()):
            self._bases.pop('unet.time_cond_proj.weight', None)
            self._root('unet').remove_guidance_embedding()
            self._added_guidance = False

    def _root(self, component: str) -> nn.Module:
        module = self._networks()[component]
        return getattr(module, '_orig_mod', module)   # a torch.compile'd network: its module

    def _target(self, name: str) -> Target:
        """The weight (and rows) a pair of our name changes."""
        component, _, path = name.partition('.')
        root = self._root(component)
        if path.endswith(('.in_proj.q', '.in_proj.k', '.in_proj.v')):
            attn, which = path[:-len('.in_proj.q')], path[-1]
            weight = root.get_submodule(attn).in_proj_weight
            rows = weight.shape[0] // 3
            start = N.QKV.index(which) * rows
            return f'{component}.{attn}.in_proj_weight', weight, (start, start + rows), (rows, weight.shape[1])
        try:
            weight = root.get_submodule(path).weight
            key = f'{component}.{path}.weight'
        except AttributeError:
            weight, key = root.get_parameter(path), f'{component}.{path}'
        return key, weight, None, tuple(weight.shape)

    def _check(self, weights: LoraWeights, lora: str) -> None:
        problems = []
        unet = self._root('unet')
        for name, pair in weights.items():
            if name == N.GUIDANCE and unet.time_cond_proj is None:
                expected = (unet.config.dim, pair.down.shape[1] if pair.down.ndim == 2 else -1)
            else:
                try:
                    expected = self._target(name)[3]
                except (AttributeError, KeyError, ValueError):
                    problems.append(f'{name}: no such layer')
                    continue
            if not fits(pair, expected):
                problems.append(f'{name}: down {tuple(pair.down.shape)} / up {tuple(pair.up.shape)} do not make a '
                                f'{tuple(expected)} weight')
        if problems:
            more = f' and {len(problems) - MAX_LISTED} more' if len(problems) > MAX_LISTED else ''
            raise ValueError(f'LoRA {lora!r}: {len(problems)} entries do not fit this model: '
                             f'{"; ".join(problems[:MAX_LISTED])}{more}')

    def _ensure_guidance(self, weights: LoraWeights) -> None:
        """Give the UNet the guidance projection a LoRA brings (base weight zero) when it has none."""
        pair = weights.get(N.GUIDANCE)
        unet = self._root('unet')
        if pair is not None and unet.time_cond_proj is None:
            unet.add_guidance_embedding(pair.down.shape[1])
            self._added_guidance = True

    def _keys(self, weights: LoraWeights) -> set:
        return {self._target(name)[0] for name in weights}

    def _refresh(self, keys) -> None:
        """Recompute each weight of `keys` from its base and the LoRAs loaded now."""
        contributions = collections.defaultdict(list)   # key -> [(rows, shape, pair, scale)]
        weights = {}
        for entry in self.loaded.values():
            for name, pair in entry.weights.items():
                key, weight, rows, shape = self._target(name)
                if key in keys:
                    contributions[key].append((rows, shape, pair, entry.scale))
                    weights[key] = weight
        for key in keys:
            if key not in contributions:   # no LoRA on it any more: its base, bit for bit
                if key in self._bases:
                    weight = self._param(key)
                    weight.copy_(self._bases.pop(key))
                continue
            weight = weights[key]
            if key not in self._bases:
                self._bases[key] = weight.detach().to('cpu', copy=True)
            new = self._bases[key].to(weight.device, torch.float32, copy=True)
            for rows, shape, pair, scale in contributions[key]:
                part = new if rows is None else new[rows[0]:rows[1]]
                part.add_(pair.delta(shape, weight.device), alpha=scale)
            weight.copy_(new.to(weight.dtype))

    def _param(self, key: str) -> torch.Tensor:
        component, _, path = key.partition('.')
        return self._root(component).get_parameter(path)
