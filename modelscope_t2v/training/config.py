"""TrainConfig: one frozen dataclass read from a YAML file, every key checked with an error that names it.

    modelscope-t2v train CONFIG.yaml        (docs/train-example.yaml lists every key with its default)

Keys are flat (no sections), as the field names below. A YAML quirk is forgiven: PyYAML reads `1e-4` (no dot) as a
string, so a number field also takes a string that parses as a finite number.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

TARGETS = ('lora', 'full')
LORA_MODULES = ('spatial_attention', 'temporal_attention', 'ff')
OPTIMIZERS = ('adamw', 'adamw8bit')
PRECISIONS = ('32-true', '32', 'bf16-mixed', '16-mixed', 'bf16-true', '16-true', '64-true')
LOGGERS = ('csv', 'tensorboard')
LORA_EXPORTS = ('stable_lora', 'peft')
FULL_EXPORTS = ('original',)


@dataclass(frozen=True)
class TrainConfig:
    # -- the model and where results go
    model: str                                   # model folder (original or diffusers layout) or hub id
    output_dir: str                              # checkpoints/, logs/, validation/, exports/ go here
    base_model: Optional[str] = None             # the files a partial original-format model lacks
    seed: int = 0                                # every random draw of the run derives from it
    # -- what is trained
    target: str = 'lora'                         # 'lora' (peft adapters) or 'full' (every UNet weight)
    lora_rank: int = 16
    lora_alpha: Optional[float] = None           # scale alpha / rank; None: alpha = rank (scale 1)
    lora_dropout: float = 0.0
    lora_modules: Tuple[str, ...] = ('spatial_attention', 'temporal_attention')   # of LORA_MODULES
    train_text_encoder: bool = False             # lora: its out_proj and MLP get adapters; full: all of it
    # -- data: any of data_dir, video (+ prompt), json; clips of all of them are joined
    data_dir: Optional[str] = None               # videos with same-named .txt captions
    video: Optional[str] = None                  # one video ...
    prompt: Optional[str] = None                 # ... and its caption
    json: Optional[str] = None                   # {"data": [{"video_path", "data": [{"frame_index", "prompt"}]}]}
    fallback_prompt: Optional[str] = None        # caption of a data_dir video without a .txt; None: an error
    width: int = 256                             # training size (the area of each aspect bucket)
    height: int = 256
    n_sample_frames: int = 16                    # frames per clip
    frame_stride: int = 1                        # take every n-th frame of the video
    fps: Optional[float] = None                  # instead of frame_stride: sample at this rate
    buckets: Union[None, str, Tuple[Tuple[int, int], ...]] = None   # None, 'auto' or [[width, height], ...]
    cache_latents: bool = False                  # encode each clip once; its posterior kept on disk
    cache_dir: Optional[str] = None              # default: OUTPUT_DIR/latent-cache
    batch_size: int = 1
    num_workers: int = 0
    # -- optimisation
    optimizer: str = 'adamw'                     # or 'adamw8bit' (bitsandbytes)
    learning_rate: float = 1e-4
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0                     # linear warm-up, then constant
    max_steps: int = 1000
    max_epochs: Optional[int] = None             # None: until max_steps
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    precision: str = '32-true'                   # Lightning's: 'bf16-mixed', '16-mixed', ...
    gradient_checkpointing: bool = False         # UNet3D.gradient_checkpointing: less memory, ~30 % slower
    offset_noise_strength: float = 0.0           # noise += s * N(0, 1) per video and channel
    ema_decay: Optional[float] = None            # an exponential moving average of the trained weights
    # -- hardware
    accelerator: str = 'auto'                    # 'cpu', 'gpu', 'auto'
    devices: Union[int, str, Tuple[int, ...]] = 'auto'
    strategy: str = 'auto'                       # 'ddp', 'fsdp', 'ddp_find_unused_parameters_true', ...
    num_nodes: int = 1
    # -- checkpoints, logs, validation videos, exports
    checkpoint_every_n_steps: int = 500
    resume_from: Optional[str] = None            # a Lightning checkpoint, or 'last' (OUTPUT_DIR/checkpoints/last.ckpt)
    logger: str = 'csv'                          # or 'tensorboard'
    log_every_n_steps: int = 10
    progress_bar: bool = True
    validation_every_n_steps: Optional[int] = None   # None: no validation videos
    validation_prompts: Tuple[str, ...] = ()
    validation_frames: Optional[int] = None      # default: n_sample_frames
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 9.0
    validation_sampler: str = 'ddim'
    exports: Optional[Tuple[str, ...]] = None    # lora: 'stable_lora', 'peft'; full: 'original'; None: all

    def __post_init__(self):
        check(self)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, 'checkpoints')

    @property
    def latent_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.output_dir, 'latent-cache')

    @property
    def export_formats(self) -> Tuple[str, ...]:
        return self.exports if self.exports is not None else (LORA_EXPORTS if self.target == 'lora' else FULL_EXPORTS)


# field -> rule, as config.check_value's plus: ('choice', options), ('opt', rule) None or the rule, ('number', low,
# high) a finite number in [low, high], ('strs', options or None) a list of strings, ('path',) a non-empty string
_RULES = {
    'model': ('path',), 'output_dir': ('path',), 'base_model': ('opt', ('path',)), 'seed': ('int', 0),
    'target': ('choice', TARGETS), 'lora_rank': ('int', 1), 'lora_alpha': ('opt', ('number', 1e-12, math.inf)),
    'lora_dropout': ('number', 0.0, 0.99), 'lora_modules': ('strs', LORA_MODULES), 'train_text_encoder': ('bool',),
    'data_dir': ('opt', ('path',)), 'video': ('opt', ('path',)), 'prompt': ('opt', ('str',)),
    'json': ('opt', ('path',)), 'fallback_prompt': ('opt', ('str',)),
    'width': ('int', 8), 'height': ('int', 8), 'n_sample_frames': ('int', 1), 'frame_stride': ('int', 1),
    'fps': ('opt', ('number', 0.01, 240.0)), 'buckets': ('buckets',), 'cache_latents': ('bool',),
    'cache_dir': ('opt', ('path',)), 'batch_size': ('int', 1), 'num_workers': ('int', 0),
    'optimizer': ('choice', OPTIMIZERS), 'learning_rate': ('number', 1e-12, 1.0),
    'adam_betas': ('betas',), 'weight_decay': ('number', 0.0, 1.0), 'lr_warmup_steps': ('int', 0),
    'max_steps': ('int', 1), 'max_epochs': ('opt', ('int', 1)), 'accumulate_grad_batches': ('int', 1),
    'gradient_clip_val': ('opt', ('number', 1e-12, math.inf)), 'precision': ('choice', PRECISIONS),
    'gradient_checkpointing': ('bool',), 'offset_noise_strength': ('number', 0.0, 1.0),
    'ema_decay': ('opt', ('number', 0.0, 0.999999)), 'accelerator': ('str',), 'devices': ('devices',),
    'strategy': ('str',), 'num_nodes': ('int', 1), 'checkpoint_every_n_steps': ('int', 1),
    'resume_from': ('opt', ('path',)), 'logger': ('choice', LOGGERS), 'log_every_n_steps': ('int', 1),
    'progress_bar': ('bool',), 'validation_every_n_steps': ('opt', ('int', 1)), 'validation_prompts': ('strs', None),
    'validation_frames': ('opt', ('int', 1)), 'validation_inference_steps': ('int', 1),
    'validation_guidance_scale': ('number', 0.0, 100.0), 'validation_sampler': ('sampler',),
    'exports': ('opt', ('strs', LORA_EXPORTS + FULL_EXPORTS)),
}
_NUMBER_FIELDS = {name for name, rule in _RULES.items() if (rule[1] if rule[0] == 'opt' else rule)[0] == 'number'}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_rule(value: Any, rule: tuple, name: str) -> None:
    """Raise TypeError/ValueError quoting `name` and `value` when `value` breaks `rule`."""
    from ..config import check_value
    kind = rule[0]
    if kind == 'opt':
        if value is not None:
            _check_rule(value, rule[1], name)
    elif kind in ('int', 'bool', 'str'):
        check_value(value, rule, name)
    elif kind == 'path':
        if not isinstance(value, str) or not value:
            raise TypeError(f'{name}={value!r} must be a non-empty string (a path)')
    elif kind == 'choice':
        if value not in rule[1]:
            raise ValueError(f'{name}={value!r} is not one of {list(rule[1])}')
    elif kind == 'number':
        low, high = rule[1], rule[2]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f'{name}={value!r} must be a finite number in [{low}, {high}]')
        if not low <= value <= high:
            raise ValueError(f'{name}={value!r} must be in [{low}, {high}]')
    elif kind == 'strs':
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f'{name}={value!r} must be a list of strings')
        bad = [v for v in value if rule[1] is not None and v not in rule[1]]
        if bad:
            raise ValueError(f'{name}={list(value)!r}: {bad[0]!r} is not one of {list(rule[1])}')
    elif kind == 'betas':
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                not isinstance(b, bool) and isinstance(b, numbers.Real) and 0 <= b < 1 for b in value)):
            raise ValueError(f'{name}={value!r} must be two numbers in [0, 1), like [0.9, 0.999]')
    elif kind == 'devices':
        ok = (_is_int(value) and value >= -1) or value == 'auto' or (
            isinstance(value, (list, tuple)) and value and all(_is_int(v) and v >= 0 for v in value))
        if not ok:
            raise ValueError(f"{name}={value!r} must be a count (-1: all), 'auto' or a list of device indices")
    elif kind == 'buckets':
        ok = value is None or value == 'auto' or (isinstance(value, (list, tuple)) and value and all(
            isinstance(b, (list, tuple)) and len(b) == 2 and all(_is_int(s) and s >= 8 for s in b) for b in value))
        if not ok:
            raise ValueError(f"{name}={value!r} must be null, 'auto' or a list of [width, height] pairs of at least 8")
    elif kind == 'sampler':
        from ..schedulers import SAMPLERS
        if value not in SAMPLERS:
            raise ValueError(f'{name}={value!r} is not one of {sorted(SAMPLERS)}')
    else:
        raise AssertionError(f'no rule kind {kind!r} (field {name})')


def check(config: TrainConfig) -> None:
    """Every field by its rule, then what the fields need of each other."""
    for f in dataclasses.fields(config):
        _check_rule(getattr(config, f.name), _RULES[f.name], f.name)
    c = config
    if not (c.data_dir or c.video or c.json):
        raise ValueError('no training data: give data_dir (videos with .txt captions), video with prompt, '
                         'or json (a JSON dataset file)')
    if c.video and not c.prompt:
        raise ValueError(f'video={c.video!r} needs prompt, its caption')
    if c.prompt and not c.video:
        raise ValueError('prompt is the caption of video, which is not given')
    if c.target == 'lora' and not c.lora_modules:
        raise ValueError(f'lora_modules=[] targets nothing; choose some of {list(LORA_MODULES)}')
    wrong = [e for e in c.export_formats if e not in (LORA_EXPORTS if c.target == 'lora' else FULL_EXPORTS)]
    if wrong:
        raise ValueError(f'exports={list(c.export_formats)!r}: {wrong[0]!r} does not apply to target={c.target!r} '
                         f'(lora: {list(LORA_EXPORTS)}; full: {list(FULL_EXPORTS)})')
    if c.validation_every_n_steps is not None and not c.validation_prompts:
        raise ValueError(f'validation_every_n_steps={c.validation_every_n_steps} needs validation_prompts')
    if c.buckets is None:
        for name in ('width', 'height'):
            if getattr(c, name) % 8:
                raise ValueError(f'{name}={getattr(c, name)} must be a multiple of 8')
    elif isinstance(c.buckets, tuple) and any(s % 8 for b in c.buckets for s in b):
        raise ValueError(f'buckets={[list(b) for b in c.buckets]!r}: every side must be a multiple of 8')


def from_dict(raw: Any, source: str = 'the configuration') -> TrainConfig:
    """A TrainConfig of a mapping (YAML's), lists as tuples; unknown and missing keys name `source`."""
    if not isinstance(raw, dict):
        raise TypeError(f'{source} must hold a mapping of keys to values, not {type(raw).__name__}')
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f'; did you mean {close[0]!r}?' if close else f'; valid keys: {", ".join(names)}'
            raise ValueError(f'{source}: unknown key {key!r}{hint}')
    missing = [n for n in ('model', 'output_dir') if n not in raw]
    if missing:
        raise ValueError(f'{source}: {" and ".join(missing)} must be given')
    values = {key: _from_yaml(key, value) for key, value in raw.items()}
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as error:
        raise type(error)(f'{source}: {error}') from None


def _from_yaml(key: str, value: Any) -> Any:
    """Lists as tuples (nested too); a number field's numeric string as its float."""
    if isinstance(value, list):
        return tuple(_from_yaml(key, v) for v in value)
    if key in _NUMBER_FIELDS and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value   # the rule names it
        return number if math.isfinite(number) else value
    return value


def load(path: str) -> TrainConfig:
    """Read and check a YAML training configuration."""
    import yaml
    if not os.path.isfile(path):
        raise ValueError(f'training configuration {path!r}: no such file')
    with open(path, encoding='utf-8') as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ValueError(f'{path} is not valid YAML: {error}') from None
    return from_dict(raw, path)


def to_dict(config: TrainConfig) -> dict:
    """The configuration as plain YAML-able values (tuples as lists)."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
