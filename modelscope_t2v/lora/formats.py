"""LoRA files <-> one neutral form, LoraWeights: {our layer name: LoraPair} (names.py has the names).

A pair changes the weight W of its layer (or a row block of it) by  scale x up @ down,  with scale = alpha / r
(1 without alpha), r = down.shape[0], the product taken over the flattened trailing dims and reshaped to W's shape:
Linear (r, in) / (out, r); Conv (r, in, *kernel) / (out, r, 1, ...). The formats:

(a) stable_lora (Text-To-Video-Finetuning's stable_lora/lora.py, read by sd-webui-text2video's
    stable_lora/stable_utils/lora_processor.py): safetensors, metadata {'stable_lora_text_to_video': 'v1'}, keys
    '<original name>.lora_A' (r, in) and '.lora_B' (out, r), no '.weight'. Its loralib layers use lora_alpha = r:
    scale 1. Conv2d pairs are (r k, in k) / (out k, r k), their product viewed as (out, in, k, k); the temporal
    Conv3d's product is viewed as (out, in, 3, 3, 1) and averaged over the 4th dim; Embeddings' product transposed.
(b) cloneofsimo (Text-To-Video-Finetuning's utils/lora.py save_lora_weight, T2V-Turbo's unet_lora.pt): a torch list
    [up, down, up, down, ...], one pair per injected layer in injection order (names.unet_injection_order), scale 1.
(c) PEFT / diffusers: '<diffusers name>.lora_A.weight' / '.lora_B.weight' ('base_model.model.' in PEFT's
    adapter_model files, 'unet.' / 'text_encoder.' in diffusers' pytorch_lora_weights files; older diffusers files
    '.lora.down.weight' / '.lora.up.weight'), alpha from adapter_config.json (lora_alpha, alpha_pattern,
    rank_pattern, use_rslora) or '<name>.alpha' keys. MCM's LoRAs (yhzhai/mcm) are PEFT folders over the UNet.

Reading checks every name and shape against a model configuration (FULL, the released model's, unless given) and
raises one ValueError that lists what does not fit.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..config import FULL, ModelConfig
from . import names as N

STABLE_LORA_METADATA = 'stable_lora_text_to_video'
SHAPES_METADATA = 'modelscope_t2v_shapes'   # our writer's: the pairs' shapes before stable_lora's 2-D layout
PEFT_CONFIG = 'adapter_config.json'
PEFT_WEIGHTS = ('adapter_model.safetensors', 'adapter_model.bin')
DIFFUSERS_WEIGHTS = ('pytorch_lora_weights.safetensors', 'pytorch_lora_weights.bin')
TEXT_SUBFOLDER = 'text_encoder'   # write_peft_lora's text-encoder adapter, beside the UNet's
MAX_LISTED = 10


@dataclass
class LoraPair:
    """One layer's low-rank change: W += (alpha / r) up @ down."""
    down: torch.Tensor              # (r, in[, kernel...])
    up: torch.Tensor                # (out, r[, 1...])
    alpha: Optional[float] = None   # None: scale 1

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, shape, device=None) -> torch.Tensor:
        """scale x up @ down in float32, reshaped to a weight of `shape`."""
        up, down = (t.to(device=device, dtype=torch.float32) for t in (self.up, self.down))
        return (up.flatten(1) @ down.flatten(1)).mul_(self.scale).reshape(shape)


LoraWeights = Dict[str, LoraPair]


# -- reading ---------------------------------------------------------------------------------------

def read_lora(path: str, config: ModelConfig = FULL) -> LoraWeights:
    """Read a LoRA file or folder in any of the three formats (detected) for a model of `config`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_folder(path, config)
    if not os.path.isfile(path):
        raise ValueError(f'LoRA {path!r} is neither a file nor a folder')
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
        if STABLE_LORA_METADATA in metadata or _is_stable_lora(state):
            return _checked(_from_stable_lora(state, metadata, config), config, path)
        return _checked(_from_peft(state, _peft_config_beside(path), config), config, path)
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(loaded, (list, tuple)):
        return _checked(_from_cloneofsimo(list(loaded), os.path.basename(path), config), config, path)
    if isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        if _is_stable_lora(loaded):
            return _checked(_from_stable_lora(loaded, {}, config), config, path)
        return _checked(_from_peft(loaded, _peft_config_beside(path), config), config, path)
    raise ValueError(f'LoRA {path!r} holds a {type(loaded).__name__}, not a list of tensors (cloneofsimo) or a '
                     'state dict (stable_lora, PEFT, diffusers)')


def _read_folder(folder: str, config: ModelConfig) -> LoraWeights:
    """A PEFT adapter folder (and its text_encoder/ adapter), or a folder with one LoRA file."""
    weights, found = {}, False
    for sub in ('', TEXT_SUBFOLDER):
        base = os.path.join(folder, sub)
        for name in PEFT_WEIGHTS + DIFFUSERS_WEIGHTS:
            if os.path.isfile(os.path.join(base, name)):
                weights.update(read_lora(os.path.join(base, name), config))
                found = True
                break
    if found:
        return weights
    files = sorted(f for f in os.listdir(folder) if f.endswith(('.safetensors', '.pt', '.bin')))
    if len(files) == 1:
        return read_lora(os.path.join(folder, files[0]), config)
    pts = [f for f in files if f.endswith('.pt')]
    if files and len(pts) == len(files):   # cloneofsimo's pair: NAME_unet.pt and NAME_text_encoder.pt
        for f in pts:
            weights.update(read_lora(os.path.join(folder, f), config))
        return weights
    raise ValueError(f'LoRA folder {folder!r} holds no adapter_model.safetensors / pytorch_lora_weights.safetensors '
                     f'and not one LoRA file: {files[:MAX_LISTED]}')


def _is_stable_lora(state: dict) -> bool:
    return bool(state) and all(k.endswith(('.lora_A', '.lora_B', '.bias')) for k in state)


def _peft_config_beside(path: str) -> dict:
    config_path = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding='utf-8') as f:
        return json.load(f)


def _raise_listed(problems: List[str], path: str) -> None:
    if problems:
        more = f' and {len(problems) - MAX_LISTED} more' if len(problems) > MAX_LISTED else ''
        raise ValueError(f'LoRA {path!r}: {len(problems)} entries do not fit this model: '
                         f'{"; ".join(problems[:MAX_LISTED])}{more}')


def _checked(parsed: Tuple[LoraWeights, List[str]], config: ModelConfig, path: str) -> LoraWeights:
    """The pairs of a file, after checking their names and shapes against `config`'s networks."""
    weights, problems = parsed
    problems = list(problems) + check_weights(weights, config)
    _raise_listed(problems, path)
    if not weights:
        raise ValueError(f'LoRA {path!r} holds no LoRA pairs')
    return weights


def check_weights(weights: LoraWeights, config: ModelConfig) -> List[str]:
    """One line per pair whose name is no layer of `config`'s networks or whose shape does not fit its layer."""
    shapes, problems = N.target_shapes(config), []
    for name, pair in weights.items():
        if name == N.GUIDANCE:
            expected = (config.unet.dim, pair.down.shape[1] if pair.down.ndim == 2 else -1)
        elif name not in shapes:
            problems.append(f'{name}: no such layer')
            continue
        else:
            expected = shapes[name]
        if not fits(pair, expected):
            problems.append(f'{name}: down {tuple(pair.down.shape)} / up {tuple(pair.up.shape)} do not make a '
                            f'{tuple(expected)} weight')
    return problems


def fits(pair: LoraPair, shape) -> bool:
    """Whether up @ down makes a weight of `shape` (same rank on both sides, out rows, as many elements)."""
    up, down = pair.up, pair.down
    return (up.ndim >= 2 and down.ndim >= 2 and up.shape[1] == down.shape[0] and up[0].numel() == down.shape[0]
            and up.shape[0] == shape[0] and up.shape[0] * down[0].numel() == math.prod(shape))


# -- (a) stable_lora -------------------------------------------------------------------------------

def _from_stable_lora(state: dict, metadata: dict, config: ModelConfig) -> Tuple[LoraWeights, List[str]]:
    text_names = N.text_from_stable_lora(config.text.used_layers)
    shapes = json.loads(metadata.get(SHAPES_METADATA, '{}'))
    targets = N.target_shapes(config)
    weights, problems = {}, []
    for key in sorted(state):
        stem, _, kind = key.rpartition('.')
        if kind != 'lora_A':
            if kind != 'lora_B' or f'{stem}.lora_A' not in state:
                problems.append(f'{key}: not a LoRA pair key (biases are not supported)')
            continue
        if f'{stem}.lora_B' not in state:
            problems.append(f'{key}: no {stem}.lora_B beside it')
            continue
        a, b = state[key], state[f'{stem}.lora_B']
        if stem in shapes:   # written by write_stable_lora: the pair's own shapes
            a, b = a.reshape(shapes[stem][0]), b.reshape(shapes[stem][1])
        name = _stable_lora_name(stem, text_names)
        shape = targets.get(name, ())
        if name in N.EMBEDDINGS:   # loralib's Embedding: W += (B @ A)^T
            weights[name] = LoraPair(down=b.T, up=a.T)
        elif len(shape) == 5 and b.shape[0] * a.shape[1] == 9 * math.prod(shape[:2]):
            weights[name] = _temporal_conv_pair(a, b, shape)
        elif len(shape) == 4 and b.shape[0] != shape[0]:
            weights[name] = _conv_pair(a, b, shape)
        else:
            weights[name] = LoraPair(down=a, up=b)
    return weights, problems


def _stable_lora_name(stem: str, text_names: dict) -> str:
    """A stable_lora key's stem -> our name (the UNet's keys are UNetSD's; the text's per text_from_stable_lora)."""
    for prefix in ('model.diffusion_model.',):
        stem = stem[len(prefix):] if stem.startswith(prefix) else stem
    for prefix in ('cond_stage_model.model.', 'transformer.'):
        stem = stem[len(prefix):] if stem.startswith(prefix) else stem
    return text_names.get(stem, N.UNET + stem)


def _conv_pair(a: torch.Tensor, b: torch.Tensor, shape) -> LoraPair:
    """loralib's Conv2d pair, A (R, in k) and B (out k, R), whose product (out k, in k) is viewed as the
    (out, in, k, k) weight: row o of the weight is rows o k .. o k + k - 1 of the product, side by side. That is
    the exact pair of rank k R  up = B as (out, k R),  down = k copies of A on the diagonal, as (k R, in, k, k)."""
    out, k = shape[0], b.shape[0] // shape[0]
    down = torch.block_diag(*[a] * k)                               # (k R, k in k)
    return LoraPair(down=down.reshape(k * a.shape[0], *shape[1:]), up=b.reshape(out, k * a.shape[0], 1, 1))


def _temporal_conv_pair(a: torch.Tensor, b: torch.Tensor, shape) -> LoraPair:
    """stable_lora's temporal Conv3d: (B @ A) viewed (out, in, 3, 3, 1), averaged over the 4th dim. That is no
    low-rank pair of ours: it becomes its dense delta with up = identity (rank out)."""
    out = shape[0]
    delta = (b.float() @ a.float()).view(out, shape[1], 3, 3, 1).mean(dim=-2)    # (out, in, 3, 1)
    return LoraPair(down=delta.reshape(shape), up=torch.eye(out).reshape(out, out, 1, 1, 1))


def write_stable_lora(path: str, weights: LoraWeights) -> None:
    """Write `weights` as a stable_lora safetensors file (sd-webui-text2video reads it). Its pairs carry no alpha:
    alpha / r is folded into lora_B. Pairs are stored 2-D, (r, in x kernel) and (out, r), whose product the webui
    views as the weight (Conv2d included); the shapes go in the metadata, so read_lora gives them back. The webui
    cannot read temporal-Conv3d pairs written so (it views them 9x larger)."""
    from safetensors.torch import save_file
    tensors, shapes = {}, {}
    for name, pair in sorted(weights.items()):
        stem = stable_lora_key(name)
        up = pair.up if pair.alpha is None else pair.up * pair.scale
        if name in N.EMBEDDINGS:
            a, b = up.T, pair.down.T
        else:
            a, b = pair.down.reshape(pair.rank, -1), up.reshape(up.shape[0], -1)
            shapes[stem] = [list(pair.down.shape), list(up.shape)]
        tensors[f'{stem}.lora_A'] = a.contiguous()
        tensors[f'{stem}.lora_B'] = b.contiguous()
    save_file(tensors, os.fspath(path), metadata={STABLE_LORA_METADATA: 'v1', SHAPES_METADATA: json.dumps(shapes)})


def stable_lora_key(name: str) -> str:
    """Our name -> the stem of its stable_lora keys."""
    if name.startswith(N.UNET):
        return name[len(N.UNET):]
    if name == N.TOKEN:
        return 'text_model.embeddings.token_embedding'
    if name == N.POSITION:
        return 'text_model.embeddings.position_embedding'
    match = re.fullmatch(r'text\.transformer\.(resblocks\.\d+)\.attn\.in_proj\.([qkv])', name)
    if match:
        return f'{match[1]}.attn.{match[2]}_proj'
    if name.startswith(N.TEXT + 'transformer.'):
        return name[len(N.TEXT + 'transformer.'):]
    raise ValueError(f'{name!r} is not a LoRA target name (unet.<module> or text.<module>)')


# -- (b) cloneofsimo -------------------------------------------------------------------------------

def _from_cloneofsimo(tensors: list, filename: str, config: ModelConfig) -> Tuple[LoraWeights, List[str]]:
    """Pairs (up, down) in injection order, matched to the first target set whose layers fit them all."""
    if len(tensors) % 2 or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f'LoRA {filename!r}: a cloneofsimo file holds tensors in (up, down) pairs; this one holds '
                         f'{len(tensors)} items')
    pairs = [LoraPair(down=tensors[i + 1], up=tensors[i]) for i in range(0, len(tensors), 2)]
    tried = []
    for kind, order in _candidate_orders(pairs, filename, config):
        tried.append(f'{kind}: {len(order)} layers')
        if len(order) == len(pairs) and all(_fits_name(p, n, config) for p, n in zip(pairs, order)):
            return dict(zip(order, pairs)), []
    raise ValueError(f'LoRA {filename!r} holds {len(pairs)} (up, down) pairs that fit none of the injection orders '
                     f'of this model: {"; ".join(tried)}')


def _candidate_orders(pairs: List[LoraPair], filename: str, config: ModelConfig):
    """(description, our names in injection order) of every target set a file of this name may use."""
    text_first = 'text_encoder' in filename
    unet = []
    for targets in N.UNET_TARGETS:
        unet.append((f'UNet {targets}', N.unet_injection_order(config.unet, targets, None)))
        if targets == N.UNET_TARGETS[0] and len(pairs) > 2 and pairs[2].down.ndim == 2:
            # T2V-Turbo: the UNet has a guidance projection (third layer, after time_embedding.linear_1)
            order = N.unet_injection_order(config.unet, targets, pairs[2].down.shape[1])
            unet.append((f'UNet {targets} with time_cond_proj', order))
    text = [(f'text encoder {targets}', N.text_injection_order(config.text, targets)) for targets in N.TEXT_TARGETS]
    return text + unet if text_first else unet + text


def _fits_name(pair: LoraPair, name: str, config: ModelConfig) -> bool:
    if name == N.GUIDANCE:
        return pair.up.shape[0] == config.unet.dim
    return fits(pair, N.target_shapes(config)[name])


def write_cloneofsimo_lora(stem: str, weights: LoraWeights, config: ModelConfig = FULL) -> List[str]:
    """Write `weights` as cloneofsimo lists, STEM_unet.pt and STEM_text_encoder.pt (where they have layers there).
    Each part must cover exactly the layers of one target set (names.UNET_TARGETS / TEXT_TARGETS); alpha / r is
    folded into up. Returns the paths written."""
    paths = []
    for part, prefix in (('unet', N.UNET), ('text_encoder', N.TEXT)):
        mine = {name: pair for name, pair in weights.items() if name.startswith(prefix)}
        if not mine:
            continue
        order = _matching_order(mine, part, config)
        linear = N.unet_linear_in_diffusers(config.unet)
        tensors = []
        for name in order:
            pair = mine[name]
            folded = LoraPair(pair.down, pair.up if pair.alpha is None else pair.up * pair.scale)   # scale 1
            down, up = _diffusers_shaped(folded, name in linear or prefix == N.TEXT)
            tensors += [up.contiguous(), down.contiguous()]
        path = f'{stem}_{part}.pt'
        torch.save(tensors, path)
        paths.append(path)
    return paths


def _matching_order(mine: LoraWeights, part: str, config: ModelConfig) -> List[str]:
    if part == 'text_encoder':
        orders = [N.text_injection_order(config.text, t) for t in N.TEXT_TARGETS]
    else:
        guidance = mine.get(N.GUIDANCE)
        cond = guidance.down.shape[1] if guidance is not None else None
        orders = [N.unet_injection_order(config.unet, t, cond if t == N.UNET_TARGETS[0] else None)
                  for t in N.UNET_TARGETS]
    for order in orders:
        if set(order) == set(mine):
            return order
    raise ValueError(f'a cloneofsimo {part} file lists every layer of one target set in order; these '
                     f'{len(mine)} layers are none of them (sets of {[len(o) for o in orders]} layers)')


# -- (c) PEFT / diffusers --------------------------------------------------------------------------

_PEFT_KEY = re.compile(r'(?P<module>.+?)\.(?:lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight|lora\.(?P<ud>up|down)\.weight|'
                       r'lora_(?P<ud2>up|down)\.weight|lora_embedding_(?P<emb>[AB])(?:\.[\w-]+)?|(?P<alpha>alpha))$')


def _from_peft(state: dict, peft_config: dict, config: ModelConfig) -> Tuple[LoraWeights, List[str]]:
    unet_names = N.unet_from_diffusers(config.unet)
    text_names = N.text_from_clip(config.text.used_layers)
    parts, problems = collections.defaultdict(dict), []
    for key, value in state.items():
        match = _PEFT_KEY.fullmatch(_processor_key(key))
        if match is None:
            problems.append(f'{key}: not a LoRA key')
            continue
        ab = match['ab'] or match['emb']
        role = ('down' if ab == 'A' else 'up') if ab else (match['ud'] or match['ud2'] or 'alpha')
        name = _peft_module_name(match['module'], unet_names, text_names)
        if name is None:
            problems.append(f'{key}: names no layer of this model')
            continue
        parts[name][role] = value
        parts[name]['module'] = match['module'].removeprefix('base_model.model.')
        if match['emb']:
            parts[name]['embedding'] = True
    weights = {}
    for name, part in parts.items():
        if 'down' not in part or 'up' not in part:
            problems.append(f'{name}: has {sorted(k for k in part if k in ("down", "up", "alpha"))}, needs down and up')
            continue
        down, up = part['down'], part['up']
        if part.get('embedding'):   # peft's Embedding: lora_embedding_A (r, rows), _B (width, r); W += (B @ A)^T
            down, up = up.T, down.T
        alpha = float(part['alpha']) if 'alpha' in part else _peft_alpha(peft_config, part['module'], down.shape[0])
        weights[name] = LoraPair(down=down, up=up, alpha=alpha)
    return weights, problems


def _processor_key(key: str) -> str:
    """diffusers' attention-processor LoRA keys (diffusers < 0.21), 'attn1.processor.to_q_lora.down.weight',
    as 'attn1.to_q.lora.down.weight' (to_out: 'to_out.0')."""
    match = re.fullmatch(r'(.+)\.processor\.(to_[qkv]|to_out)_lora\.(up|down)\.weight', key)
    if match is None:
        return key
    layer = match[2] + ('.0' if match[2] == 'to_out' else '')
    return f'{match[1]}.{layer}.lora.{match[3]}.weight'


def _peft_module_name(module: str, unet_names: dict, text_names: dict) -> Optional[str]:
    """A PEFT / diffusers module path -> our name, None where it names nothing of ours."""
    module = module.removeprefix('base_model.model.')
    component = 'unet'
    for prefix, kind in (('unet.', 'unet'), ('text_encoder.', 'text')):
        if module.startswith(prefix):
            module, component = module[len(prefix):], kind
    if module.startswith('text_model.'):   # CLIPTextModel's modules in transformers < 5
        module, component = module[len('text_model.'):], 'text'
    elif module.startswith(('encoder.layers.', 'embeddings.')):   # transformers >= 5 (no UNet name starts so)
        component = 'text'
    return (text_names if component == 'text' else unet_names).get(module)


def _peft_alpha(peft_config: dict, module: str, rank: int) -> Optional[float]:
    """alpha of the layer at `module` (the file's path) from adapter_config.json, whose alpha_pattern keys are
    regular expressions of the path's end, as peft matches them (None without a config: diffusers then uses
    alpha = r, scale 1)."""
    if not peft_config:
        return None
    alpha = float(peft_config.get('lora_alpha', peft_config.get('r', rank)))
    for key, value in (peft_config.get('alpha_pattern') or {}).items():
        if re.fullmatch(rf'(.*\.)?(?:{key})', module):
            alpha = float(value)
    if peft_config.get('use_rslora'):   # scale alpha / sqrt(r), as alpha' / r
        alpha *= math.sqrt(rank)
    return alpha


def write_peft_lora(folder: str, weights: LoraWeights, config: ModelConfig = FULL) -> List[str]:
    """Write `weights` as PEFT adapters on diffusers' names: the UNet's in FOLDER (adapter_model.safetensors,
    adapter_config.json; `PeftModel.from_pretrained(UNet3DConditionModel, FOLDER)` loads it), the text encoder's
    in FOLDER/text_encoder/ over transformers' CLIPTextModel, named as transformers >= 5 names its modules
    ('encoder.layers.0.self_attn.q_proj'; older ones prefix 'text_model.', which read_lora takes too). Returns the
    folders written."""
    from safetensors.torch import save_file
    to_diffusers = {ours: theirs for theirs, ours in N.unet_from_diffusers(config.unet).items()}
    to_clip = {ours: theirs for theirs, ours in N.text_from_clip(config.text.used_layers).items()}
    linear = N.unet_linear_in_diffusers(config.unet)
    written = []
    for sub, names, prefix in (('', to_diffusers, N.UNET), (TEXT_SUBFOLDER, to_clip, N.TEXT)):
        mine = {name: pair for name, pair in sorted(weights.items()) if name.startswith(prefix)}
        if not mine:
            continue
        unknown = sorted(set(mine) - set(names))
        if unknown:
            raise ValueError(f'{len(unknown)} names are no {prefix[:-1]} layer of this configuration: '
                             f'{unknown[:MAX_LISTED]}')
        out = os.path.join(os.fspath(folder), sub)
        os.makedirs(out, exist_ok=True)
        tensors, ranks, alphas = {}, {}, {}
        for name, pair in mine.items():
            module = names[name]
            if name in N.EMBEDDINGS:
                tensors[f'base_model.model.{module}.lora_embedding_A'] = pair.up.T.contiguous()
                tensors[f'base_model.model.{module}.lora_embedding_B'] = pair.down.T.contiguous()
            else:
                down, up = _diffusers_shaped(pair, name in linear or prefix == N.TEXT)
                tensors[f'base_model.model.{module}.lora_A.weight'] = down.contiguous()
                tensors[f'base_model.model.{module}.lora_B.weight'] = up.contiguous()
            ranks[module] = pair.rank
            alphas[module] = float(pair.rank if pair.alpha is None else pair.alpha)
        save_file(tensors, os.path.join(out, PEFT_WEIGHTS[0]))
        with open(os.path.join(out, PEFT_CONFIG), 'w', encoding='utf-8') as f:
            json.dump(_peft_config(ranks, alphas), f, indent=2)
        written.append(out)
    return written


def _peft_config(ranks: dict, alphas: dict) -> dict:
    """adapter_config.json: the commonest rank and alpha, with patterns for the layers that differ."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': None, 'inference_mode': True,
            'r': r, 'lora_alpha': alpha, 'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False,
            'use_rslora': False, 'init_lora_weights': True, 'modules_to_save': None,
            'target_modules': sorted(ranks),
            'rank_pattern': {re.escape(m): v for m, v in ranks.items() if v != r},
            'alpha_pattern': {re.escape(m): v for m, v in alphas.items() if v != alpha}}


def _diffusers_shaped(pair: LoraPair, linear: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(down, up) shaped for diffusers' layer: 2-D for a Linear there (our 1x1 Conv1d included), else as given."""
    if linear:
        return pair.down.reshape(pair.rank, -1), pair.up.reshape(pair.up.shape[0], -1)
    return pair.down, pair.up
