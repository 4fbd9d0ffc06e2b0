"""Training clips: found in a folder, a single video or a JSON file; read, sampled, resized; batched by aspect bucket.

A clip is `n_sample_frames` frames of one video, `stride` apart, from frame `start`. A video of the folder and single
forms gives every whole window of its frames (non-overlapping, from frame 0); an entry of the JSON form starts at its
`frame_index`. Frames are resized to cover the clip's size (torch's antialiased bicubic, as video-to-video resizes) and
centre-cropped to it. With latent caching, each clip's autoencoder posterior (mean, logvar) is written once to
`<cache>/<key>.pt`, the key a hash of the video file (path, size, mtime) and of the sampling, and read from then on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset

from .. import tokenizer, video_io
from .config import TrainConfig

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.mov', '.webm', '.gif', '.avi')
AUTO_BUCKET_RATIOS = (9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9)   # width / height


@dataclass(frozen=True)
class Clip:
    path: str                    # the video file
    prompt: str
    start: int                   # first frame
    stride: int                  # frames between samples
    frames: int                  # frames sampled
    size: Tuple[int, int]        # (width, height) it is trained at: its bucket's


# -- finding clips ---------------------------------------------------------------------------------

def find_clips(config: TrainConfig) -> List[Clip]:
    """Every clip of the configuration's data sources, each at its bucket's size."""
    sources = []   # (video path, prompt, starts or None for every window)
    if config.data_dir:
        sources += _folder_sources(config.data_dir, config.fallback_prompt)
    if config.video:
        if not os.path.isfile(config.video):
            raise ValueError(f'video={config.video!r}: no such file')
        sources.append((config.video, config.prompt, None))
    if config.json:
        sources += _json_sources(config.json)
    sizes = bucket_sizes(config)
    clips = []
    for path, prompt, starts in sources:
        info = video_io.probe_video(path)
        stride = config.frame_stride if config.fps is None else max(1, round(info['fps'] / config.fps))
        span = (config.n_sample_frames - 1) * stride + 1
        if starts is None:
            starts = range(0, info['frames'] - span + 1, span)
        fitting = [s for s in starts if 0 <= s and s + span <= info['frames']]
        if len(fitting) < len(starts) or not fitting:
            logger.warning('%s: %d frames hold %d of its clips of %d frames %d apart', path, info['frames'],
                           len(fitting), config.n_sample_frames, stride)
        size = nearest_bucket(info['width'], info['height'], sizes)
        clips += [Clip(os.path.abspath(path), prompt, s, stride, config.n_sample_frames, size) for s in fitting]
    if not clips:
        raise ValueError(f'no training clips: no video of the data holds n_sample_frames={config.n_sample_frames} '
                         f'frames at that stride')
    return clips


def _folder_sources(folder: str, fallback: Optional[str]) -> list:
    if not os.path.isdir(folder):
        raise ValueError(f'data_dir={folder!r}: no such folder')
    videos = sorted(n for n in os.listdir(folder) if n.lower().endswith(VIDEO_EXTENSIONS))
    if not videos:
        raise ValueError(f'data_dir={folder!r} holds no video ({", ".join(VIDEO_EXTENSIONS)})')
    sources = []
    for name in videos:
        caption = os.path.join(folder, os.path.splitext(name)[0] + '.txt')
        if os.path.isfile(caption):
            with open(caption, encoding='utf-8') as f:
                prompt = f.read().strip()
        elif fallback is not None:
            prompt = fallback
        else:
            raise ValueError(f'{os.path.join(folder, name)} has no caption {caption}; write one, or set '
                             'fallback_prompt')
        sources.append((os.path.join(folder, name), prompt, None))
    return sources


def _json_sources(path: str) -> list:
    """The JSON form of Text-To-Video-Finetuning (its Video-BLIP2-Preprocessor's output):
    {"data": [{"video_path": PATH, "data": [{"frame_index": N, "prompt": TEXT}, ...]}, ...]};
    a relative video_path is taken from the JSON file's folder."""
    if not os.path.isfile(path):
        raise ValueError(f'json={path!r}: no such file')
    with open(path, encoding='utf-8') as f:
        try:
            raw = json.load(f)
        except ValueError as error:
            raise ValueError(f'{path} is not valid JSON: {error}') from None
    entries = raw.get('data') if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{path} must hold {{"data": [{{"video_path": ..., "data": [{{"frame_index": ..., '
                         f'"prompt": ...}}]}}]}}')
    sources = []
    for i, entry in enumerate(entries):
        where = f'{path}: data[{i}]'
        if not isinstance(entry, dict) or not isinstance(entry.get('video_path'), str):
            raise ValueError(f'{where} needs "video_path", a string')
        video = os.path.join(os.path.dirname(os.path.abspath(path)), entry['video_path'])
        if not os.path.isfile(video):
            raise ValueError(f'{where}: video_path {entry["video_path"]!r}: no such file')
        items = entry.get('data')
        if not isinstance(items, list) or not items:
            raise ValueError(f'{where} needs "data", a list of {{"frame_index", "prompt"}}')
        for j, item in enumerate(items):
            ok = isinstance(item, dict) and isinstance(item.get('prompt'), str) and isinstance(
                item.get('frame_index', 0), int) and not isinstance(item.get('frame_index', 0), bool)
            if not ok:
                raise ValueError(f'{where}.data[{j}] needs "prompt" (a string) and "frame_index" (an integer)')
            sources.append((video, item['prompt'], [item.get('frame_index', 0)]))
    return sources


def bucket_sizes(config: TrainConfig) -> List[Tuple[int, int]]:
    """(width, height) of each bucket: the training size alone, the given list, or ('auto') sizes of about the
    training area at the ratios AUTO_BUCKET_RATIOS, sides rounded to multiples of 64 (8 below 256 pixels)."""
    if config.buckets is None:
        return [(config.width, config.height)]
    if config.buckets != 'auto':
        return [tuple(b) for b in config.buckets]
    area = config.width * config.height
    step = 64 if min(config.width, config.height) >= 256 else 8
    sizes = {(max(step, round(math.sqrt(area * r) / step) * step), max(step, round(math.sqrt(area / r) / step) * step))
             for r in AUTO_BUCKET_RATIOS}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """The size whose aspect ratio is nearest (in log) to width / height."""
    return min(sizes, key=lambda s: abs(math.log((s[0] / s[1]) / (width / height))))


# -- reading a clip ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _decoded(path: str, mtime_ns: int) -> np.ndarray:
    """Every frame of a video, uint8 (f, h, w, 3); the clips of one video come in a row, so two are kept."""
    return video_io.read_frames(path)


def clip_pixels(clip: Clip) -> torch.Tensor:
    """The clip's frames (3, f, height, width) in [-1, 1], float32."""
    video = _decoded(clip.path, os.stat(clip.path).st_mtime_ns)
    frames = video[clip.start:clip.start + (clip.frames - 1) * clip.stride + 1:clip.stride]
    assert len(frames) == clip.frames, (clip, video.shape)
    pixels = rearrange(torch.from_numpy(frames.copy()), 'f h w c -> f c h w').float() / 127.5 - 1
    return rearrange(cover_crop(pixels, *clip.size), 'f c h w -> c f h w')


def cover_crop(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Frames (f, c, h, w) resized to cover width x height, keeping their aspect ratio, then centre-cropped."""
    h, w = pixels.shape[-2:]
    scale = max(width / w, height / h)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        pixels = F.interpolate(pixels, size=size, mode='bicubic', antialias=True).clamp(-1, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return pixels[..., top:top + height, left:left + width]


def cache_key(clip: Clip, autoencoder_id: str) -> str:
    """Names a clip's cached posterior: the file (path, size, mtime), the sampling and the autoencoder."""
    stat = os.stat(clip.path)
    fields = [clip.path, stat.st_size, stat.st_mtime_ns, clip.start, clip.stride, clip.frames, *clip.size,
              autoencoder_id]
    return hashlib.sha1(json.dumps(fields).encode()).hexdigest()


class ClipDataset(Dataset):
    """Item i: {'pixels': (3, f, h, w)} or, with a cache, {'moments': (2 z, f, h/8, w/8)}; and 'prompt'."""

    def __init__(self, clips: List[Clip], cache_dir: Optional[str] = None, autoencoder_id: str = ''):
        self.clips = clips
        self.cache_dir = cache_dir
        self.autoencoder_id = autoencoder_id

    def __len__(self) -> int:
        return len(self.clips)

    def cache_path(self, i: int) -> str:
        return os.path.join(self.cache_dir, cache_key(self.clips[i], self.autoencoder_id) + '.pt')

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        if self.cache_dir is None:
            return {'pixels': clip_pixels(clip), 'prompt': clip.prompt}
        path = self.cache_path(i)
        if not os.path.isfile(path):
            raise RuntimeError(f'the latent cache lacks {path} (clip {i} of {clip.path}); fill_cache writes it')
        return {'moments': torch.load(path, weights_only=True), 'prompt': clip.prompt}

    def fill_cache(self, encode: Callable[[torch.Tensor], torch.Tensor], indices: Sequence[int]) -> int:
        """Write the posterior moments (2 z, f, h, w) = encode(pixels (1, 3, f, H, W))[0] of the clips at
        `indices` that the cache lacks; each file written whole (a temporary name, then renamed). Returns the count."""
        os.makedirs(self.cache_dir, exist_ok=True)
        written = 0
        for i in indices:
            path = self.cache_path(i)
            if os.path.isfile(path):
                continue
            moments = encode(clip_pixels(self.clips[i])[None])[0].cpu().contiguous()
            temp = f'{path}.partial-{secrets.token_hex(4)}'
            torch.save(moments, temp)
            os.replace(temp, path)
            written += 1
        return written


def collate(items: List[dict], context_length: int) -> dict:
    """Stacked tensors and the prompts' token ids (b, context_length)."""
    prompts = [item['prompt'] for item in items]
    batch = {'prompts': prompts, 'tokens': tokenizer.tokenize(prompts, context_length=context_length)}
    key = 'moments' if 'moments' in items[0] else 'pixels'
    batch[key] = torch.stack([item[key] for item in items])
    return batch


# -- batches of one bucket ------------------------------------------------------------------------

class BucketBatchSampler:
    """Batches of clip indices, each from one bucket (size), shuffled per epoch from the seed; rank r of w takes
    batches r, r + w, ...: every rank the same count (the last ones wrap around), as DDP needs."""

    def __init__(self, sizes: Sequence[Tuple[int, int]], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.rank, self.world, self.epoch = rank, world, 0
        # Lightning calls set_epoch on a batch sampler's `sampler` (not on the batch sampler) at each epoch's start
        self.sampler = _EpochSetter(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> List[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i in torch.randperm(len(self.sizes), generator=g).tolist():
            groups.setdefault(self.sizes[i], []).append(i)
        batches = [ids[k:k + self.batch_size] for _, ids in sorted(groups.items())
                   for k in range(0, len(ids), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[List[int]]:
        batches = self._all_batches()
        for k in range(len(self)):
            yield batches[(self.rank + k * self.world) % len(batches)]

    def __len__(self) -> int:
        groups: Dict[Tuple[int, int], int] = {}
        for size in self.sizes:
            groups[size] = groups.get(size, 0) + 1
        count = sum(math.ceil(n / self.batch_size) for n in groups.values())
        return math.ceil(count / self.world)


class _EpochSetter:
    """What Lightning finds as the batch sampler's `sampler`: passes set_epoch on."""

    def __init__(self, owner: BucketBatchSampler):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)
