"""Every generation control, checked before any model work.

`parse_request` takes the ModelScope input (a dict with 'text', or a string)
plus keyword arguments (which win over keys of the dict) and returns a frozen
GenerationRequest or raises ValueError/TypeError naming the key, the value and
the valid range.

With `builtin_rules=True` (ModelScope's pipeline()) it accepts what ModelScope's
built-in pipeline accepts: unknown keys are ignored with a warning, height and
width are rounded down to the autoencoder's cell, and a request without seed,
generator or latents draws its noise from torch's global generator, so
`torch.manual_seed(s)` before the call decides the video.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch

from . import init_media, video_io
from .config import MAX_FRAMES, MAX_SIDE, ModelConfig
from .schedulers import DEFAULT_SAMPLER, check_sampler, default_steps, max_steps

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ('video', 'frames', 'latents')
MAX_SEED = 2 ** 63 - 1
LORA_SCALE_RANGE = (-10.0, 10.0)


class GenerationCancelled(Exception):
    """Raised when a step callback stops the generation (it returned False or raised this)."""


class NonFiniteError(RuntimeError):
    """Raised when a generation's latents or decoded frames hold NaN or inf; no file is written."""


@dataclass(frozen=True)
class GenerationRequest:
    prompts: Tuple[str, ...]                  # one per prompt
    negative_prompts: Tuple[str, ...]         # one per prompt ('' = the original's empty prompt)
    num_videos_per_prompt: int = 1
    seed: Optional[int] = None                # video i of the batch uses seed + i; None: torch's global generator
    generator: Optional[torch.Generator] = None  # replaces the seeds when given
    latents: Optional[torch.Tensor] = None    # (n, c, f, h/8, w/8) starting noise
    num_frames: int = 16
    height: int = 256
    width: int = 256
    fps: float = 8.0
    num_inference_steps: int = 50
    guidance_scale: float = 9.0
    eta: float = 0.0
    sampler: Any = DEFAULT_SAMPLER            # short name or diffusers scheduler instance
    output_video: Union[str, os.PathLike, None] = None  # as given; a batch writes name-0.ext, name-1.ext, ...
    output_type: str = 'video'                # 'video' file(s), 'frames' uint8 arrays or 'latents'
    show_progress: Optional[bool] = None      # None: a progress bar when stderr is a terminal
    callback: Optional[Callable] = None       # callback(step, timestep, latents) -> False to stop
    decode_chunk_frames: Optional[int] = None # frames decoded at once; None = all
    init_video: Any = None                    # video-to-video: uint8 frames (f, h, w, 3) or latents (n, c, f, h, w)
    strength: float = 0.6                     # with init_video: the share of the steps run, from its noised latents
    init_image: Any = None                    # image-to-video: uint8 (h, w, 3), held as frame 0 at every step
    temporal_window: Optional[int] = None     # long videos: frames each temporal attention sees; None: all
    temporal_stride: Optional[int] = None     # frames between the windows' starts
    lora: Tuple[str, ...] = ()                # LoRA files, folders or hub ids, loaded for this call only
    lora_scale: Tuple[float, ...] = ()        # one per LoRA

    @property
    def num_videos(self) -> int:
        return len(self.prompts) * self.num_videos_per_prompt

    def seeds(self) -> list:
        """The seed of each video in the batch (None where a generator, the caller's latents or torch's
        global generator give the noise)."""
        if self.generator is not None or self.latents is not None or self.seed is None:
            return [None] * self.num_videos
        return [self.seed + i for i in range(self.num_videos)]


KEYS = {f for f in GenerationRequest.__dataclass_fields__} - {'prompts', 'negative_prompts'}
INPUT_KEYS = KEYS | {'text', 'negative_prompt'}
_ignored_reported = set()   # the sets of unknown keys already warned about in this process


def parse_request(inputs, config: ModelConfig, builtin_rules: bool = False, **kwargs) -> GenerationRequest:
    """Merge the input dict with keyword arguments and check every value.

    builtin_rules: accept what ModelScope's built-in pipeline accepts (see the module's docstring);
    values of known keys are checked all the same.
    """
    if isinstance(inputs, str):
        inputs = {'text': inputs}
    if not isinstance(inputs, dict):
        raise TypeError(f"input must be a dict like {{'text': 'a prompt'}} or a string, "
                        f'not {type(inputs).__name__}')
    values = {**inputs, **{k: v for k, v in kwargs.items() if v is not None}}
    unknown = sorted(set(values) - INPUT_KEYS, key=str)
    if unknown and not builtin_rules:
        raise ValueError(f'unknown generation options {unknown}; valid ones are {sorted(INPUT_KEYS)}')
    if unknown:
        _warn_ignored(unknown)
        values = {k: v for k, v in values.items() if k in INPUT_KEYS}
    if 'text' not in values:
        raise ValueError("input has no 'text': pass {'text': 'a prompt'}")
    prompts = _prompts(values.pop('text'), 'text')
    negatives = _negatives(values.pop('negative_prompt', ''), len(prompts))
    video = init_media.init_video(values.get('init_video'))
    video_frames = None if video is None else (video.shape[2] if isinstance(video, torch.Tensor) else len(video))
    sampler = values.get('sampler', config.sampler)
    check_sampler(sampler)
    r = {
        'num_videos_per_prompt': _int(values, 'num_videos_per_prompt', 1, 1, 256),
        # a starting video gives its frame count (num_frames trims or loops it)
        'num_frames': _int(values, 'num_frames', min(video_frames or config.max_frames, MAX_FRAMES), 1, MAX_FRAMES),
        'height': _side(values, 'height', config.height, config.autoencoder.downsample, builtin_rules),
        'width': _side(values, 'width', config.width, config.autoencoder.downsample, builtin_rules),
        'fps': _number(values, 'fps', 8.0, *video_io.FPS_RANGE),
        'num_inference_steps': _int(values, 'num_inference_steps', default_steps(sampler), 1,
                                    max_steps(sampler, config.diffusion.num_timesteps)),
        'guidance_scale': _number(values, 'guidance_scale', 9.0, 0.0, 100.0),
        'eta': _number(values, 'eta', 0.0, 0.0, 1.0),
        'output_type': _choice(values, 'output_type', 'video', OUTPUT_TYPES),
        'show_progress': _optional_bool(values, 'show_progress'),
        'callback': _optional_callable(values, 'callback'),
        'decode_chunk_frames': (None if values.get('decode_chunk_frames') is None
                                else _int(values, 'decode_chunk_frames', None, 1, MAX_FRAMES)),
        'sampler': sampler,
        'generator': _optional_generator(values),
    }
    r.update(_loras(values.get('lora'), values.get('lora_scale')))
    n_videos = len(prompts) * r['num_videos_per_prompt']
    r['seed'] = _seed(values, n_videos, draw=not builtin_rules)
    r['latents'] = _latents(values.get('latents'), n_videos, config, r)
    r['output_video'] = _output_video(values.get('output_video'), r['output_type'], n_videos)
    r.update(_init_media(values, video, n_videos, config, r))
    r.update(_temporal_window(values, config, r['num_frames']))
    return GenerationRequest(prompts=prompts, negative_prompts=negatives, **r)


def _init_media(values: dict, video, n_videos: int, config: ModelConfig, r: dict) -> dict:
    """init_video (with its strength) and init_image, checked against the request."""
    out = {'init_video': video, 'init_image': init_media.init_image(values.get('init_image'))}
    if video is not None and out['init_image'] is not None:
        raise ValueError('init_video and init_image are both given; video-to-video starts from one, '
                         'image-to-video from the other')
    if values.get('strength') is not None and video is None:
        raise ValueError('strength is given without init_video; it is the share of the steps video-to-video runs')
    out['strength'] = _number(values, 'strength', 0.6, 0.0, 1.0, low_open=True)
    if video is not None and int(r['num_inference_steps'] * out['strength']) < 1:
        raise ValueError(f"strength={out['strength']} of num_inference_steps={r['num_inference_steps']} runs no "
                         f"step; use strength of at least {1 / r['num_inference_steps']:g}")
    if isinstance(video, torch.Tensor):
        cell = config.autoencoder.downsample
        expected = (config.unet.in_dim, r['num_frames'], r['height'] // cell, r['width'] // cell)
        if tuple(video.shape[1:]) != expected or video.shape[0] not in (1, n_videos):
            raise ValueError(f'init_video latents have shape {tuple(video.shape)}; this request needs '
                             f'(1 or {n_videos}, {", ".join(map(str, expected))})')
    return out


def _loras(lora, scale) -> dict:
    """lora: a path or hub id, or a list of them; lora_scale: a number, or one per LoRA (default 1)."""
    if lora is None:
        if scale is not None:
            raise ValueError(f'lora_scale={scale!r} is given without lora; it scales the LoRAs that lora names')
        return {}
    paths = [lora] if isinstance(lora, (str, os.PathLike)) else lora
    if not isinstance(paths, (list, tuple)) or not paths:
        raise TypeError(f'lora must be a path or hub id, or a non-empty list of them, not {lora!r}')
    for path in paths:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
            raise TypeError(f'lora must hold paths or hub ids (strings); got {path!r}')
        if not os.path.exists(path) and not _hub_id_like(os.fspath(path)):
            raise ValueError(f'lora={os.fspath(path)!r} is neither an existing file or folder nor a hub id like '
                             "'owner/name' or 'owner/name/subfolder'")
    scales = [1.0] * len(paths) if scale is None else ([scale] * len(paths) if not isinstance(scale, (list, tuple))
                                                       else list(scale))
    if len(scales) != len(paths):
        raise ValueError(f'lora_scale has {len(scales)} values for {len(paths)} LoRAs; give one number, '
                         'or one per LoRA')
    low, high = LORA_SCALE_RANGE
    checked = tuple(_number({'lora_scale': value}, 'lora_scale', 1.0, low, high) for value in scales)
    return {'lora': tuple(os.fspath(p) for p in paths), 'lora_scale': checked}


def _hub_id_like(text: str) -> bool:
    """'owner/name' or 'owner/name/sub/folder': not a path that starts at '/', '.' or '~', no empty part."""
    parts = text.split('/')
    return len(parts) >= 2 and all(parts) and not text.startswith(('.', '~'))


def _temporal_window(values: dict, config: ModelConfig, frames: int) -> dict:
    """The temporal attention's window and stride, None where one window holds every frame."""
    given = values.get('temporal_window')
    window = _int(values, 'temporal_window', config.max_frames, 1, MAX_FRAMES)
    if given is not None and window > frames:
        raise ValueError(f'temporal_window={window} is larger than num_frames={frames}, the frames it must tile; '
                         f'use at most {frames}, or leave it out')
    stride = _int(values, 'temporal_stride', max(1, window // 4), 1, window)   # FreeNoise: 4 for 16
    return {'temporal_window': window, 'temporal_stride': stride} if window < frames else {}


def _prompts(value, key: str) -> tuple:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f'{key} must be a string or a non-empty list of strings, not {value!r}')
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f'{key} must hold strings; got {text!r} ({type(text).__name__})')
        if key == 'text' and not text.strip():
            raise ValueError(f'{key}={text!r} is empty; describe the video in English')
    return tuple(texts)


def _negatives(value, n: int) -> tuple:
    if value is None:
        value = ''
    if isinstance(value, str):
        return (value,) * n
    negatives = _prompts(value, 'negative_prompt')
    if len(negatives) != n:
        raise ValueError(f'negative_prompt has {len(negatives)} entries but text has {n}; '
                         'give one negative prompt per prompt, or a single string')
    return negatives


def _int(values: dict, key: str, default, low: int, high: int) -> int:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{key} must be an integer in {low}..{high}, not {value!r}')
    if not low <= value <= high:
        raise ValueError(f'{key}={value} is outside the valid range {low}..{high}')
    return int(value)


def _warn_ignored(keys: list) -> None:
    """One warning per process for each set of unknown keys, as the built-in ignores them silently."""
    if tuple(keys) not in _ignored_reported:
        _ignored_reported.add(tuple(keys))
        logger.warning('ignoring unknown generation options %s (valid ones are %s)', keys, sorted(INPUT_KEYS))


def _side(values: dict, key: str, default: int, multiple: int, round_down: bool = False) -> int:
    value = _int(values, key, default, multiple, MAX_SIDE)
    if value % multiple and round_down:
        logger.warning("%s=%d rounded down to %d, a multiple of %d, as ModelScope's pipeline does",
                       key, value, value // multiple * multiple, multiple)
        return value // multiple * multiple
    if value % multiple:
        raise ValueError(f'{key}={value} is not a multiple of {multiple} (the autoencoder works on '
                         f'{multiple}x{multiple} pixel cells); e.g. {value // multiple * multiple} '
                         f'or {(value // multiple + 1) * multiple}')
    return value


def _number(values: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = values.get(key, default)
    bracket = '(' if low_open else '['
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{key} must be a number in {bracket}{low}, {high}], not {value!r}')
    value = float(value)
    too_low = value <= low if low_open else value < low
    if math.isnan(value) or too_low or value > high:
        raise ValueError(f'{key}={value} is outside the valid range {bracket}{low}, {high}]')
    return value


def _choice(values: dict, key: str, default: str, choices) -> str:
    value = values.get(key, default)
    if value not in choices:
        raise ValueError(f'{key}={value!r} is not one of {list(choices)}')
    return value


def _optional_bool(values: dict, key: str):
    value = values.get(key)
    if value is not None and not isinstance(value, bool):
        raise TypeError(f'{key} must be True, False or None, not {value!r}')
    return value


def _optional_callable(values: dict, key: str):
    value = values.get(key)
    if value is not None and not callable(value):
        raise TypeError(f'{key} must be callable as {key}(step, timestep, latents), not {value!r}')
    return value


def _optional_generator(values: dict):
    value = values.get('generator')
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f'generator must be a torch.Generator, not {type(value).__name__}')
    return value


def _seed(values: dict, n_videos: int, draw: bool) -> Optional[int]:
    """The seed given; else a new random one (reported back, so the video can be made again) when
    `draw`, or None: the noise then comes from torch's global generator. Video i uses seed + i, which
    must stay a valid seed too (one that can be passed back)."""
    seed = values.get('seed')
    if seed is None:
        return secrets.randbelow(2 ** 31) if draw else None
    seed = _int(values, 'seed', None, 0, MAX_SEED)
    if seed + n_videos - 1 > MAX_SEED:
        raise ValueError(f'seed={seed} with {n_videos} videos would use seeds up to {seed + n_videos - 1}, '
                         f'past the largest, {MAX_SEED}: choose a seed of at most {MAX_SEED - n_videos + 1}')
    return seed


def _latents(latents, n_videos: int, config: ModelConfig, r: dict):
    if latents is None:
        return None
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise TypeError(f'latents must be a floating-point torch.Tensor, not {type(latents).__name__}')
    if latents.layout != torch.strided:
        raise TypeError(f'latents must be a dense tensor, not one of layout {latents.layout}')
    if latents.device.type == 'meta':
        raise ValueError('latents are on the meta device, which holds shapes but no values: pass the starting '
                         'noise on the CPU or a GPU')
    cell = config.autoencoder.downsample
    expected = (n_videos, config.unet.in_dim, r['num_frames'], r['height'] // cell, r['width'] // cell)
    if tuple(latents.shape) != expected:
        raise ValueError(f'latents have shape {tuple(latents.shape)}; this request needs {expected} '
                         '(videos, channels, num_frames, height/8, width/8)')
    bad = latents.numel() - int(torch.isfinite(latents).sum())
    if bad:
        raise ValueError(f'latents hold {bad} NaN or inf values of {latents.numel()}; starting noise must be '
                         'finite (a unit Gaussian, as torch.randn draws)')
    return latents


def _output_video(path, output_type: str, n_videos: int):
    if path is None:
        return None
    if output_type != 'video':
        raise ValueError(f"output_video={path!r} is given but output_type={output_type!r}; "
                         "files are written for output_type='video'")
    try:
        video_io.validate_output_name(path)
        for numbered in numbered_paths(path, n_videos):   # each file the request writes
            video_io.validate_output_path(numbered)
        return path   # as given: a relative or pathlib.Path value comes back unchanged
    except (TypeError, ValueError) as error:  # video_io's message, prefixed with the option's name
        raise type(error)(f'output_video={path!r}: {error}') from None


def numbered_paths(output_video, n: int) -> list:
    """The files of n videos written to output_video: the path itself for one, else NAME-0.EXT, NAME-1.EXT..."""
    if n == 1:
        return [os.fspath(output_video)]
    stem, ext = os.path.splitext(os.fspath(output_video))
    return [f'{stem}-{i}{ext}' for i in range(n)]
